"""Edits: interventions on activations and attention edges, expressed as arrays.

An `Edits` value is a pytree: which site and which kind of edit are static (part of the tree
structure); masks, values, directions and factors are array leaves. So a forward pass with
edits jits, differentiates with respect to the values (attribution patching), and a batch of
edit sets with the same structure stacks into one pytree that jax.vmap sweeps in one call.

Site edits act on one capture site (vocabulary in vlm_jax.interp.sites) where `mask` is
non-zero; with x the activation, m the mask:
    set          x <- x + m * (value - x)     (zero, mean, patch from another run)
    add          x <- x + m * value           (steering, attribution deltas)
    project_out  x <- x - m * (x . u) u       (remove a direction, u unit-norm)
Masks are [L', B', T'] for residual-like sites and [L', B', T', H'] for per-head sites (q, k,
v, z), each primed axis either full or 1 (broadcast). Layers not selected have mask 0 and
are bitwise untouched.

Attention edits change attention edges (query t -> key s) in chosen layers and heads:
    scale        add log(factor) to the scores before the softmax (factor 0 blocks the edge,
                 as an attention mask would; the other edges renormalise)
    scale_post   multiply the probabilities after the softmax (no renormalisation)
"""

from __future__ import annotations

from typing import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import LlavaConfig

# Sites an edit can target, and the width axes after (batch, position).
RESIDUAL_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
HEAD_SITES = ("q", "k", "v", "z")
LAYER_EDIT_SITES = RESIDUAL_SITES + HEAD_SITES
GLOBAL_EDIT_SITES = ("text.embed", "projector.out", "vision.features", "text.final")


@flax.struct.dataclass
class SiteEdit:
    site: str = flax.struct.field(pytree_node=False)  # e.g. "text.resid_post"
    kind: str = flax.struct.field(pytree_node=False)  # set | add | project_out
    mask: jax.Array  # [L', B', T'(, H')] float32
    value: jax.Array  # [L', ...] broadcastable to the site (set/add) or [L', ..., D] unit direction

    @property
    def tower(self) -> str:
        return self.site.split(".")[0]


@flax.struct.dataclass
class AttentionEdit:
    tower: str = flax.struct.field(pytree_node=False)  # "text" | "vision"
    kind: str = flax.struct.field(pytree_node=False)  # scale | scale_post
    heads: jax.Array  # [L, H] float32: 1 where (layer, head) is edited
    edges: jax.Array  # [B', T, S] bool: query t -> key s edges to edit
    factor: jax.Array  # [] float32


