"""The paper's experiments, one function each: ``fn(lm, dataset, **params) -> ExperimentResult``.

- ``masking`` (Sec. 3): ``masking.masking``, accuracy vs masked layer, fusion and review layers;
- ``hellinger`` (Sec. 3-4): ``layers.hellinger``, attention distance to the final layer;
- ``early_exit`` (Sec. 3): ``layers.early_exit``, each layer's early-exit answer;
- ``attention`` (Sec. 4): ``attention.attention``, relevant vs irrelevant mass, persistent tokens;
- ``contrastive`` (Sec. 5): ``contrastive.contrastive``, soft mask and crop, with ablations;
- ``baselines`` (Sec. 6): ``baselines.baselines``, plain, ViCrop, VCD, DoLa;
- ``accuracy``: ``accuracy.accuracy``, plain accuracy per family under an image condition (original, blank, two
  images); the organisms' bar is measured with it.
"""
from __future__ import annotations

from .common import Decoding, ExperimentResult, answer
from .harness import BUILTIN, Spec, get_spec, names, register, run

EXPERIMENTS = tuple(BUILTIN)  # the package's own; `names()` adds every registered one


def get_experiment(name: str):
    """``fn(lm, dataset, **params) -> ExperimentResult`` for any registered experiment (the package's or a user's).

    >>> res = get_experiment("hellinger")(lm, load_dataset("world", n=8), reference=-1, progress=False)
    >>> list(res.summary.columns), len(res.summary) == lm.num_layers
    (['layer', 'hellinger', 'hellinger_sd', 'image_mass'], True)
    """
    spec = get_spec(name)

    def experiment(lm, dataset, **params) -> ExperimentResult:
        return run(spec, lm, dataset, **params)

    experiment.__name__ = experiment.__qualname__ = name
    experiment.__doc__ = f"Run the {name!r} experiment (`fusion_utils.experiments.run`); its parameters: " \
                         f"{spec.params.__name__ if spec.params else 'see its module'}."
    return experiment


__all__ = ["EXPERIMENTS", "get_experiment", "get_spec", "names", "register", "run", "Spec", "Decoding",
           "ExperimentResult", "answer"]
