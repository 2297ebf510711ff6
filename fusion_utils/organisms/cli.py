"""`fusion-utils organisms train|eval ...` (the lead wires `add_cli` into fusion_utils/cli.py)."""
from __future__ import annotations

import argparse

from . import ORGANISMS


def _names(args) -> list[str]:
    if args.all or not args.name:
        return list(ORGANISMS)
    if args.name not in ORGANISMS:
        raise SystemExit(f"Unknown organism {args.name!r}; use one of {', '.join(ORGANISMS)} or --all.")
    return [args.name]


def _train(args) -> int:
    from .train import train

    for name in _names(args):
        out = None
        if args.out:
            from pathlib import Path

            out = Path(args.out) / name if (args.all or not args.name) else Path(args.out)
        train(name, out_dir=out, seed=args.seed, threads=args.threads)
    return 0


def _eval(args) -> int:
    from .evaluate import bar_status, evaluate, format_table

    for name in _names(args):
        target = args.dir if args.dir else name
        table = evaluate(target, n=args.n, split=args.split, seed=args.seed, blank=not args.no_blank)
        print(f"\n## {name} ({args.split}, n={args.n})\n{format_table(table)}")
        if "gap" in table:
            print(bar_status(table))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("organisms", help="train / evaluate the two model organisms (llava, qwen2_vl)")
    sub = p.add_subparsers(dest="organisms_cmd", required=True)
    t = sub.add_parser("train", help="run the staged training recipe and save weights + processor + model card")
    t.add_argument("name", nargs="?", choices=ORGANISMS)
    t.add_argument("--all", action="store_true", help="train every organism")
    t.add_argument("--out", help="output directory (default: the shipped fusion_utils/organisms/weights/<name>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="accuracy per family and on blank images")
    e.add_argument("name", nargs="?", choices=ORGANISMS)
    e.add_argument("--all", action="store_true")
    e.add_argument("--dir", help="evaluate weights in this directory instead of the shipped ones")
    e.add_argument("--n", type=int, default=500)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--no-blank", action="store_true", help="skip the blank-image control")
    e.set_defaults(func=_eval)
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
