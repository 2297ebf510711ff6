"""Can an organism's decoder answer from the first of two images? Accuracy on text boards, without the tower.

Each scene is given to the decoder as its scene-token embeddings (the input the vision tower is trained to produce),
alone or followed by a second board: the same board, or the cells a crop of the relevant cells, of an irrelevant
region or of a random box shows once the processor has resized it (`Trainer.second_board`). The answer is the first
board's. A decoder that keeps two images apart scores the same on every row; one that pools them loses counting first.
LLaVA organisms only (a Qwen2-VL crop has its own token grid).

    python scripts/decoder_reads_two_boards.py llava-16l                      # shipped weights, 400 val questions
    python scripts/decoder_reads_two_boards.py llava-16l=/tmp/ckpt/text.pt    # a trainer checkpoint (train.py's state)
"""
from __future__ import annotations

from tower_reads_crops import model_args, trainer_for

KINDS = (None, "same", "relevant", "irrelevant", "random")


def main(argv=None):
    args = model_args(argv, __doc__, 400)
    out = {}
    for spec in args.models:
        tr = trainer_for(spec)
        for kind in KINDS:
            acc = tr.quick_accuracy(args.n, "text", second=kind)
            out[(spec, kind or "one")] = acc
            print(spec, f"{kind or 'one':10s}", {k: round(v, 3) for k, v in acc.items()}, flush=True)
    return out


if __name__ == "__main__":
    main()
