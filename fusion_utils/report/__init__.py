"""A verdict per claim of the paper, and the chapters' tables. Nothing here loads a model.

A verdict compares what a run measured with what the paper reports, by a rule that a null model fails:

- every rule compares with its chance level (a random token, a shuffled-layer curve, plain decoding);
- whatever is tuned (ρ, λ, candidate set, fusion or review layer) is chosen on a dev split and judged on a disjoint
  test split (a stable hash of the sample's image or question group, `stats.split_of`, `stats.split_group`);
- the effect carries its uncertainty (bootstrap CI; McNemar or sign-flip p-value; a shuffled-layer permutation
  p-value where the claim is about depth) and is decided by one three-way rule (`verdicts.decide`) against the
  paper's effect, or the smallest effect that would support the claim (named constants in `verdicts`): "reproduces"
  when the CI excludes zero in the paper's direction, "does not reproduce (smaller than reported | opposite)" when
  it excludes the paper's effect, "inconclusive" only when it holds both, with the build size that would decide;
- the layer claims' primary measure is the paired per-sample change of the gold answer's first-token log-probability
  (accuracy shown beside it), declared in each rule; `verdict_table` adds Holm's family-wise adjusted p-values;
- when the analysis does not apply (nothing persistent, no relevance labels, a flat curve, a no-op intervention),
  the verdict is "n/a: <reason>" rather than an exception.

The rules take per-sample records (``result.records``), not summaries, because a test needs the samples.
Depths are relative (layer / number of layers) so the rules apply to models of any depth.

>>> import pandas as pd
>>> rows = attention_verdicts("m", pd.DataFrame(), 8)
>>> bool(verdict_table(rows)["verdict"].str.startswith("n/a").all())
True

Modules: `verdicts` (the outcomes, the row, the decision), `layer_rules`, `attention_rules`, `contrastive_rules`
(one per chapter's claims), `tables`, `stats` and `power` (the test n chosen by a pilot on the dev split).
"""
from __future__ import annotations

from . import power, stats
from .attention_rules import attention_verdicts
from .contrastive_rules import contrastive_verdicts, usable_candidates
from .layer_rules import fusion_verdicts, pick_layers, review_verdicts
from .tables import (
                     LATENCY_ALIASES,
                     VERDICT_COLUMNS,
                     candidate_table,
                     gain_table,
                     label,
                     latency_from_records,
                     latency_table,
                     method_table,
                     model_row,
                     pick_examples,
                     reported_model_table,
                     verdict_table,
)
from .verdicts import (
                     CLAIM_TEXT,
                     INCONCLUSIVE,
                     LLAVA_FAMILY,
                     NA,
                     NO,
                     PARTLY,
                     QWEN_FAMILY,
                     REPRODUCES,
                     RULES,
                     dev_split,
)

__all__ = ["pick_examples", "method_table", "candidate_table", "model_row", "reported_model_table", "gain_table", "label",
           "usable_candidates", "pick_layers", "dev_split", "stats", "power",
           "fusion_verdicts", "review_verdicts", "attention_verdicts", "contrastive_verdicts", "verdict_table",
           "latency_table", "latency_from_records", "CLAIM_TEXT", "RULES", "VERDICT_COLUMNS", "LATENCY_ALIASES",
           "REPRODUCES", "PARTLY", "NO", "INCONCLUSIVE", "NA", "LLAVA_FAMILY", "QWEN_FAMILY"]
