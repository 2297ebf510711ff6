"""One harness for every experiment (cf. lmms-eval's task registry).

An experiment is a registered `Spec`: a module-level per-batch function ``per_batch(lm, samples, ctx, **params)``
that returns per-sample records, a ``summarize(records, ctx=..., **params)`` table, and optionally ``resolve`` (fill in
defaults that depend on the model and validate, before anything runs: the resolved parameters are what the run is
keyed on) and ``extras`` (named results beside the summary, e.g. the layers a masking curve finds). `run` does the
rest for all of them: the post-prompt, the run directory keyed by the configuration, resume, batching, the
progress bar and the result. Notebooks and widgets call the same per-batch functions on a sample or two.

>>> from fusion_utils.experiments.harness import Context, get_spec, run
>>> dataset = load_dataset("world", n=8)
>>> res = run("hellinger", lm, dataset, progress=False)
>>> rows = get_spec("hellinger").per_batch(lm, dataset[:1], Context.of(dataset), reference=-1)
>>> len(rows) == lm.num_layers  # one record per layer of the one sample
True
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

from ..data import SampleSet
from .common import Decoding, ExperimentResult, base_config, finish, post_prompt_for, run_experiment, score
from .params import parse_params


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
    """One experiment: its per-batch function, summary and parameters.

    ``params`` is a frozen dataclass whose fields are the experiment's parameters with their defaults (written only
    there); `run`, the CLI and the interactive figures all read it, so an unknown or mistyped parameter is refused
    with the list of valid ones before any work.
    """

    name: str
    per_batch: Callable  # (lm, samples, ctx, **params) -> list[dict]
    summarize: Callable  # (records, ctx, **params) -> DataFrame
    resolve: Callable | None = None  # (lm, dataset, **params) -> params
    extras: Callable | None = None  # (records, summary, **params) -> dict
    decodes: bool = True  # answers are generated: the decoding settings are part of the run's configuration
    summary_params: tuple[str, ...] = ()  # parameters only the summary and extras read (not part of the run key)
    params: type | None = None  # the frozen dataclass of parameters and defaults
    # a question's records depend on the question alone (not on its batch, nor on a random stream across batches):
    # a run then adopts the records its sibling runs already hold for its questions (`runs.adopt`)
    per_question: bool = False

    def parse(self, **given) -> dict:
        """``given`` checked against `params` and completed with its defaults (``given`` itself without one)."""
        return parse_params(self.name, self.params, given) if self.params is not None else dict(given)

    def prepared(self, lm, dataset: SampleSet, **given) -> dict:
        """The parameters a run of ``lm`` on ``dataset`` is keyed on: parsed, then resolved for the model."""
        params = self.parse(**given)
        return self.resolve(lm, dataset, **params) if self.resolve is not None else params

    def records(self, lm, samples, *, decoding: Decoding | None = None, seed: int = 0, **given) -> list[dict]:
        """The per-batch records of ``samples`` as one batch, with the parameters resolved as `run` resolves them:
        what an interactive figure shows is what a chapter computes.

        >>> rows = get_spec("hellinger").records(lm, load_dataset("world", n=1), reference=-1)
        """
        dataset = samples if isinstance(samples, SampleSet) else SampleSet("picked", list(samples), "vqa")
        params = self.prepared(lm, dataset, **given)
        ctx = Context.of(dataset, (decoding or Decoding()) if self.decodes else None, seed)
        keyed = {k: v for k, v in params.items() if k not in self.summary_params}
        return self.per_batch(lm, list(dataset), ctx, **accepted(self.per_batch, keyed))


SPECS: dict[str, Spec] = {}
#: the package's own experiments and the module that registers each (imported when first asked for)
BUILTIN = {"masking": "masking", "hellinger": "layers", "early_exit": "layers", "attention": "attention",
           "contrastive": "contrastive", "baselines": "baselines", "accuracy": "accuracy", "atlas": "atlas"}
PLUGIN_GROUP = "fusion_utils.experiments"  # entry points of installed packages that register experiments


def register(spec: Spec) -> Spec:
    """Add an experiment to the registry (a user's own spec too); `run`, `get_experiment` and ``fusion-utils run``
    then find it by name. A name already taken is refused (re-importing the module that registered it is not).

    >>> @dataclass(frozen=True)
    ... class MyParams:
    ...     k: int = 3
    >>> def my_batch(lm, samples, ctx, k=3):
    ...     return [{"id": s.id, "k": k} for s in samples]
    >>> def my_summary(records, ctx=None, **params):
    ...     return records.groupby("k").size().rename("n").reset_index()
    >>> spec = register(Spec("my_probe", my_batch, my_summary, params=MyParams))  # then: fusion-utils run my_probe
    """
    old = SPECS.get(spec.name)
    if old is not None and not same_origin(old, spec):
        raise ValueError(f"An experiment named {spec.name!r} is already registered (by "
                         f"{old.per_batch.__module__}); register yours under another name.")
    if old is None and spec.name in BUILTIN and spec.per_batch.__module__ != f"{__package__}.{BUILTIN[spec.name]}":
        raise ValueError(f"{spec.name!r} is the name of one of the package's experiments; register yours under "
                         "another name.")
    SPECS[spec.name] = spec
    return spec


def same_origin(a: Spec, b: Spec) -> bool:
    """Whether two specs come from the same function (a module imported again registers its spec again)."""
    return (a.per_batch.__module__, a.per_batch.__qualname__) == (b.per_batch.__module__, b.per_batch.__qualname__)


def load_plugins() -> list[str]:
    """Import the modules that installed packages declare under the ``fusion_utils.experiments`` entry point group
    (each registers its specs on import); returns their names."""
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        importlib.import_module(ep.value.split(":")[0])
        loaded.append(ep.name)
    return loaded


def names() -> list[str]:
    """Every experiment that can be run: the package's own and every registered one."""
    return sorted(set(BUILTIN) | set(SPECS))


def get_spec(name: str) -> Spec:
    if name not in SPECS and name in BUILTIN:
        importlib.import_module(f"{__package__}.{BUILTIN[name]}")
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {', '.join(names())} (or register your "
                         "own with fusion_utils.experiments.register).") from None


def accepted(fn: Callable, params: dict) -> dict:
    """The entries of ``params`` that ``fn`` takes as keyword arguments."""
    sig = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        return dict(params)
    return {k: v for k, v in params.items() if k in sig}


def with_split_groups(records, dataset: SampleSet):
    """``records`` with a ``split_group`` column (`Sample.group_key`) when some samples share an image or are copies
    of one question, so every verdict's dev/test split keeps them on one side; unchanged when each sample is its own
    group (the world), so those records and their splits stay as they were."""
    keys = {str(s.id): s.group_key for s in dataset}
    if records is None or len(records) == 0 or "id" not in records.columns or all(k == i for i, k in keys.items()):
        return records
    ids = records["id"].astype(str)
    return records.assign(split_group=ids.map(keys).fillna(ids))


def run(spec: Spec | str, lm, dataset: SampleSet, *, out: str | None = None, batch_size: int = 8, seed: int = 0,
        decoding: Decoding | None = None, progress: bool = True, **params) -> ExperimentResult:
    """Run ``spec`` on ``dataset``: records streamed to ``out/<name>/<config hash>/`` (resumable), summary, extras."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    params = spec.prepared(lm, dataset, **params)
    ctx = Context.of(dataset, (decoding or Decoding()) if spec.decodes else None, seed)
    keyed = {k: v for k, v in params.items() if k not in spec.summary_params}
    config = base_config(lm, dataset, experiment=spec.name, seed=seed, decoding=ctx.decoding,
                         post_prompt=ctx.post_prompt, params=keyed)
    batch_params = accepted(spec.per_batch, keyed)

    def per_batch(lm, samples):
        return spec.per_batch(lm, samples, ctx, **batch_params)

    records = run_experiment(spec.name, lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                             seed=seed, progress=progress, adopt=spec.per_question)
    records = with_split_groups(records, dataset)
    summary = spec.summarize(records, **accepted(spec.summarize, {**params, "ctx": ctx}))
    extras = spec.extras(records, summary, **accepted(spec.extras, params)) if spec.extras is not None else {}
    return finish(spec.name, records, summary, config, **extras)


__all__ = ["Context", "Spec", "SPECS", "BUILTIN", "register", "get_spec", "names", "load_plugins", "run",
           "accepted", "parse_params", "with_split_groups"]