@flax.struct.dataclass
class Edits:
    """An ordered set of edits for one model config (immutable; methods return new Edits)."""

    config: LlavaConfig = flax.struct.field(pytree_node=False)
    ops: tuple = ()

    def __len__(self) -> int:
        return len(self.ops)

    # -- site edits ----------------------------------------------------------------------------
    def zero(self, site: str, *, layers=None, where=None, heads=None) -> "Edits":
        """Zero-ablate `site` at the selected layers, positions (and heads)."""
        return self._site(site, "set", jnp.zeros((), jnp.float32), layers, where, heads)

    def mean(self, site: str, value, *, layers=None, where=None, heads=None) -> "Edits":
        """Mean-ablate: replace by `value` (e.g. a dataset mean [D], or per layer [L, 1, 1, D])."""
        return self._site(site, "set", value, layers, where, heads)

    def patch(self, site: str, source, *, layers=None, where=None, heads=None) -> "Edits":
        """Activation patching: replace by `source`, the same site captured on another run."""
        return self._site(site, "set", source, layers, where, heads)

    def set(self, site: str, value, *, layers=None, where=None, heads=None) -> "Edits":
        """Replace by `value` (broadcastable to the site)."""
        return self._site(site, "set", value, layers, where, heads)

    def add(self, site: str, vector, *, scale=1.0, layers=None, where=None, heads=None) -> "Edits":
        """Add `scale * vector` (steering; attribution deltas)."""
        return self._site(site, "add", jnp.asarray(vector) * scale, layers, where, heads)

    def project_out(self, site: str, direction, *, layers=None, where=None, heads=None) -> "Edits":
        """Remove the component along `direction` ([D], or [L, D] per layer)."""
        d = jnp.asarray(direction, jnp.float32)
        d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
        return self._site(site, "project_out", d, layers, where, heads)

    # -- attention edits -----------------------------------------------------------------------
    def block_attention(self, tower: str, *, layers=None, heads=None, queries=None, keys=None,
                        edges=None) -> "Edits":
        """Block attention from `queries` to `keys` (bool [B, T] / [T]) or along `edges` [B, T, S]."""
        return self._attention(tower, "scale", 0.0, layers, heads, queries, keys, edges)

    def scale_attention(self, tower: str, factor: float, *, layers=None, heads=None, queries=None, keys=None,
                        edges=None, renormalize: bool = True) -> "Edits":
        """Scale attention from `queries` to `keys` by `factor` (before the softmax when renormalize,
        i.e. the edges' weights times factor then renormalised; after it otherwise)."""
        kind = "scale" if renormalize else "scale_post"
        return self._attention(tower, kind, factor, layers, heads, queries, keys, edges)

    def diagonal_attention(self, tower: str = "vision", *, layers=None, heads=None, keep_class_token: bool = False,
                           num_tokens: int | None = None) -> "Edits":
        """Each token attends only to itself (and to the class token when keep_class_token):
        the contextualisation ablation of study C. For the text tower pass num_tokens."""
        n = self._tower_tokens(tower) if num_tokens is None else num_tokens
        keep = np.eye(n, dtype=bool)
        if keep_class_token:
            if tower == "vision" and not self.config.vision.class_token:
                raise ValueError("this vision tower has no class token (SigLIP); use keep_class_token=False")
            keep[:, 0] = True
        return self.block_attention(tower, layers=layers, heads=heads, edges=~keep[None])

    # -- internals -----------------------------------------------------------------------------
    def _tower_tokens(self, tower: str) -> int:
        if tower != "vision":
            raise ValueError("diagonal_attention on the text tower needs num_tokens (the sequence length)")
        v = self.config.vision
        return v.grid_size**2 + v.num_prefix_tokens

    def _n_layers(self, tower: str) -> int:
        return self.config.vision.num_layers if tower == "vision" else self.config.text.num_layers

    def _n_heads(self, site_or_tower: str) -> int:
        tower, _, name = site_or_tower.partition(".")
        if tower == "vision":
            return self.config.vision.num_heads
        return self.config.text.num_kv_heads if name in ("k", "v") else self.config.text.num_heads

    def _layer_select(self, tower: str, layers) -> np.ndarray | None:
        """[L] float mask of the chosen layers, or None for all layers."""
        if layers is None:
            return None
        n = self._n_layers(tower)
        chosen = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        sel = np.zeros(n, np.float32)
        for layer in chosen:
            if not -n <= int(layer) < n:
                raise IndexError(f"layer {layer} is out of range for the {n}-layer {tower} tower "
                                 f"(valid: 0..{n - 1}, or negative from the end)")
            sel[int(layer)] = 1.0
        return sel

    def _head_select(self, site_or_tower: str, heads) -> np.ndarray | None:
        if heads is None:
            return None
        n = self._n_heads(site_or_tower)
        chosen = [heads] if isinstance(heads, (int, np.integer)) else list(heads)
        sel = np.zeros(n, np.float32)
        for h in chosen:
            if not -n <= int(h) < n:
                raise IndexError(f"head {h} is out of range ({n} heads at {site_or_tower})")
            sel[int(h)] = 1.0
        return sel

    def _site(self, site, kind, value, layers, where, heads) -> "Edits":
        check_site(site)
        tower, _, name = site.partition(".")
        per_layer = site not in GLOBAL_EDIT_SITES
        if heads is not None and name not in HEAD_SITES:
            raise ValueError(f"heads= applies to per-head sites {HEAD_SITES}; {site} has no head axis")
        if not per_layer and layers is not None:
            raise ValueError(f"{site} is not a per-layer site; drop layers=")
        where_mask = jnp.ones((1, 1), jnp.float32) if where is None else _as_position_mask(where, site)
        mask = where_mask[None]  # [1, B', T']
        layer_sel = self._layer_select(tower, layers) if per_layer else None
        if layer_sel is not None:
            mask = jnp.asarray(layer_sel)[:, None, None] * mask
        if name in HEAD_SITES:
            head_sel = self._head_select(site, heads)
            mask = mask[..., None] * (1.0 if head_sel is None else jnp.asarray(head_sel))
        value = jnp.asarray(value)
        # a leading layer axis: [L, *site] values, or [L, width] directions
        layered_rank = 2 if kind == "project_out" else (5 if name in HEAD_SITES else 4)
        if per_layer and value.ndim == layered_rank:
            n = self._n_layers(tower)
            if value.shape[0] != n:
                raise ValueError(f"{site}: a per-layer value needs {n} layers on its first axis, got {value.shape}")
        else:
            value = value[None]  # shared by every layer
        return self.replace(ops=self.ops + (SiteEdit(site, kind, mask.astype(jnp.float32), value),))

    def _attention(self, tower, kind, factor, layers, heads, queries, keys, edges) -> "Edits":
        if tower not in ("text", "vision"):
            raise ValueError(f"attention edits take tower='text' or 'vision', not {tower!r}")
        if edges is None:
            if queries is None or keys is None:
                raise ValueError("give queries and keys (bool [B, T] or [T]), or edges [B, T, S]")
            q = jnp.atleast_2d(jnp.asarray(queries, bool))
            k = jnp.atleast_2d(jnp.asarray(keys, bool))
            edges = q[:, :, None] & k[:, None, :]
        edges = jnp.asarray(edges, bool)
        if edges.ndim == 2:
            edges = edges[None]
        if edges.ndim != 3:
            raise ValueError(f"edges must be [B, T, S] or [T, S]; got shape {edges.shape}")
        n_layers, n_heads = self._n_layers(tower), self._n_heads(tower)
        layer_sel = self._layer_select(tower, layers)
        head_sel = self._head_select(tower, heads)
        select = np.ones((n_layers, n_heads), np.float32)
        if layer_sel is not None:
            select *= layer_sel[:, None]
        if head_sel is not None:
            select *= head_sel[None, :]
        op = AttentionEdit(tower, kind, jnp.asarray(select), edges, jnp.asarray(factor, jnp.float32))
        return self.replace(ops=self.ops + (op,))


