"""What the paper reports (CVPR 2026 version of arXiv 2601.08151), as data for side-by-side tables.

Only the abstract of the paper could be read where this package was written; the numbers below come from detailed
third-party summaries of the CVPR version. Items marked ``uncertain`` are not stated unambiguously there (e.g. the
backbone of the candidate-set ablation, the indexing base of the fusion layers). The exact protocol (masking
thresholds, soft-mask strength, crop rule) is unpublished.

Layers: the paper numbers layers from 1; the package from 0. This module converts the paper's numbers once
(`paper_layer`) and stores every reported layer 0-based, with the number the paper prints beside it.
"""
from __future__ import annotations

import pandas as pd

CITATION = ("Song, Li & Yu, \"Where Does Vision Meet Language? Understanding and Refining Visual Fusion in MLLMs via "
            "Contrastive Attention\", arXiv 2601.08151 (CVPR 2026)")
SOURCE_NOTE = "reported in the paper (CVPR 2026 version)"

# --- layer numbers -------------------------------------------------------------------------------------------------
# The package counts decoder layers from 0. The paper's layer numbers are converted here, once, and every module
# reads the 0-based constants below. The paper counts layers from 1 ("layer 29 of 32"); each constant keeps the
# number as the paper prints it beside it (``*_REPORTED``). The fusion-layer list's base is not stated anywhere
# readable (`FUSION_LAYERS`): it is read as 1-based like the paper's other numbers, and its 0-based reading is kept
# (`FUSION_LAYERS_IF_ZERO_BASED`) so a figure or sentence can say both.

PAPER_N_LAYERS = 32  # the paper's layer numbers are for 7B decoders of 32 layers


def paper_layer(n: int, n_layers: int = PAPER_N_LAYERS) -> int:
    """The paper's 1-based layer ``n`` (1..``n_layers``) as the 0-based index the package uses.

    >>> paper_layer(29), paper_layer(1)
    (28, 0)
    """
    if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= n_layers:
        raise ValueError(f"The paper numbers layers 1 to {n_layers}; got {n!r} (pass the number the paper prints).")
    return int(n) - 1


def paper_layers(ns, n_layers: int = PAPER_N_LAYERS) -> list[int]:
    """`paper_layer` of each number of a 1-based list."""
    return [paper_layer(n, n_layers) for n in ns]


def after_paper_layer(n: int, n_layers: int = PAPER_N_LAYERS) -> int:
    """The 0-based index of the first layer *after* the paper's 1-based layer ``n`` ("after layer 18" -> 18)."""
    return paper_layer(n, n_layers) + 1


#: "a review dip near layer 29" (LLaVA-1.5, LLaVA-NeXT, InstructBLIP, VIP-LLaVA)
REVIEW_LAYER_REPORTED = 29
REVIEW_LAYER = paper_layer(REVIEW_LAYER_REPORTED)  # 28
#: "after about layers 18-20, masking barely changes accuracy"
PLATEAU_AFTER_REPORTED = (18, 20)
PLATEAU_FROM = after_paper_layer(PLATEAU_AFTER_REPORTED[0])  # 18: the first layer past 1-based 18
LATE_FROM = after_paper_layer(PLATEAU_AFTER_REPORTED[1])  # 20: past the whole reported range (20/32 = 0.625)
#: "early-exit accuracy jumps only after about layer 18"
EARLY_EXIT_AFTER_REPORTED = 18
EARLY_EXIT_FROM = after_paper_layer(EARLY_EXIT_AFTER_REPORTED)  # 18
#: "the Hellinger distance is flat after layer 24" (Qwen)
HELLINGER_FLAT_AFTER_REPORTED = 24
HELLINGER_FLAT_FROM = after_paper_layer(HELLINGER_FLAT_AFTER_REPORTED)  # 24
#: LLaVA-1.5's fusion layers as printed; the indexing base is unknown
FUSION_LAYERS_REPORTED = (2, 4, 8, 11, 12, 13)
FUSION_LAYERS = paper_layers(FUSION_LAYERS_REPORTED)  # [1, 3, 7, 10, 11, 12], read as 1-based
FUSION_LAYERS_IF_ZERO_BASED = list(FUSION_LAYERS_REPORTED)
FUSION_BASE_NOTE = ("the paper does not say whether its fusion layers {2, 4, 8, 11, 12, 13} count from 0 or 1; "
                    "read here as 1-based like its other layer numbers (0-based 1, 3, 7, 10, 11, 12)")
#: the candidate-set ablation's "shallow (<16)" and "deep (>17)" of 32, read 1-based like the paper's other numbers
SHALLOW_BELOW_REPORTED, DEEP_ABOVE_REPORTED = 16, 17
SHALLOW_END = paper_layer(SHALLOW_BELOW_REPORTED)  # 15: the shallow set is 0-based layers 0-14
DEEP_FROM = after_paper_layer(DEEP_ABOVE_REPORTED)  # 17: the deep set is 0-based layers 17-31


def depth_fraction(layer0: int, n_layers: int = PAPER_N_LAYERS) -> float:
    """A 0-based layer's relative depth, ``layer0 / n_layers`` (``LATE_FROM`` -> 0.625)."""
    return layer0 / n_layers


# Layer findings, on 32-layer decoders: every layer 0-based; ``reported`` holds the numbers as the paper prints them.
_LLAVA_FAMILY = {"n_layers": PAPER_N_LAYERS, "review_layer": REVIEW_LAYER, "plateau_from": PLATEAU_FROM,
                 "reported": {"review_layer": REVIEW_LAYER_REPORTED, "plateau_after": PLATEAU_AFTER_REPORTED}}
