"""``fusion-utils atlas --params FILE``: the atlas of a list of models, one table and one figure on relative depth.

The parameters file (YAML; e.g. ``book/params/atlas-tiny.yml``)::

    models: [organism:llava-8l, organism:qwen2_vl-8l]   # hub ids, local directories or organism:NAME
    dataset: world          # or a benchmark (gqa, ...) with `source`
    samples: 16
    seed: 0
    device: cpu             # cuda: under torchrun each rank takes its own GPU
    dtype: float32
    # optional: source, batch_size (8), runs_dir (runs), out (atlas/<file stem>), modes ([zero]),
    # decode (generate | first_token), k (5), persist (0.75), threshold (0.05)

For each model `fusion_utils.experiments.atlas.atlas` runs (its masking and attention runs live in ``runs_dir``,
keyed by configuration and resumable), and `fusion_utils.atlas_plots.entry` turns the result into the model's
entry, kept in ``out/models/<model>.json`` with the key of everything that decides it. A model whose entry matches
is not loaded again; one whose runs are complete is loaded but nothing is recomputed. Then ``out`` gets
``atlas.csv``, ``atlas.md``, ``atlas.html``, ``atlas.png``, ``atlas_profile.csv`` (every model's per-layer
profile) and, with ``--plotly``, ``atlas_plotly.html``.

Under torchrun (``torchrun --nproc_per_node 8 -m fusion_utils atlas --params ...``): ``--ranks models`` (default)
gives rank r the models r, r + W, ...; each runs alone and every rank redraws the table from the entries on disk
when its models are done (under a file lock, so the last one draws them all). ``--ranks samples`` runs the models one
after another with the samples split across the ranks (`fusion_utils.distributed`); rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DEFAULTS = {"dataset": "world", "source": None, "samples": None, "seed": 0, "device": "cpu", "dtype": None,
            "batch_size": 8, "runs_dir": "runs", "out": None, "modes": ["zero"], "decode": "generate", "k": 5,
            "persist": 0.75, "threshold": 0.05}
REQUIRED = ("models", "samples")
OUTPUTS = ("atlas.csv", "atlas.md", "atlas.html", "atlas.png", "atlas_profile.csv")


def load_atlas_params(path) -> dict:
    """The parameters file read, completed with the defaults and checked; ValueError with one sentence naming the
    fix on any problem."""
    import yaml

    from .book.chapter import check_params

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Atlas parameters file {path} does not exist; pass an existing file such as "
                         "book/params/atlas-tiny.yml.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"Atlas parameters file {p} is not valid YAML{at}; fix the syntax there.") from None
    if not isinstance(data, dict):
        raise ValueError(f"Atlas parameters file {p} must be a mapping with at least 'models' and 'samples'.")
    unknown = sorted(set(data) - set(DEFAULTS) - set(REQUIRED))
    if unknown:
        raise ValueError(f"Atlas parameters file {p} has unknown key(s) {', '.join(map(repr, unknown))}; use only "
                         f"{', '.join(REQUIRED + tuple(DEFAULTS))}.")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise ValueError(f"Atlas parameters file {p} lacks {' and '.join(missing)}; add e.g. "
                         "models: [organism:llava-8l] and samples: 16.")
    params = {**DEFAULTS, **data}
    check_params(models=params["models"], dataset=params["dataset"], samples=params["samples"],
                 device=params["device"], dtype=params["dtype"], seed=params["seed"], source=params["source"],
                 threshold=params["threshold"])
    if not all(isinstance(m, str) and m for m in params["models"]):
        raise ValueError(f"In {p}, models must be a list of model names (strings), got {params['models']!r}.")
    if len(set(params["models"])) != len(params["models"]):
        raise ValueError(f"In {p}, models lists a model twice; list each model once.")
    if not isinstance(params["modes"], list) or "zero" not in params["modes"]:
        raise ValueError(f"In {p}, modes must be a list holding 'zero' (the fusion profile), got {params['modes']!r}.")
    if params["decode"] not in ("generate", "first_token"):
        raise ValueError(f"In {p}, decode must be 'generate' or 'first_token', got {params['decode']!r}.")
    if not isinstance(params["batch_size"], int) or params["batch_size"] < 1:
        raise ValueError(f"In {p}, batch_size must be a positive integer, got {params['batch_size']!r}.")
    params["out"] = params["out"] or str(Path("atlas") / p.stem)
    params["path"] = str(p)
    return params


def slug(name: str) -> str:
    """A file name for a model name (``organism:llava-8l`` -> ``organism_llava-8l``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "model"


def entry_key(params: dict, model: str) -> str:
    """The hash of everything that decides a model's entry: the model's checkpoint, the data, the atlas's
    parameters and the package's source (as in every run key)."""
    from .models import checkpoint_fingerprint
    from .runs import config_hash, package_source_hash

    keyed = {k: params[k] for k in ("dataset", "source", "samples", "seed", "dtype", "modes", "decode", "k", "persist",
                                    "threshold")}
    return config_hash({"model": model, "checkpoint": checkpoint_fingerprint(model), **keyed,
                        "device_type": str(params["device"]).split(":")[0], "source_hash": package_source_hash()})


def entry_path(out: Path, model: str) -> Path:
    return Path(out) / "models" / f"{slug(model)}.json"


def cached_entry(out: Path, model: str, key: str) -> dict | None:
    """The stored entry of ``model`` if its key matches (else None: not run yet, or run with other inputs)."""
    path = entry_path(out, model)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc["entry"] if doc.get("key") == key else None


def compute_entry(params: dict, model: str, data, *, progress: bool = True) -> dict:
    """Load ``model``, run its atlas (resuming its runs) and return its entry."""
    from . import distributed
    from .atlas_plots import entry
    from .experiments.atlas import atlas
    from .book.chapter import iter_models

    for lm in iter_models([model], str(distributed.device_for(params["device"])), params["dtype"]):
        result = atlas(lm, data, modes=params["modes"], decode=params["decode"], k=params["k"],
                       persist=params["persist"], threshold=params["threshold"], out=params["runs_dir"],
                       batch_size=params["batch_size"], seed=params["seed"], progress=progress)
        return entry(lm, result, seed=params["seed"])
    raise AssertionError("unreachable")  # pragma: no cover


def save_entry(out: Path, model: str, key: str, e: dict) -> None:
    from .atlas_plots import json_safe
    from .runs import atomic_write_text

    path = entry_path(out, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "entry": json_safe(e)}, indent=1, ensure_ascii=False) + "\n")


