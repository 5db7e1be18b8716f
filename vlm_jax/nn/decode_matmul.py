"""The products of a decode step on CPU: a few rows times every weight matrix, at memory speed.

A decode step multiplies B rows (B = the batch, a few) with every weight matrix of the decoder and
the unembedding, so it costs the time to read those weights. XLA CPU reads a [K, N] weight at
~29 GB/s for one row but at ~16 GB/s for 2-8 rows, and before that generate had to copy every
layer's weights out of their stack (inside the decode loop XLA copies a slice before its product
reads it). The C++ kernels of vlm_jax/native/decode_matmul.cc read the weights at memory speed for
up to 8 rows (more in passes of 8), in one of two forms that stand in the parameter tree where the
kernel array was:

- `StackedKernel`: layer i of a stacked kernel [L, *in, *out], read where it is: no copy at all.
- `PackedKernel`: a kernel copied once into column panels [P, In, 16] (`pack`), which the kernel
  streams once for all rows. With AVX2 vectors it is faster per product for many rows (at 4 rows
  ~15%; at 8, ~1.4x), for a copy of every weight per generate call; with AVX-512 the stacked
  kernel is as fast (`vector_lanes`). generate.decode_kernel_form picks the form.

layers._project and text_decoder.unembed multiply with either (`matmul`). Inference only: they
have no gradient. benchmarks/RESULTS.md has the measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.native.build import CpuKernelLibrary

PANEL = 16  # columns per panel (the kernel's kPanel)
MAX_ROWS = 8  # rows the kernels multiply in one pass over the weights (their kMaxRows)

LIBRARY = CpuKernelLibrary(
    "decode_matmul", {"vlm_jax_stacked_matmul": "VlmJaxStackedMatmul", "vlm_jax_panel_matmul": "VlmJaxPanelMatmul"},
    fallback="decoding uses XLA's products (slower on CPU)")


@dataclass(frozen=True)
class _KernelForm:
    """A weight kernel [*in_shape, *out_shape] (its first len(in_shape) axes contracted), held in
    another layout."""

    in_shape: tuple
    out_shape: tuple

    @property
    def shape(self) -> tuple:
        """The shape of the kernel it stands for."""
        return (*self.in_shape, *self.out_shape)


@dataclass(frozen=True)
class StackedKernel(_KernelForm):
    """Layer `layer` of a stacked kernel `stack` [L, *in_shape, *out_shape]."""

    stack: jax.Array
    layer: int


@dataclass(frozen=True)
class PackedKernel(_KernelForm):
    """The kernel packed as column panels [P, In, 16] (In, Out: the products of in_shape,
    out_shape; P = ceil(Out / 16), the columns past Out are zeros)."""

    panels: jax.Array


jax.tree_util.register_dataclass(StackedKernel, data_fields=["stack"], meta_fields=["layer", "in_shape", "out_shape"])
jax.tree_util.register_dataclass(PackedKernel, data_fields=["panels"], meta_fields=["in_shape", "out_shape"])
KERNEL_FORMS = (StackedKernel, PackedKernel)


def vector_lanes() -> int:
    """The lanes of the kernels' vectors as built for this machine: 16 with AVX-512, else 8; 0
    where the kernels are not available."""
    lanes = LIBRARY.c_function("VlmJaxDecodeMatmulVectorLanes")
    return int(lanes()) if lanes is not None else 0


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernels; False if they cannot."""
    return LIBRARY.available()


def _float32(kernel: jax.Array, what: str) -> None:
    if kernel.dtype != jnp.float32:
        raise ValueError(f"decode_matmul.{what} takes float32 kernels (the CPU kernels' type); got {kernel.dtype}. "
                         "Fix: keep the parameters in float32, or decode with XLA's products (generate uses these "
                         "kernels only for float32 parameters on CPU)")


def layer_of(stack: jax.Array, layer: int, n_in: int) -> StackedKernel:
    """Layer `layer` of a stacked kernel [L, *in, *out] (its first n_in axes after L contracted)."""
    _float32(stack, "layer_of")
    if not 0 <= layer < stack.shape[0]:
        raise ValueError(f"layer {layer} is outside the stack of {stack.shape[0]} layers")
    return StackedKernel(in_shape=tuple(stack.shape[1:1 + n_in]), out_shape=tuple(stack.shape[1 + n_in:]),
                         stack=stack, layer=int(layer))


def pack(kernel: jax.Array, n_in: int) -> PackedKernel:
    """kernel [*in, *out] (its first n_in axes contracted) as column panels; float32 only."""
    _float32(kernel, "pack")
    in_shape, out_shape = tuple(kernel.shape[:n_in]), tuple(kernel.shape[n_in:])
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    n_panels = -(-cols // PANEL)
    flat = jnp.pad(kernel.reshape(rows, cols), ((0, 0), (0, n_panels * PANEL - cols)))
    panels = flat.reshape(rows, n_panels, PANEL).transpose(1, 0, 2)
    return PackedKernel(in_shape=in_shape, out_shape=out_shape, panels=panels)


def matmul(rows: jax.Array, kernel: StackedKernel | PackedKernel) -> jax.Array:
    """rows [M, In] @ the kernel -> [M, Out] (float32), in the CPU kernels."""
    if not available():
        raise RuntimeError("the decode-matmul CPU kernels are not available on this machine (see the "
                           "KernelBuildWarning, or VLM_JAX_CPU_KERNELS=0); generate decodes with XLA's products by "
                           "itself in that case")
    depth, width = math.prod(kernel.in_shape), math.prod(kernel.out_shape)
    if rows.ndim != 2 or rows.shape[1] != depth:
        raise ValueError(f"decode_matmul.matmul takes rows [M, {depth}] for a kernel of input shape "
                         f"{kernel.in_shape}; got {tuple(rows.shape)}")
    rows = rows.astype(jnp.float32)
    if isinstance(kernel, StackedKernel):
        stack = kernel.stack.reshape(kernel.stack.shape[0], depth, width)  # free: row-major
        out = jax.ShapeDtypeStruct((rows.shape[0], width), jnp.float32)
        return jax.ffi.ffi_call("vlm_jax_stacked_matmul", out, vmap_method="sequential")(
            rows, stack, layer=np.int64(kernel.layer))
    out = jax.ShapeDtypeStruct((rows.shape[0], kernel.panels.shape[0] * PANEL), jnp.float32)
    y = jax.ffi.ffi_call("vlm_jax_panel_matmul", out, vmap_method="sequential")(rows, kernel.panels)
    return y[:, :width]
