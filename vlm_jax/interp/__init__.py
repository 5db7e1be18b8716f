"""Interpretability on top of the functional forward pass.

  edits        Edits: zero / mean / patch / add / project-out at any site; attention-edge
               block / scale in either tower; stack_edits for vmapped sweeps
  sweep        sweeps sharing the layers before each set's first edit
  logit_lens   chunked top-k / target ranks; study A's region Jaccard
  geometry     original-image pixels <-> patch grid through the processor
  readouts     MaxSim, keypoint cosine (bilinear), Gram similarity, per layer
  scoring      multiple choice by prefilled generation or option likelihood; blind baselines
  attribution  gradients w.r.t. additive edits; attribution patching
  lens_report  the `vlm-jax lens` PNG and table
"""

from vlm_jax.interp.attribution import attribution_patching, edit_gradient, logit_difference
from vlm_jax.interp.edits import Edits, stack_edits
from vlm_jax.interp.geometry import ImageGeometry, patch_positions
from vlm_jax.interp.logit_lens import (COLOR_WORDS, OPTION_LETTERS, LensResult, decode_ids, gather_positions,
                                       ids_for_words, label_token_ids, logit_lens, mean_pairwise_jaccard,
                                       region_token_sets, stack_residuals)
from vlm_jax.interp.readouts import gram_similarity, keypoint_cosine, keypoint_match, maxsim_scores
from vlm_jax.interp.sites import ALL_SITES

__all__ = [
    "ALL_SITES", "COLOR_WORDS", "Edits", "ImageGeometry", "LensResult", "OPTION_LETTERS", "attribution_patching",
    "decode_ids", "edit_gradient", "gather_positions", "gram_similarity", "ids_for_words", "keypoint_cosine",
    "keypoint_match", "label_token_ids", "logit_difference", "logit_lens", "maxsim_scores", "mean_pairwise_jaccard",
    "patch_positions", "region_token_sets", "stack_edits", "stack_residuals",
]