def render(params: dict, keys: dict, *, plotly: bool = False) -> dict:
    """Write the table and figure from the stored entries of the models whose keys match; returns
    ``{"outputs": {name: path}, "missing": [models without an entry yet]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atlas_plots import atlas_figure, atlas_plotly, atlas_table, table_csv, table_html, table_markdown
    from .runs import atomic_write_text

    out = Path(params["out"])
    entries, missing = [], []
    for m in params["models"]:
        e = cached_entry(out, m, keys[m])
        (entries.append(e) if e is not None else missing.append(m))
    table = atlas_table(entries)
    paths = {name: out / name for name in OUTPUTS}
    atomic_write_text(paths["atlas.csv"], table_csv(table))
    atomic_write_text(paths["atlas.md"], table_markdown(table))
    title = f"Atlas ({Path(params['path']).name})"
    atomic_write_text(paths["atlas.html"], table_html(table, figure="atlas.png", title=title))
    import pandas as pd

    profile = pd.concat([pd.DataFrame(e["profile"]).assign(model=e["label"], family=e["family"]) for e in entries],
                        ignore_index=True) if entries else pd.DataFrame()
    atomic_write_text(paths["atlas_profile.csv"], profile.to_csv(index=False))
    fig = atlas_figure(entries, title="Where vision meets language, on relative depth")
    tmp = out / ".atlas.png.tmp.png"
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(paths["atlas.png"])
    if plotly:
        paths["atlas_plotly.html"] = out / "atlas_plotly.html"
        atlas_plotly(entries).write_html(str(paths["atlas_plotly.html"]), include_plotlyjs=True)
    return {"outputs": paths, "missing": missing, "table": table}


def render_locked(params: dict, keys: dict, *, plotly: bool = False) -> dict:
    """`render` under an exclusive lock on ``out/.lock``: ranks that finish together draw one after another, and
    the last draws every entry written before it."""
    import fcntl

    out = Path(params["out"])
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return render(params, keys, plotly=plotly)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_atlas(params_file, *, out: str | None = None, ranks: str = "models", plotly: bool = False,
                progress: bool = True, say=print) -> dict:
    """Run the atlas of every model in ``params_file`` that has no current entry, then write the table and figure.
    Returns `render`'s dict plus ``computed`` (the models this process ran) and ``reused``."""
    from tqdm.auto import tqdm

    from . import distributed
    from .book.chapter import load_data

    if ranks not in ("models", "samples"):
        raise ValueError(f"--ranks must be 'models' or 'samples', got {ranks!r}.")
    params = load_atlas_params(params_file)
    if out is not None:
        params["out"] = str(out)
    Path(params["out"]).mkdir(parents=True, exist_ok=True)
    keys = {m: entry_key(params, m) for m in params["models"]}
    distributed.setup()  # under a launcher: join the job before loading, so each rank takes its own GPU
    r, world = distributed.rank(), distributed.world_size()
    split_models = ranks == "models" and world > 1
    mine = params["models"][r::world] if split_models else params["models"]
    writer = split_models or r == 0
    data = load_data(params["dataset"], params["samples"], params["seed"], params["source"])
    computed, reused = [], []
    for m in tqdm(mine, desc=f"atlas [rank {r}]" if world > 1 else "atlas", unit="model", disable=not progress):
        if cached_entry(Path(params["out"]), m, keys[m]) is not None:
            reused.append(m)
            continue
        if split_models:
            with distributed.alone():
                e = compute_entry(params, m, data, progress=progress)
        else:
            e = compute_entry(params, m, data, progress=progress)
        if writer:
            save_entry(Path(params["out"]), m, keys[m], e)
        computed.append(m)
    if not writer:
        return {"outputs": {}, "missing": [], "computed": computed, "reused": reused, "table": None}
    res = render_locked(params, keys, plotly=plotly)
    if res["missing"] and split_models:
        say(f"atlas: rank {r} done; {len(res['missing'])} model(s) still running on other ranks (the last rank to "
            "finish writes the full table)")
    return {**res, "computed": computed, "reused": reused}


