"""`fusion-utils organisms train|eval ...` (the lead wires `add_cli` into fusion_utils/cli.py)."""
from __future__ import annotations

import argparse

from . import DEEP, DEFAULT_VARIANT, VARIANTS, resolve_name, shipped

NAMES = tuple(DEFAULT_VARIANT) + tuple(VARIANTS)


def _names(args, for_eval: bool) -> list[str]:
    if args.name and args.all:
        raise SystemExit("Give an organism name or --all, not both.")
    if args.name:
        return [resolve_name(args.name)]
    if for_eval:  # every variant whose weights ship
        return shipped()
    return list(DEEP)  # `train --all`: the organisms issue 16 asks `make organisms` to retrain


def _train(args) -> int:
    from pathlib import Path

    from .recipe import FINE_RECIPE
    from .train import train

    names = _names(args, for_eval=False)
    for name in names:
        out = None
        if args.out:
            out = Path(args.out) / name if len(names) > 1 else Path(args.out)
        ckpt = Path(args.ckpt_dir) / name if args.ckpt_dir and len(names) > 1 else args.ckpt_dir
        if args.fine and name not in FINE_RECIPE:
            raise SystemExit(f"--fine: stage (f) has a recipe for {', '.join(FINE_RECIPE)} only, not {name}.")
        train(name, out_dir=out, seed=args.seed, threads=args.threads, ckpt_dir=ckpt, resume=not args.no_resume,
              recipe=FINE_RECIPE[name] if args.fine else None,
              stop_after=args.stop_after, ckpt_every=args.ckpt_every, evaluate_after=not args.no_eval,
              base_dir=args.base)
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from . import weights_dir
    from .evaluate import bar_status, evaluate, fine_bar_status, format_table, trained_with_two_images

    targets = [(args.name or args.dir, Path(args.dir))] if args.dir else \
        [(n, weights_dir(n)) for n in _names(args, for_eval=True)]
    for name, path in targets:
        two = not args.no_two_image
        table = evaluate(path, n=args.n, split=args.split, seed=args.seed, blank=not args.no_blank, two_image=two,
                         dataset=args.dataset)
        print(f"\n## {name} ({args.dataset}, {args.split}, n={args.n})\n{format_table(table)}")
        if args.dataset == "world-fine":
            print(fine_bar_status(table) if two else "World-fine's bar needs the relevant crop: drop --no-two-image.")
        elif "gap" in table:
            # the two-image parts of the bar are issue 16's, for organisms trained with stage (e)
            print(bar_status(table, two_image=two and trained_with_two_images(path)))
    return 0


def _card(args) -> int:
    from pathlib import Path

    from . import weights_dir
    from .evaluate import evaluate_and_card

    name = resolve_name(args.name)
    evaluate_and_card(name, Path(args.dir) if args.dir else weights_dir(name))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("organisms", help="train / evaluate the model organisms (llava, qwen2_vl; 8-layer and deep)")
    sub = p.add_subparsers(dest="organisms_cmd", required=True)
    t = sub.add_parser("train", help="run the staged training recipe and save weights + processor + model card")
    t.add_argument("name", nargs="?", choices=NAMES,
                   help=f"an organism (llava / qwen2_vl: the default variant, now {', '.join(DEFAULT_VARIANT.values())})")
    t.add_argument("--all", action="store_true", help=f"train the deep organisms ({', '.join(DEEP)})")
    t.add_argument("--out", help="output directory (default: the shipped fusion_utils/organisms/weights/<variant>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    t.add_argument("--ckpt-dir", help="stage and mid-stage checkpoints (default: a directory under the system temp "
                                      "dir named by the recipe's hash); a rerun with the same one resumes")
    t.add_argument("--ckpt-every", type=int, default=100, help="steps between mid-stage checkpoints (0: none)")
    t.add_argument("--base", help="weights that went through stages (a)-(e) (e.g. a checkout of the shipped ones "
                                  "before stage (f), see organisms/weights/RECIPE_NOTES.md): run stage (f) only")
    t.add_argument("--fine", action="store_true",
                   help="add stage (f), small details (world-fine), to the recipe (recipe.FINE_RECIPE); with --base, "
                        "fine-tune those weights")
    t.add_argument("--stop-after", choices=("text", "vision", "joint", "two", "fine"),
                   help="end after this stage's checkpoint (resume later with the same --ckpt-dir)")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    t.add_argument("--no-eval", action="store_true",
                   help="save the weights without evaluating them or writing the model card (`organisms card` does later)")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="accuracy per family, on blank images and with two images")
    e.add_argument("name", nargs="?", choices=NAMES)
    e.add_argument("--all", action="store_true", help="every organism whose weights ship (the default)")
    e.add_argument("--dir", help="evaluate weights in this directory instead of the shipped ones")
    e.add_argument("--n", type=int, default=500)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--dataset", default="world", choices=("world", "world-fine"),
                   help="world, or world-fine: the headroom split (small objects' colours; its bar: one image 55-75%%, "
                        "the relevant crop >= 10 points higher)")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--no-blank", action="store_true", help="skip the blank-image control")
    e.add_argument("--no-two-image", action="store_true",
                   help="skip the two-image controls (same image twice, relevant crop, irrelevant crop)")
    e.set_defaults(func=_eval)
    c = sub.add_parser("card", help="evaluate saved weights on the 500 test questions and (re)write their model card")
    c.add_argument("name", choices=NAMES)
    c.add_argument("--dir", help="the weights directory (default: the shipped one of NAME)")
    c.set_defaults(func=_card)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusion-utils")
    add_cli(parser.add_subparsers(dest="command", required=True))
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "organisms":  # `python -m fusion_utils.organisms.cli train llava` works too
        argv = ["organisms"] + argv
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
