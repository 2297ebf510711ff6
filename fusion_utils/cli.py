"""`fusion-utils`: the package from the shell, for scripts and sweeps.

    fusion-utils run masking --model organism:llava --dataset world --samples 100 --out runs/
    fusion-utils run contrastive --model llava-hf/llava-1.5-7b-hf --dataset gqa --source /data/gqa \
        --samples 500 --device cuda --dtype bfloat16 --param fusion_layers=[2,4,8] --param apply_layer=28
    fusion-utils archs
    fusion-utils organisms train --all | organisms eval --all
    fusion-utils book build [--params book/params/default.yml]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _parse_param(text: str):
    if "=" not in text:
        raise SystemExit(f"--param {text!r}: write it as name=value (value in JSON, e.g. rho=0.2 or layers=[2,4]).")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _run(args) -> int:
    from .data import load_dataset
    from .experiments import get_experiment
    from .models import load_model

    fn = get_experiment(args.experiment)
    params = dict(_parse_param(p) for p in args.param or [])
    dataset = load_dataset(args.dataset, split=args.split, n=args.samples, source=args.source, seed=args.data_seed)
    for name in args.model:
        lm = load_model(name, device=args.device, dtype=args.dtype)
        result = fn(lm, dataset, out=args.out, batch_size=args.batch_size, seed=args.seed, **params)
        print(f"\n# {args.experiment} on {name} ({lm.fingerprint}), {dataset.name} n={len(dataset)}")
        print(result.summary.to_string(index=False))
        for key, value in result.extra.items():
            print(f"{key}: {value}")
        if result.run_dir:
            print(f"records: {result.run_dir}")
    return 0


def _archs(args) -> int:
    from .archs import ARCHS

    for spec in ARCHS.values():
        print(f"{spec.model_type:12s} {spec.label:12s} grid={spec.grid:10s} e.g. {', '.join(spec.hub_examples)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="fusion-utils", description=__doc__.split("\n\n")[0])
    subs = parser.add_subparsers(dest="command", required=True)
    r = subs.add_parser("run", help="run one experiment of the paper on one or more models")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--model", action="append", required=True,
                   help="hub id, local directory or organism:NAME (repeat for several models)")
    r.add_argument("--dataset", default="world", help="world or a benchmark name (gqa, vqav2, ...)")
    r.add_argument("--source", help="benchmark source: HF datasets id or local JSONL/Parquet file or folder")
    r.add_argument("--split")
    r.add_argument("--samples", type=int, default=None, help="number of samples (default: the dataset's size)")
    r.add_argument("--data-seed", type=int, default=None)
    r.add_argument("--out", default="runs", help="run records directory (resumable; default runs/)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--param", action="append", metavar="NAME=VALUE", help="experiment parameter (JSON value)")
    r.set_defaults(func=_run)
    a = subs.add_parser("archs", help="list the supported architectures")
    a.set_defaults(func=_archs)
    from .book import add_cli as add_book
    from .organisms.cli import add_cli as add_organisms

    add_organisms(subs)
    add_book(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"fusion-utils: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
