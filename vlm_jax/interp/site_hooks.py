"""Where captures and edits meet the model: one `Sites` object per layer call.

Layers call `sites(name, x)` at every site; it applies this layer's edits for that site (in
the order they were added) and records x if the caller asked to capture it. With no edits and
no captures it returns x itself, so an empty edit set changes nothing, bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.interp.edits import AttentionEdit, SiteEdit


def apply_site_edit(op: SiteEdit, x: jax.Array) -> jax.Array:
    """Applies one (layer-sliced) site edit to x [B, T, D] or [B, T, H, E]."""
    m = op.mask  # [B', T'] or [B', T', H']
    m = m.reshape(m.shape + (1,) * (x.ndim - m.ndim)).astype(x.dtype)
    if op.kind == "project_out":
        u = op.value.astype(x.dtype)
        along = jnp.sum(x * u, axis=-1, keepdims=True)
        return x - m * along * u
    v = op.value.astype(x.dtype)
    if op.kind == "add":
        return x + m * v
    # set: exact value where m == 1, untouched where m == 0, interpolated between
    blended = x + m * (v - x)
    return jnp.where(m == 1, jnp.broadcast_to(v, x.shape), jnp.where(m == 0, x, blended))


class Sites:
    """Captures and edits for one layer (or for the non-layer sites of a forward pass)."""

    def __init__(self, wanted=frozenset(), site_ops=(), attention_ops=(), prefix: str = ""):
        self.wanted = wanted
        self.report: dict = {}
        self.by_site: dict[str, list[SiteEdit]] = {}
        for op in site_ops:
            name = op.site[len(prefix):] if prefix and op.site.startswith(prefix) else op.site
            self.by_site.setdefault(name, []).append(op)
        self.attention_ops: list[AttentionEdit] = list(attention_ops)

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        for op in self.by_site.get(name, ()):
            x = apply_site_edit(op, x)
        if name in self.wanted:
            self.report[name] = x
        return x

    def record(self, name: str, x) -> None:
        """Captures a value no edit can target (e.g. the attention pattern)."""
        if name in self.wanted and x is not None:
            self.report[name] = x


def score_editor(ops, groups: int):
    """The `score_edit` callback of nn.attention for this layer's attention edits (or None)."""
    if not ops:
        return None

    def edit(scores):
        scores, post = _edit_scores(ops, scores, groups)
        return scores, lambda probs: _edit_probs(post, probs)

    return edit


def _edit_scores(ops, scores: jax.Array, groups: int):
    """Pre-softmax edits of scores [B, K, G, T, S] (float32); returns the post-softmax ones too."""
    post = []
    for op in ops:
        heads = op.heads.reshape(-1, groups)[None, :, :, None, None] > 0  # [1, K, G, 1, 1]
        edges = op.edges[:, None, None]  # [B', 1, 1, T, S]
        selected = heads & edges
        if op.kind == "scale_post":
            post.append((selected, op.factor))
            continue
        log_factor = jnp.where(op.factor > 0, jnp.log(jnp.maximum(op.factor, 1e-30)), -jnp.inf)
        edited = jnp.maximum(scores + log_factor, jnp.finfo(scores.dtype).min)  # blocked -> masked value
        scores = jnp.where(selected, edited, scores)
    return scores, post


def _edit_probs(post, probs: jax.Array) -> jax.Array:
    for selected, factor in post:
        probs = jnp.where(selected, probs * factor.astype(probs.dtype), probs)
    return probs
