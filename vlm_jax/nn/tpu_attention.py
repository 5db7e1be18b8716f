"""The fused attention on TPU: the splash-attention Pallas kernel
(jax.experimental.pallas.ops.tpu.splash_attention, the kernel MaxText runs).

jax.nn.dot_product_attention has no TPU kernel: there implementation=None means XLA's softmax
over the whole [T, S] score matrix, written to memory and read back, forward and backward. Splash
attention is a flash-style kernel. It keeps a block of scores on chip, skips the blocks its mask
hides entirely (about half of a causal mask), and has its own backward kernels.

It builds its mask from structure, not from a dense bias:
- a static mask over slots (causal, causal with a sliding window, or full);
- per-token segment ids, dynamic: a query reads only keys of its own segment.

So the fused path passes `MaskStructure` beside the bias the other paths use. Real tokens are
segment 1 and padding is segment 0.
- A real query reads exactly the keys the bias lets it read, so real positions agree with the
  other paths to rounding.
- A padded query reads the padded keys before it (itself at least) instead of every key, so the
  outputs at padded positions, which no real position reads, differ from the other paths'.

Sequences are padded to a multiple of the kernel's 128-row blocks. The padding is segment 0,
so it is invisible to real queries, and it is cut off the output.

Under a mesh (jax.set_mesh with vlm_jax's axes) the kernel runs in shard_map: batch over data
and fsdp, heads over tensor (ACTIVATION_RULES), the sequence whole. The heads are split only
when the tensor axis divides the kv heads, so each shard holds whole query groups.

VLM_JAX_TPU_ATTENTION:
- `interpret` runs the same kernel through Pallas's interpreter on any backend. The tests use it
  to check this path on CPU; it is slow.
- `off` keeps XLA's kernel on TPU too.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from vlm_jax.sharding import ACTIVATION_RULES, _current_mesh, spec_for

BLOCK = 128  # rows of q and of k/v per kernel block (splash's default block sizes)


class MaskStructure(NamedTuple):
    """The text decoder's mask by its structure: key s is visible to query t when both are in
    the same segment (`key_valid`: padding or not), s <= t if `causal`, and s > t - `window` if a
    window is set. Queries and keys are the same T slots."""

    key_valid: jax.Array | None  # [B, T] bool, False at padding; None: no padding
    causal: bool = True
    window: int | None = None


def mode() -> str:
    """'kernel' (on TPU), 'interpret' (any backend, through Pallas's interpreter) or 'off', from
    VLM_JAX_TPU_ATTENTION and the backend."""
    setting = os.environ.get("VLM_JAX_TPU_ATTENTION", "").strip().lower()
    if setting in ("off", "0", "xla"):
        return "off"
    if setting == "interpret":
        return "interpret" if _splash_available() else "off"
    if setting not in ("", "1", "on", "kernel"):
        raise ValueError(f"VLM_JAX_TPU_ATTENTION={setting!r}: expected 'interpret', 'off' or unset")
    return "kernel" if jax.default_backend() == "tpu" and _splash_available() else "off"


@functools.lru_cache(maxsize=1)
def _splash_available() -> bool:
    """Whether this JAX ships the splash kernel; if not, the fused path on TPU keeps XLA's."""
    try:
        importlib.import_module("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel")
    except ImportError as error:
        warnings.warn(f"the splash-attention kernel is not importable from this JAX ({error}); the fused "
                      f"attention on TPU runs XLA's kernel. Fix: upgrade jax.", stacklevel=2)
        return False
    return True


def usable(t_len: int, s_len: int) -> bool:
    """Whether the fused attention of T queries over S keys runs the splash kernel: on TPU (or
    in interpret mode), for sequences attending to their own slots (T == S > 1). Decode steps
    (one query against a cache) keep XLA's kernel."""
    return t_len == s_len and t_len > 1 and mode() != "off"


@functools.lru_cache(maxsize=None)
def warn_unsupported(reason: str, q_shape: tuple) -> None:
    """Warns (once per shape and reason) that the kernel refused these heads, so XLA's runs."""
    warnings.warn(f"the splash-attention kernel of this JAX refused queries {q_shape} ({reason}); that attention "
                  f"runs XLA's kernel instead. Fix: upgrade jax (older kernels need head sizes that are multiples "
                  f"of 128), or set VLM_JAX_TPU_ATTENTION=off to silence this.", stacklevel=3)


def _one_head_mask(length: int, causal: bool, window: int | None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    if window is not None:
        if not causal:
            raise ValueError("a sliding window is supported for causal masks only")
        return masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)  # s in (t - window, t]
    return masks.CausalMask(shape) if causal else masks.FullMask(shape)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, causal: bool, window: int | None, shared_kv: bool, interpret: bool,
            residual_name: str | None):
    """The splash kernel of one sequence: `heads` query heads of `length` (a multiple of BLOCK)
    rows; shared_kv: they all read one kv head (the MQA form, for a GQA group), else one kv
    head each. Its output and log-sum-exp carry the checkpoint name `residual_name`, so a remat
    policy can keep them (without, the backward runs the forward kernel again). Built once per
    shape: its mask is analysed block by block on the host."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([_one_head_mask(length, causal, window)] * heads)
    make = splash.make_splash_mqa_single_device if shared_kv else splash.make_splash_mha_single_device
    # the kernel holds its mask's block tables as arrays: made inside a trace (this is called from
    # one) they would be that trace's tracers, which the cache would carry into the next trace
    with jax.ensure_compile_time_eval():
        return make(mask, block_sizes=splash.BlockSizes.get_default(), interpret=interpret,
                    residual_checkpoint_name=residual_name)


def _attention_here(q, k, v, segments, *, scale: float, kernel):
    """splash attention on this device's arrays: q [B, T, H, E], k/v [B, T, K, E], segments
    [B, T] int32 (1 real, 0 padding) -> [B, T, H, E]. kernel: _kernel's for these shapes."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    batch, t_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    groups = n_heads // n_kv
    length = _padded(t_len)
    pad = ((0, 0), (0, length - t_len))
    segments = jnp.pad(segments, pad)  # block padding: segment 0, unseen by real queries
    # The kernel has no scale: q is scaled first (exact when sqrt(E) is a power of 2, else one
    # more rounding of q). [B, K, G, T', E] and [B, K, T', E]: heads major, as the kernel takes them.
    q = jnp.pad((q * jnp.asarray(scale, q.dtype)).reshape(batch, t_len, n_kv, groups, head_dim), pad + ((0, 0),) * 3)
    q = q.transpose(0, 2, 3, 1, 4)
    k, v = (jnp.pad(x, pad + ((0, 0),) * 2).transpose(0, 2, 1, 3) for x in (k, v))

    if groups == 1:  # one kv head per query head
        def sequence(q_b, k_b, v_b, seg):  # [K, 1, T', E], [K, T', E], [K, T', E], [T']
            return kernel(q_b[:, 0], k_b, v_b, segment_ids=SegmentIds(q=seg, kv=seg))[:, None]
    else:  # each kv head's group of query heads shares it
        def sequence(q_b, k_b, v_b, seg):
            return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=SegmentIds(q=seg, kv=seg)))(q_b, k_b, v_b)

    out = jax.vmap(sequence)(q, k, v, segments)  # [B, K, G, T', E]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, n_heads, head_dim)[:, :t_len]


