"""Rotary position embeddings, with every rope_type transformers' Llama family accepts.

The frequency tables follow transformers' modeling_rope_utils formula by formula, in float32,
so positions rotate identically. 'dynamic' and 'longrope' depend on the current sequence
length; here it is the largest position id in the batch, as in transformers, computed
on device so it stays jit-compatible.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import RopeConfig


def _exponents(dim: int) -> np.ndarray:
    return np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    """1 / base^(2i/dim) in float32, computed on the host (base is static)."""
    return (1.0 / (np.float32(base) ** _exponents(dim))).astype(np.float32)


def _yarn(rope: RopeConfig, dim: int, max_pos: int):
    base = rope.theta
    omp = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_pos / omp

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(omp / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return jnp.asarray(inv.astype(np.float32)), attention_factor


def _llama3(rope: RopeConfig, dim: int):
    inv = _base_inv_freq(rope.theta, dim)
    factor, low_ff, high_ff = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv
    inv_llama = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.asarray(np.where(is_medium, smoothed, inv_llama).astype(np.float32)), 1.0


def inv_freq_and_scale(rope: RopeConfig, dim: int, max_pos: int, seq_len: jax.Array | None = None):
    """Inverse frequencies [E/2] (float32) and the cos/sin scale for this rope config.

    `seq_len` (a scalar, possibly traced) is the current sequence length, used by 'dynamic'
    and 'longrope' only.
    """
    kind = rope.rope_type
    if kind == "default":
        return jnp.asarray(_base_inv_freq(rope.theta, dim)), 1.0
    if kind == "linear":
        return jnp.asarray(_base_inv_freq(rope.theta, dim) / np.float32(rope.factor)), 1.0
    if kind == "dynamic":
        if seq_len is None:
            seq_len = max_pos
        seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(max_pos))
        factor = jnp.float32(rope.factor)
        base = jnp.float32(rope.theta) * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** jnp.asarray(_exponents(dim))), 1.0
    if kind == "yarn":
        return _yarn(rope, dim, max_pos)
    if kind == "longrope":
        omp = rope.original_max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_pos / omp
        scale = rope.attention_factor
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omp))
        base_pow = jnp.asarray(np.float32(rope.theta) ** _exponents(dim))
        long_inv = 1.0 / (jnp.asarray(rope.long_factor, jnp.float32) * base_pow)
        short_inv = 1.0 / (jnp.asarray(rope.short_factor, jnp.float32) * base_pow)
        if seq_len is None:
            return short_inv, scale
        return jnp.where(jnp.asarray(seq_len) > omp, long_inv, short_inv), scale
    if kind == "llama3":
        return _llama3(rope, dim)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_cos_sin(rope: RopeConfig, dim: int, max_pos: int, positions: jax.Array, dtype, seq_len=None):
    """cos, sin [B, T, E] for integer positions [B, T], cast to the activations' dtype."""
    inv_freq, scale = inv_freq_and_scale(rope, dim, max_pos, seq_len)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@jax.named_scope("rope")
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, H, E] by cos/sin [B, T, E] (transformers' rotate_half convention)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