def _as_position_mask(where, site: str) -> jax.Array:
    """Position mask [B', T'] (float) from a bool/float array [B, T] or [T]."""
    w = jnp.asarray(where)
    if w.dtype == bool:
        w = w.astype(jnp.float32)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise ValueError(f"where= for {site} must be [batch, positions] or [positions]; got shape {w.shape}")
    return w.astype(jnp.float32)


def check_site(site: str) -> None:
    tower, _, name = site.partition(".")
    valid = [f"{t}.{n}" for t in ("vision", "text") for n in LAYER_EDIT_SITES] + list(GLOBAL_EDIT_SITES)
    if site not in valid:
        hint = " (use block_attention / scale_attention for attention patterns)" if name == "attn_pattern" else ""
        raise KeyError(f"{site!r} cannot be edited{hint}. Editable sites: {', '.join(valid)}")


def stack_edits(edit_sets: Sequence[Edits]) -> Edits:
    """One Edits whose leaves have a leading axis over `edit_sets` (for jax.vmap sweeps).

    Every set must have the same structure: the same ops in the same order on the same sites,
    with arrays of the same shapes (e.g. the same op at different layers or positions).
    """
    if not edit_sets:
        raise ValueError("stack_edits needs at least one Edits")
    structures = {jax.tree.structure(e) for e in edit_sets}
    if len(structures) != 1:
        raise ValueError("stack_edits: the edit sets differ in structure (ops, sites or kinds); a sweep "
                         "varies masks and values, not which edits exist")
    shapes = {tuple(x.shape for x in jax.tree.leaves(e)) for e in edit_sets}
    if len(shapes) != 1:
        raise ValueError("stack_edits: the edit sets' arrays differ in shape; build each with the same "
                         "arguments kinds (e.g. layers=i for every set, not layers=None for some)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *edit_sets)


def for_tower(edits: Edits | None, tower: str) -> tuple[list[SiteEdit], list[AttentionEdit]]:
    """The per-layer site edits and the attention edits of one tower."""
    if edits is None:
        return [], []
    site_ops = [op for op in edits.ops if isinstance(op, SiteEdit) and op.tower == tower
                and op.site not in GLOBAL_EDIT_SITES]
    attn_ops = [op for op in edits.ops if isinstance(op, AttentionEdit) and op.tower == tower]
    return site_ops, attn_ops


def global_ops(edits: Edits | None, site: str) -> list[SiteEdit]:
    if edits is None:
        return []
    return [op for op in edits.ops if isinstance(op, SiteEdit) and op.site == site]


def validate_against_inputs(edits: Edits | None, batch: int, tokens: int, images: int, vision_tokens: int) -> None:
    """Checks every mask and edge array against the run's shapes (before jit; clear errors)."""
    if edits is None:
        return
    for op in edits.ops:
        if isinstance(op, SiteEdit):
            tower = op.tower if op.site not in ("projector.out", "vision.features") else "vision"
            b, t = (images, vision_tokens) if tower == "vision" else (batch, tokens)
            if op.site in ("projector.out", "vision.features"):
                t = None  # P' depends on the select strategy; checked by broadcasting
            if tower == "vision" and images == 0:
                raise ValueError(f"an edit on {op.site} needs pixel_values: this run has no images")
            mb, mt = op.mask.shape[1], op.mask.shape[2]
            if mb not in (1, b) or (t is not None and mt not in (1, t)):
                raise ValueError(
                    f"edit on {op.site}: mask has (batch, positions) = ({mb}, {mt}) but the run has "
                    f"({b}, {t if t is not None else mt}); build where= from this batch (e.g. batch.image_mask)")
        else:
            b, t = (images, vision_tokens) if op.tower == "vision" else (batch, tokens)
            if op.tower == "vision" and images == 0:
                raise ValueError("a vision attention edit needs pixel_values: this run has no images")
            eb, et, es = op.edges.shape
            if eb not in (1, b) or et != t or es != t:
                raise ValueError(
                    f"{op.tower} attention edit: edges have shape ({eb}, {et}, {es}) but the run needs "
                    f"({b} or 1, {t}, {t}); build queries/keys from this batch")


def layer_slices(ops: Iterable, n_layers: int):
    """Splits ops into arrays scanned per layer (leading axis n_layers) and shared constants.

    Returns (xs, rebuild): xs is a list of per-op dicts of [n_layers, ...] arrays; rebuild(xs_i)
    gives the ops for one layer with those arrays sliced and the shared ones squeezed.
    """
    ops = list(ops)
    xs = []
    for op in ops:
        fields = ("mask", "value") if isinstance(op, SiteEdit) else ("heads",)
        xs.append({f: getattr(op, f) for f in fields if getattr(op, f).shape[0] == n_layers and n_layers > 1})

    def rebuild(xs_i):
        out = []
        for op, sliced in zip(ops, xs_i):
            fields = ("mask", "value") if isinstance(op, SiteEdit) else ("heads",)
            update = {f: sliced[f] if f in sliced else getattr(op, f)[0] for f in fields}
            out.append(op.replace(**update))
        return out

    return xs, rebuild