def _padded(t_len: int) -> int:
    return -(-t_len // BLOCK) * BLOCK


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     structure: MaskStructure | None, residual_name: str | None = None) -> jax.Array:
    """Attention of q [B, T, H, E] over k, v [B, T, K, E] (K dividing H) through the splash
    kernel, with the mask `structure` describes (None: every key visible). Returns [B, T, H, E]
    in q's dtype. Under a mesh it runs per shard (see the module docstring). residual_name:
    the checkpoint name of the kernel's residuals (its output and log-sum-exp)."""
    batch, t_len = q.shape[:2]
    if k.shape[1] != t_len:
        raise ValueError(f"the splash kernel takes queries and keys over the same slots; got T={t_len}, "
                         f"S={k.shape[1]}")
    structure = structure or MaskStructure(None, causal=False)
    valid = structure.key_valid
    segments = (jnp.ones((batch, t_len), jnp.int32) if valid is None
                else jnp.broadcast_to(valid, (batch, t_len)).astype(jnp.int32))
    n_kv, groups = k.shape[2], q.shape[2] // k.shape[2]
    mesh = _current_mesh()
    tensor = 1 if mesh is None else mesh.shape["tensor"]
    head_shards = tensor if tensor > 1 and n_kv % tensor == 0 else 1  # whole GQA groups per shard
    # built here, outside shard_map: its mask tables are then plain constants, not values of one mesh's shards
    kernel = _kernel(groups if groups > 1 else n_kv // head_shards, _padded(t_len), structure.causal, structure.window,
                     groups > 1, mode() == "interpret", residual_name)
    run = functools.partial(_attention_here, scale=scale, kernel=kernel)
    if mesh is None:
        return run(q, k, v, segments).astype(q.dtype)
    batch_spec = spec_for((batch,), ("batch",), mesh, ACTIVATION_RULES)[0][0]
    heads = PartitionSpec(batch_spec, None, "tensor" if head_shards > 1 else None, None)
    sharded = jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, PartitionSpec(batch_spec, None)),
                            out_specs=heads, check_vma=False)
    return sharded(q, k, v, segments).astype(q.dtype)