LAYERS = {
    "llava": {**_LLAVA_FAMILY, "fusion_layers": FUSION_LAYERS, "label": "LLaVA-1.5 (reported; 0-based)",
              "reported": {**_LLAVA_FAMILY["reported"], "fusion_layers": FUSION_LAYERS_REPORTED},
              "uncertain": ["fusion-layer indexing base: " + FUSION_BASE_NOTE]},
    "llava_next": {**_LLAVA_FAMILY, "fusion_layers": None, "label": "LLaVA-NeXT (reported; 0-based)"},
    "vipllava": {**_LLAVA_FAMILY, "fusion_layers": None, "label": "VipLLaVA (reported; 0-based)"},
    "instructblip": {**_LLAVA_FAMILY, "fusion_layers": None, "label": "InstructBLIP (reported; 0-based)"},
    "qwen2_vl": {"n_layers": 28, "fusion_layers": None, "review_layer": None, "plateau_from": None,
                 "label": "Qwen2-VL (reported; 0-based)", "reported": {},
                 "uncertain": ["depth of the studied checkpoint"]},
    "qwen2_5_vl": {"n_layers": 28, "fusion_layers": None, "review_layer": None, "plateau_from": None,
                   "label": "Qwen2.5-VL (reported; 0-based)", "reported": {},
                   "uncertain": ["depth of the studied checkpoint"]},
}

CLAIMS = {
    "fusion_shallow": "Masking the image at a few shallow layers collapses accuracy (fusion layers).",
    "plateau": "After about layer 18-20 of 32, masking the image barely changes accuracy.",
    "review": "LLaVA-family models have a late review layer (about 29 of 32) where masking hurts again; "
              "Qwen2/2.5-VL do not.",
    "early_exit": "Early-exit accuracy jumps only after about layer 18 of 32.",
    "hellinger": "The Hellinger distance to the final layer's attention rises again at the review layer (LLaVA) "
                 "and is flat in late layers for Qwen.",
    "noise": "Irrelevant image regions keep high attention at every layer (persistent noise).",
    "relevant_rises": "Attention on the question-relevant region rises with depth.",
    "contrastive_gain": "Contrastive attention improves accuracy by 2.4-2.8 points on average, training-free.",
    "fusion_candidates": "Choosing the pre layer among the fusion layers beats shallow, deep or all layers.",
    "beats_baselines": "Contrastive attention beats CD, DoLa, OPERA and ViCrop (0.37-1.05 points over the best of them).",
}

# Average accuracy over GQA, VQAv2, OKVQA, VizWiz, TextVQA, DocVQA, MMBench.
MAIN_TABLE = pd.DataFrame(
    [("LLaVA-1.5", 56.34, 57.36, 57.10, 58.11, 57.60, 59.16),
     ("LLaVA-NeXT", 66.22, 65.62, 66.42, 67.73, 67.40, 68.65),
     ("Qwen2.5-VL", 75.15, 75.83, 75.84, 76.89, 77.29, 77.66)],
    columns=["backbone", "base", "CD", "DoLa", "OPERA", "ViCrop", "ours"],
)

CANDIDATE_ABLATION = pd.DataFrame(
    [("base (no contrastive attention)", 66.03, 74.06, 57.21), ("all layers", 65.40, 72.97, 52.50),
     ("deep (>17)", 60.30, 70.11, 56.10), ("shallow (<16)", 68.30, 76.49, 58.00),
     ("fusion-layer set", 69.40, 77.59, 59.80)],
    columns=["candidate set", "GQA", "VQAv2", "TextVQA"],
)  # backbone not stated (uncertain)

LATENCY_S = {"SAM": 4.187, "CLIP": 1.302, "CD": 2.871, "ViCrop": 1.357, "OPERA": 1.990, "ours": 1.392}


def reported_layers(arch: str) -> dict | None:
    """The reported layer findings for an architecture (``plots.masking_curves(reported=...)`` format), 0-based."""
    r = LAYERS.get(arch)
    if r is None or not r.get("fusion_layers") and r.get("review_layer") is None:
        return None
    return {k: r[k] for k in ("n_layers", "fusion_layers", "review_layer", "label")}


def main_gains() -> pd.DataFrame:
    """The reported gain of each method over the base model, in accuracy points."""
    t = MAIN_TABLE.set_index("backbone")
    return t.drop(columns="base").sub(t["base"], axis=0).round(2).reset_index()


__all__ = ["CITATION", "SOURCE_NOTE", "LAYERS", "CLAIMS", "MAIN_TABLE", "CANDIDATE_ABLATION", "LATENCY_S",
           "reported_layers", "main_gains", "PAPER_N_LAYERS", "paper_layer", "paper_layers", "after_paper_layer",
           "depth_fraction", "REVIEW_LAYER", "REVIEW_LAYER_REPORTED", "PLATEAU_FROM", "LATE_FROM",
           "PLATEAU_AFTER_REPORTED", "EARLY_EXIT_FROM", "EARLY_EXIT_AFTER_REPORTED", "HELLINGER_FLAT_FROM",
           "HELLINGER_FLAT_AFTER_REPORTED", "FUSION_LAYERS", "FUSION_LAYERS_REPORTED", "FUSION_LAYERS_IF_ZERO_BASED",
           "FUSION_BASE_NOTE", "SHALLOW_BELOW_REPORTED", "DEEP_ABOVE_REPORTED", "SHALLOW_END", "DEEP_FROM"]
