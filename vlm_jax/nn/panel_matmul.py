"""Products of a few rows with weights packed in column panels: the decode steps' products on CPU.

A decode step multiplies B rows (B = the batch, a few) with every weight matrix of the decoder and
the unembedding, so it costs the time to read those weights. XLA CPU reads a [K, N] weight at
~29 GB/s for one row, but at ~16 GB/s for 2-8 rows. `pack` lays a weight out as column panels
[P, K, 16] once (generate does it when it copies the decoder's layers out of their stack), and
`matmul` multiplies with it in the C++ kernel vlm_jax/native/panel_matmul.cc, which streams each
panel once for all rows (benchmarks/RESULTS.md has the measurements).

A packed weight is a `PackedKernel` in the parameter tree where the array was; layers._project
and text_decoder.unembed multiply with it. It is for inference only: it has no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from vlm_jax.native.build import CpuKernelLibrary

PANEL = 16  # columns per panel (the kernel's kPanel)
MAX_ROWS = 8  # rows the kernel multiplies in one pass over a panel (its kMaxRows)

LIBRARY = CpuKernelLibrary("panel_matmul", {"vlm_jax_panel_matmul": "VlmJaxPanelMatmul"},
                           fallback="decoding uses XLA's products (slower on CPU at batch 2-8)")


@dataclass(frozen=True)
class PackedKernel:
    """A weight kernel [*in_shape, *out_shape] packed as column panels [P, In, 16] (In, Out: the
    products of in_shape, out_shape; P = ceil(Out / 16), the columns past Out are zeros)."""

    panels: jax.Array
    in_shape: tuple
    out_shape: tuple

    @property
    def shape(self) -> tuple:
        """The shape of the kernel it packs."""
        return (*self.in_shape, *self.out_shape)

    @property
    def dtype(self):
        return self.panels.dtype


jax.tree_util.register_dataclass(PackedKernel, data_fields=["panels"], meta_fields=["in_shape", "out_shape"])


def available() -> bool:
    """Builds (once per machine, cached), loads and registers the kernel; False if it cannot."""
    return LIBRARY.available()


def pack(kernel: jax.Array, n_in: int) -> PackedKernel:
    """kernel [*in, *out] (its first n_in axes contracted) as column panels; float32 only."""
    if kernel.dtype != jnp.float32:
        raise ValueError(f"panel_matmul.pack takes float32 kernels (the CPU kernel's type); got {kernel.dtype}. "
                         "Fix: keep the parameters in float32, or decode with XLA's products (packing is chosen "
                         "by generate only for float32 parameters on CPU)")
    in_shape, out_shape = tuple(kernel.shape[:n_in]), tuple(kernel.shape[n_in:])
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    n_panels = -(-cols // PANEL)
    flat = jnp.pad(kernel.reshape(rows, cols), ((0, 0), (0, n_panels * PANEL - cols)))
    panels = flat.reshape(rows, n_panels, PANEL).transpose(1, 0, 2)
    return PackedKernel(panels, in_shape, out_shape)


def matmul(rows: jax.Array, packed: PackedKernel) -> jax.Array:
    """rows [M, In] @ the packed kernel -> [M, Out] (float32), in the CPU kernel."""
    if not available():
        raise RuntimeError("the panel-matmul CPU kernel is not available on this machine (see the "
                           "KernelBuildWarning, or VLM_JAX_CPU_KERNELS=0); generate decodes with XLA's products by "
                           "itself in that case")
    n_panels, depth, _ = packed.panels.shape
    if rows.ndim != 2 or rows.shape[1] != depth:
        raise ValueError(f"panel_matmul.matmul takes rows [M, {depth}] for a kernel of input shape "
                         f"{packed.in_shape}; got {tuple(rows.shape)}")
    out = jax.ShapeDtypeStruct((rows.shape[0], n_panels * PANEL), jnp.float32)
    y = jax.ffi.ffi_call("vlm_jax_panel_matmul", out, vmap_method="sequential")(rows.astype(jnp.float32),
                                                                                 packed.panels)
    return y[:, :math.prod(packed.out_shape)]