def _cmd_atlas(args: argparse.Namespace) -> int:
    from . import distributed

    res = build_atlas(args.params, out=args.out, ranks=args.ranks, plotly=args.plotly)
    if not distributed.is_main() and not res["outputs"]:
        return 0
    if res["table"] is not None and not res["missing"]:
        from .atlas_plots import table_text

        print(table_text(res["table"]).to_string(index=False))
    who = f"atlas (rank {distributed.rank()})" if distributed.world_size() > 1 else "atlas"
    print(f"{who}: {len(res['computed'])} model(s) computed, {len(res['reused'])} reused; "
          f"{', '.join(str(p) for p in res['outputs'].values())}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """The ``atlas`` sub-command."""
    a = subparsers.add_parser("atlas", help="the atlas of a list of models: one table and one figure on relative depth",
                              description=__doc__.split("\n\n")[0])
    a.add_argument("--params", required=True, metavar="FILE",
                   help="atlas parameters file, e.g. book/params/atlas-tiny.yml")
    a.add_argument("--out", default=None, help="where the table and figure go (default: the file's `out`, else "
                   "atlas/<file stem>)")
    a.add_argument("--ranks", default="models", choices=("models", "samples"),
                   help="under torchrun: one model per rank (models) or every model's samples split (samples)")
    a.add_argument("--plotly", action="store_true", help="also write atlas_plotly.html (interactive)")
    a.set_defaults(func=_cmd_atlas)
    return a


__all__ = ["load_atlas_params", "build_atlas", "entry_key", "cached_entry", "compute_entry", "render", "add_cli",
           "slug", "DEFAULTS", "OUTPUTS"]
