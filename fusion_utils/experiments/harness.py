"""One harness for every experiment (cf. lmms-eval's task registry).

An experiment is a registered `Spec`: a module-level per-batch function ``per_batch(lm, samples, ctx, **params)``
that returns per-sample records, a ``summarize(records, ctx=..., **params)`` table, and optionally ``resolve`` (fill in
defaults that depend on the model and validate, before anything runs: the resolved parameters are what the run is
keyed on) and ``extras`` (named results beside the summary, e.g. the layers a masking curve finds). `run` does the
rest for all of them: the post-prompt, the run directory keyed by the configuration, resume, batching, the
progress bar and the result. Notebooks and widgets call the same per-batch functions on a sample or two.

>>> from fusion_utils.experiments.harness import Context, get_spec, run
>>> res = run("hellinger", lm, load_dataset("world", n=8))
>>> rows = get_spec("hellinger").per_batch(lm, samples[:1], Context.of(dataset), reference=-1)
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from ..data import SampleSet
from .common import Decoding, ExperimentResult, base_config, finish, post_prompt_for, run_experiment, score


@dataclass(frozen=True)
class Context:
    """What a per-batch function needs besides the model, the samples and its parameters."""

    dataset: SampleSet
    post_prompt: str | None
    decoding: Decoding | None = None
    seed: int = 0

    @classmethod
    def of(cls, dataset: SampleSet, decoding: Decoding | None = None, seed: int = 0) -> "Context":
        """The context a dataset implies: its post-prompt and scorer."""
        return cls(dataset, post_prompt_for(dataset), decoding, seed)

    def score(self, pred: str, sample) -> float:
        return score(self.dataset, pred, sample)


@dataclass(frozen=True)
class Spec:
    name: str
    per_batch: Callable  # (lm, samples, ctx, **params) -> list[dict]
    summarize: Callable  # (records, ctx, **params) -> DataFrame
    resolve: Callable | None = None  # (lm, dataset, **params) -> params
    extras: Callable | None = None  # (records, summary, **params) -> dict
    decodes: bool = True  # answers are generated: the decoding settings are part of the run's configuration
    summary_params: tuple[str, ...] = ()  # parameters only the summary and extras read (not part of the run key)


SPECS: dict[str, Spec] = {}
MODULES = {"masking": "masking", "hellinger": "layers", "early_exit": "layers", "attention": "attention",
           "contrastive": "contrastive", "baselines": "baselines", "accuracy": "accuracy", "atlas": "atlas"}


def register(spec: Spec) -> Spec:
    """Add an experiment to the registry (a user's own spec too); `run` and the CLI then find it by name."""
    SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> Spec:
    if name not in SPECS and name in MODULES:
        importlib.import_module(f"{__package__}.{MODULES[name]}")
    try:
        return SPECS[name]
    except KeyError:
        known = sorted(set(SPECS) | set(MODULES))
        raise ValueError(f"Unknown experiment {name!r}; choose one of {', '.join(known)}.") from None


def accepted(fn: Callable, params: dict) -> dict:
    """The entries of ``params`` that ``fn`` takes as keyword arguments."""
    sig = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in sig}


def run(spec: Spec | str, lm, dataset: SampleSet, *, out: str | None = None, batch_size: int = 8, seed: int = 0,
        decoding: Decoding | None = None, progress: bool = True, **params) -> ExperimentResult:
    """Run ``spec`` on ``dataset``: records streamed to ``out/<name>/<config hash>/`` (resumable), summary, extras."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.resolve is not None:
        params = spec.resolve(lm, dataset, **params)
    ctx = Context.of(dataset, (decoding or Decoding()) if spec.decodes else None, seed)
    keyed = {k: v for k, v in params.items() if k not in spec.summary_params}
    config = base_config(lm, dataset, experiment=spec.name, seed=seed, decoding=ctx.decoding,
                         post_prompt=ctx.post_prompt, params=keyed)
    batch_params = accepted(spec.per_batch, keyed)

    def per_batch(lm, samples):
        return spec.per_batch(lm, samples, ctx, **batch_params)

    records = run_experiment(spec.name, lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                             seed=seed, progress=progress)
    summary = spec.summarize(records, **accepted(spec.summarize, {**params, "ctx": ctx}))
    extras = spec.extras(records, summary, **accepted(spec.extras, params)) if spec.extras is not None else {}
    return finish(spec.name, records, summary, config, **extras)


__all__ = ["Context", "Spec", "SPECS", "register", "get_spec", "run", "accepted"]
