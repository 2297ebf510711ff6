"""The paper's methods and the baselines' as pure tensor math: no model, no hooks (layer 2 of the package).

Each function takes tensors or arrays (attention maps, logits, pixel tensors, token-grid maps) and returns tensors,
indices or boxes; the experiments run the models and call these.

- `contrastive`: candidate sets, the pre-layer choice by Hellinger distance, the contrast ``I_A``;
- `softmask`: which image tokens the soft mask damps, and its default layer;
- `crop`: the paper-variant crop box, ViCrop's adaptive window and relative attention, the two-image prompt, and
  the bounds' boxes (a given set of cells, the same size at a random position);
- `vcd`: VCD's diffusion noise and its contrast with the plausibility cutoff;
- `cd`: contrastive decoding's expert − amateur score under the plausibility constraint;
- `opera`: OPERA's over-trust penalty and rollback decision;
- `dola`: DoLa's candidate buckets, premature-layer choice and relative-top contrast;
- `layers`: layer indices and depth scaling.
"""
from __future__ import annotations

from .contrastive import CANDIDATE_SETS, candidate_layers, contrastive_map, pre_layer
from .crop import (FULL_EXTENT, HIGH_RES, VICROP_LAYER_OF_32, VICROP_LAYERS, VICROP_RATIOS, attention_ratio,
                   cells_crop_box, crop_images, high_res_tiles, merge_tiles, needs_tiling, peak_crop_box,
                   random_crop_box, vicrop_box, vicrop_layer)
from .dola import DOLA_BUCKETS, dola_contrast, dola_layers, premature_choice, relative_top_filter
from ..depth import layer_index, scaled_layer
from .softmask import REVIEW_LAYER_OF_32, default_apply_layer, soft_mask_tokens
from .vcd import add_diffusion_noise, diffusion_alphas_bar, vcd_logits

__all__ = [
    "CANDIDATE_SETS", "candidate_layers", "pre_layer", "contrastive_map",
    "REVIEW_LAYER_OF_32", "soft_mask_tokens", "default_apply_layer",
    "FULL_EXTENT", "VICROP_RATIOS", "VICROP_LAYER_OF_32", "peak_crop_box", "vicrop_box", "attention_ratio",
    "vicrop_layer", "crop_images", "cells_crop_box", "random_crop_box", "VICROP_LAYERS", "HIGH_RES", "high_res_tiles", "needs_tiling", "merge_tiles",
    "diffusion_alphas_bar", "add_diffusion_noise", "vcd_logits",
    "DOLA_BUCKETS", "dola_layers", "relative_top_filter", "premature_choice", "dola_contrast",
    "layer_index", "scaled_layer",
]
