"""`fusion-utils`: the package from the shell, for scripts and sweeps.

    fusion-utils run masking --model organism:llava --dataset world --samples 100 --out runs/
    fusion-utils run contrastive --model llava-hf/llava-1.5-7b-hf --dataset gqa --source /data/gqa \
        --samples 500 --device cuda --dtype bfloat16 --param fusion_layers=[2,4,8] --param apply_layer=28
    fusion-utils archs
    fusion-utils organisms train --all | organisms eval --all
    fusion-utils book build [--params book/params/default.yml]
    fusion-utils book precompute --params book/params/llava-1.5-7b.yml   # the chapters' experiments only
    fusion-utils atlas --params book/params/atlas-tiny.yml   # one table and figure across models (fusion_utils.atlas)

Data-parallel: start the same command under a launcher, e.g.
``torchrun --nproc_per_node 8 -m fusion_utils run masking ...`` or ``accelerate launch -m fusion_utils run ...``;
each rank takes a share of the samples and rank 0 prints the summary. A model larger than one GPU:
``--device-map auto [--max-memory '{"0": "70GiB", "1": "70GiB"}']``.
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


def _device_map(text: str | None):
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"--device-map {text!r}: give auto, balanced, sequential, or a JSON object of module -> "
                         "device.")
    return value


def _max_memory(text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"--max-memory {text!r}: give a JSON object such as '{{\"0\": \"70GiB\", \"cpu\": \"200GiB\"}}'.")
    return {int(k) if str(k).isdigit() else k: v for k, v in value.items()}  # GPU indices as ints (accelerate)


def _run(args) -> int:
    from . import distributed
    from .data import load_dataset
    from .experiments import get_experiment, get_spec
    from .models import load_model

    fn = get_experiment(args.experiment)
    params = dict(_parse_param(p) for p in args.param or [])
    get_spec(args.experiment).parse(**params)  # a misspelt or mistyped --param stops here, before any loading
    if args.samples is not None and args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}; leave it out to use the whole dataset.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    device_map, max_memory = _device_map(args.device_map), _max_memory(args.max_memory)
    distributed.setup()  # under a launcher: join the job before loading, so each rank takes its own GPU
    dataset = load_dataset(args.dataset, split=args.split, n=args.samples, source=args.source, seed=args.data_seed)
    for name in args.model:
        if device_map is not None:
            lm = load_model(name, dtype=args.dtype, device_map=device_map, max_memory=max_memory)
        else:
            lm = load_model(name, device=args.device, dtype=args.dtype)
        result = fn(lm, dataset, out=args.out, batch_size=args.batch_size, seed=args.seed, **params)
        if not distributed.is_main():
            continue  # rank 0 reports for the job
        print(f"\n# {args.experiment} on {name} ({lm.fingerprint}), {dataset.name} n={len(dataset)}")
        print(result.summary.to_string(index=False))
        for key, value in result.extra.items():
            print(f"{key}: {value}")
        if result.run_dir:
            print(f"records: {result.run_dir}")
    return 0


def _archs(args) -> int:
    from .archs import ARCHS, REFUSED

    print("supported (model_type, name, family, image-token layout, e.g.):")
    for spec in ARCHS.values():
        print(f"  {spec.model_type:16s} {spec.label:16s} {spec.family:9s} layout={spec.grid:16s} "
              f"e.g. {', '.join(spec.hub_examples)}")
        if spec.probe_note:
            print(f"  {'':16s} note: {spec.probe_note}")
    print("refused (the paper's probe cannot apply):")
    for model_type, reason in REFUSED.items():
        print(f"  {model_type:16s} {reason}")
    return 0


def import_plugins(argv: Sequence[str]) -> None:
    """Import the modules named by ``--import`` and the installed packages' experiment entry points before the
    command line is parsed, so that the experiments they register are in the registry the parser lists."""
    import importlib

    from .experiments.harness import load_plugins

    load_plugins()
    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--import" and i + 1 < len(argv) else arg.split("=", 1)[1] \
            if arg.startswith("--import=") else None
        if name:
            try:
                importlib.import_module(name)
            except ImportError as err:
                raise SystemExit(f"fusion-utils: --import {name}: {err}; put the module on PYTHONPATH.") from None


def build_parser() -> argparse.ArgumentParser:
    from .experiments import names

    parser = argparse.ArgumentParser(prog="fusion-utils", description=__doc__.split("\n\n")[0])
    subs = parser.add_subparsers(dest="command", required=True)
    r = subs.add_parser("run", help="run one experiment of the paper on one or more models")
    r.add_argument("experiment", metavar="EXPERIMENT",
                   help=f"one of {', '.join(names())}, or one that --import registers")
    r.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import MODULE first (it registers its own experiments with fusion_utils.experiments.register)")
    r.add_argument("--model", action="append", required=True,
                   help="hub id, local directory or organism:NAME (repeat for several models)")
    r.add_argument("--dataset", default="world", help="world or a benchmark name (gqa, vqav2, ...)")
    r.add_argument("--source", help="benchmark source: HF datasets id or local JSONL/Parquet file or folder")
    r.add_argument("--split")
    r.add_argument("--samples", type=int, default=None, help="number of samples (default: the dataset's size)")
    r.add_argument("--data-seed", type=int, default=None)
    r.add_argument("--out", default="runs", help="run records directory (resumable; default runs/)")
    r.add_argument("--device", default="cpu", help="cpu or cuda (under a launcher: each rank's own GPU)")
    r.add_argument("--device-map", help="spread a model over devices: auto, balanced, or a JSON module -> device map")
    r.add_argument("--max-memory", help="with --device-map: JSON memory per device, e.g. '{\"0\": \"70GiB\"}'")
    r.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--param", action="append", metavar="NAME=VALUE", help="experiment parameter (JSON value)")
    r.set_defaults(func=_run)
    a = subs.add_parser("archs", help="list the supported architectures")
    a.set_defaults(func=_archs)
    from .atlas import add_cli as add_atlas
    from .book import add_cli as add_book
    from .organisms.cli import add_cli as add_organisms

    add_organisms(subs)
    add_book(subs)
    add_atlas(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import_plugins(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import distributed

    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, TypeError) as err:
        print(f"fusion-utils: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
