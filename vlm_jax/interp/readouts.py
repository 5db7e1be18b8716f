"""Region readouts at every layer: MaxSim, keypoint cosine, Gram-matrix similarity.

All functions take stacked states with a leading layer axis ([L, T, D] for one example, or
[L, ..., D]) and return one number per layer, so a layer sweep is one call.

  maxsim_scores      study A's training-free probe: for each candidate region, the mean over
                     the reference region's tokens of the max cosine to the candidate's tokens.
  keypoint_cosine    study B's correspondence readout: features bilinearly sampled on the
                     patch grid at fractional (row, col) keypoints, compared by cosine.
  gram_similarity    study B's style readout: cosine between two regions' Gram matrices
                     F^T F, computed as ||Fa Fb^T||^2 / (||Fa Fa^T|| ||Fb Fb^T||) (no D x D).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _padded(positions: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(p) for p in positions))
    idx = np.zeros((len(positions), width), np.int32)
    valid = np.zeros((len(positions), width), bool)
    for i, p in enumerate(positions):
        idx[i, :len(p)] = p
        valid[i, :len(p)] = True
    return idx, valid


@jax.jit
def _maxsim(hidden, ref_idx, ref_valid, cand_idx, cand_valid):
    ref = _normalize(jnp.take(hidden, ref_idx, axis=1))  # [L, R, D]
    cand = _normalize(jnp.take(hidden, cand_idx.reshape(-1), axis=1))  # [L, C*M, D]
    cand = cand.reshape(hidden.shape[0], *cand_idx.shape, -1)  # [L, C, M, D]
    cos = jnp.einsum("lrd,lcmd->lcrm", ref, cand)
    cos = jnp.where(cand_valid[None, :, None, :], cos, -jnp.inf)
    best = jnp.max(cos, axis=-1)  # [L, C, R]
    return jnp.sum(jnp.where(ref_valid[None, None], best, 0.0), -1) / jnp.sum(ref_valid)


def maxsim_scores(hidden: jax.Array, ref_positions: np.ndarray, candidate_positions: Sequence[np.ndarray]) -> jax.Array:
    """[L, C] MaxSim of each candidate region to the reference region.

    hidden [L, T, D] (one example, e.g. stack of text.embed and text.resid_post, or vision
    states); ref_positions [R] and each candidate's positions: token indices into T.
    """
    ref_idx = np.asarray(ref_positions, np.int32)
    if ref_idx.size == 0 or any(len(c) == 0 for c in candidate_positions):
        raise ValueError("every region needs at least one token position")
    cand_idx, cand_valid = _padded([np.asarray(c) for c in candidate_positions])
    return _maxsim(hidden, ref_idx, np.ones(len(ref_idx), bool), cand_idx, cand_valid)


def bilinear_sample(grid: jax.Array, coords: jax.Array) -> jax.Array:
    """Samples grid [..., rows, cols, D] at fractional (row, col) coords [K, 2] -> [..., K, D].

    Integer coordinates are patch centres; points beyond the outer centres take the border
    value (clamped), as align_corners-style sampling of a feature map does.
    """
    rows, cols = grid.shape[-3], grid.shape[-2]
    r = jnp.clip(coords[:, 0], 0.0, rows - 1.0)
    c = jnp.clip(coords[:, 1], 0.0, cols - 1.0)
    r0 = jnp.clip(jnp.floor(r).astype(jnp.int32), 0, rows - 2 if rows > 1 else 0)
    c0 = jnp.clip(jnp.floor(c).astype(jnp.int32), 0, cols - 2 if cols > 1 else 0)
    r1, c1 = jnp.minimum(r0 + 1, rows - 1), jnp.minimum(c0 + 1, cols - 1)
    wr, wc = (r - r0)[:, None], (c - c0)[:, None]

    def at(ri, ci):
        return grid[..., ri, ci, :]  # [..., K, D]

    top = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
    bottom = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
    return top * (1 - wr) + bottom * wr


def grid_states(hidden: jax.Array, grid_positions: np.ndarray) -> jax.Array:
    """hidden [L, T, D] -> [L, rows, cols, D] at an image's patch positions [rows, cols]."""
    gp = np.asarray(grid_positions)
    return jnp.take(hidden, jnp.asarray(gp.reshape(-1)), axis=1).reshape(hidden.shape[0], *gp.shape, -1)


def keypoint_cosine(hidden_a: jax.Array, grid_a: np.ndarray, points_a: np.ndarray,
                    hidden_b: jax.Array, grid_b: np.ndarray, points_b: np.ndarray) -> jax.Array:
    """[L, K] cosine between features at keypoints a_k (image a) and b_k (image b).

    hidden_*: [L, T, D]; grid_*: patch positions [rows, cols]; points_*: [K, 2] fractional
    grid coordinates (ImageGeometry.to_grid). Images may share one sequence (same hidden).
    """
    fa = bilinear_sample(grid_states(hidden_a, grid_a), jnp.asarray(points_a, jnp.float32))
    fb = bilinear_sample(grid_states(hidden_b, grid_b), jnp.asarray(points_b, jnp.float32))
    return jnp.sum(_normalize(fa) * _normalize(fb), axis=-1)


def keypoint_match(hidden_a, grid_a, points_a, hidden_b, grid_b, candidates_b) -> jax.Array:
    """[L, K] index of the best-matching candidate in image b for each keypoint of image a.

    candidates_b [C, 2] fractional grid coordinates (e.g. the marked options of a BLINK item).
    """
    fa = _normalize(bilinear_sample(grid_states(hidden_a, grid_a), jnp.asarray(points_a, jnp.float32)))
    fb = _normalize(bilinear_sample(grid_states(hidden_b, grid_b), jnp.asarray(candidates_b, jnp.float32)))
    return jnp.argmax(jnp.einsum("lkd,lcd->lkc", fa, fb), axis=-1)


@jax.jit
def _gram_cos(fa, fb):
    fa = fa.astype(jnp.promote_types(fa.dtype, jnp.float32))
    fb = fb.astype(jnp.promote_types(fb.dtype, jnp.float32))
    cross = jnp.sum(jnp.square(jnp.einsum("lpd,lqd->lpq", fa, fb)), axis=(1, 2))
    self_a = jnp.sqrt(jnp.sum(jnp.square(jnp.einsum("lpd,lqd->lpq", fa, fa)), axis=(1, 2)))
    self_b = jnp.sqrt(jnp.sum(jnp.square(jnp.einsum("lpd,lqd->lpq", fb, fb)), axis=(1, 2)))
    return cross / (self_a * self_b)


def gram_similarity(features_a: jax.Array, features_b: jax.Array, center: bool = False) -> jax.Array:
    """[L] cosine similarity of the Gram matrices of two token sets [L, Pa, D] and [L, Pb, D]."""
    if center:
        features_a = features_a - jnp.mean(features_a, axis=1, keepdims=True)
        features_b = features_b - jnp.mean(features_b, axis=1, keepdims=True)
    return _gram_cos(features_a, features_b)
