"""Sweeps of edit sets in one compiled call, sharing the layers before each set's first edit.

A sweep (one ablation per layer, per position, per head...) runs the same inputs under many
edit sets of one structure. Two strategies:

* vmapped: jax.vmap of the forward pass over the stacked edit sets (any edits, any captures);
* prefix-shared: when every edit is in the text decoder, each set equals the clean run up to
  its first edited layer. The planner reads that layer from the (concrete) masks, sorts the
  sets, and runs the decoder segment by segment: the clean stream plus the sets already
  active, each new set starting from the clean stream at its first edited layer. A sweep of
  single-layer ablations over all L layers costs about L/2 + 1 passes instead of L.

Both give the same outputs as running the sets one by one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import LlavaConfig
from vlm_jax.interp.edits import GLOBAL_EDIT_SITES, Edits, SiteEdit, for_tower
from vlm_jax.models import llava, text_decoder


def first_edited_layers(stacked: Edits, n_sets: int) -> list[int] | None:
    """Per set, the first text layer an edit touches (num_layers: no edit at all), or None
    when some edit acts outside the text decoder's layers (no prefix to share)."""
    n_layers = stacked.config.text.num_layers
    first = np.full(n_sets, n_layers)
    for op in stacked.ops:
        if isinstance(op, SiteEdit):
            if op.site in GLOBAL_EDIT_SITES or op.tower != "text":
                return None
            mask = np.asarray(op.mask)  # [n_sets, L', B', T'(, H')]
            active = mask.reshape(n_sets, mask.shape[1], -1).any(axis=-1)  # [n_sets, L']
        else:
            if op.tower != "text":
                return None
            heads = np.asarray(op.heads).any(axis=-1)  # [n_sets, L]
            edges = np.asarray(op.edges).reshape(n_sets, -1).any(axis=-1)  # [n_sets]
            active = heads & edges[:, None]
        if active.shape[1] == 1:  # shared by every layer
            active = np.repeat(active, n_layers, axis=1)
        has = active.any(axis=1)
        first = np.where(has, np.minimum(first, np.argmax(active, axis=1)), first)
    return first.tolist()


def _identity_like(edits: Edits) -> Edits:
    """The same structure with every mask / head selection zero: the clean run, bitwise."""
    ops = []
    for op in edits.ops:
        if isinstance(op, SiteEdit):
            ops.append(op.replace(mask=jnp.zeros_like(op.mask)))
        else:
            ops.append(op.replace(heads=jnp.zeros_like(op.heads)))
    return edits.replace(ops=tuple(ops))


def _shared_prefix_sweep(params, config: LlavaConfig, arrays, entries: Edits, starts: tuple, logit_positions,
                         fused: bool):
    """entries: [1 + n] stacked edit sets (entry 0 = identity) sorted by start layer `starts`."""
    n_layers = config.text.num_layers
    lm = params["language_model"]
    embeds, positions, attention_mask, _ = llava.embed_inputs(params, config, arrays, fused_attention=fused)
    cuts = sorted({0, n_layers, *[s for s in starts if s < n_layers]})
    h = embeds[None]  # [1 + active, B, T, D]; stream 0 is the clean run
    active = 0
    for seg_start, seg_end in zip(cuts[:-1], cuts[1:]):
        newly = sum(1 for s in starts if s == seg_start)
        if newly:
            h = jnp.concatenate([h, jnp.broadcast_to(h[:1], (newly, *h.shape[1:]))], axis=0)
            active += newly
        seg_edits = jax.tree.map(lambda a: a[: 1 + active], entries)

        def run(h_i, edits_i, seg=(seg_start, seg_end)):
            site_ops, attention_ops = for_tower(edits_i, "text")
            return text_decoder.forward(lm, config.text, h_i, positions, attention_mask, fused=fused,
                                        site_ops=site_ops, attention_ops=attention_ops, layer_range=seg)[0]

        h = jax.vmap(run)(h, seg_edits)
    unedited = len(starts) - active  # sets that edit nothing are the clean run
    if unedited:
        h = jnp.concatenate([h, jnp.broadcast_to(h[:1], (unedited, *h.shape[1:]))], axis=0)
    final = text_decoder.final_norm(lm, config.text, h)
    if logit_positions is not None:
        final = jax.vmap(lambda f: jnp.take_along_axis(f, logit_positions[..., None], axis=1))(final)
    return text_decoder.unembed(lm, params.get("lm_head"), final)  # [1 + n, B, K, V]


_shared_prefix_sweep_jit = jax.jit(_shared_prefix_sweep, static_argnames=("config", "starts", "fused"))


def shared_prefix_sweep(params, config: LlavaConfig, arrays, stacked: Edits, starts: list[int], logit_positions,
                        fused: bool) -> jax.Array:
    """Logits [n_sets, B, K, V] of each stacked edit set, sharing computation before each set's
    first edited layer (`starts` from first_edited_layers)."""
    order = np.argsort(starts, kind="stable")
    sorted_sets = jax.tree.map(lambda a: a[order], stacked)
    identity = _identity_like(jax.tree.map(lambda a: a[:1], sorted_sets))
    entries = jax.tree.map(lambda i, s: jnp.concatenate([i, s]), identity, sorted_sets)
    sorted_starts = tuple(int(starts[i]) for i in order)
    logits = _shared_prefix_sweep_jit(params, config, arrays, entries, sorted_starts, logit_positions, fused)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return logits[1:][inverse]
