"""Second images for two-image prompts (issue 16): moved to `fusion_utils.data.second_images`, below the experiments
that use them (the ``accuracy`` spec's crop conditions); re-exported here for the trainer's stage (e) and old imports.

>>> from fusion_utils.organisms.two_images import images_for
>>> [im.size for im in images_for(sample, "relevant")]  # [original, crop of the relevant cells]
[(96, 96), (48, 48)]
"""
from __future__ import annotations

from ..data.second_images import CELL, KINDS, images_for, irrelevant_box, random_box, relevant_box

__all__ = ["CELL", "KINDS", "relevant_box", "irrelevant_box", "random_box", "images_for"]
