"""Decoder-only language models: Llama, Mistral and Qwen2.

They share one block (RMSNorm, RoPE attention with grouped-query heads, SwiGLU MLP) and
differ in biases (Qwen2 q/k/v, Llama's optional attention/MLP biases) and sliding windows
(Mistral everywhere, Qwen2 in chosen layers). Parameter names follow transformers.

A key/value cache is optional: with one, the T new tokens are written at `cache_index` and
attend to everything valid before them (generation); without one, the T tokens attend to
each other causally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import TextConfig
from vlm_jax.interp.edits import layer_slices
from vlm_jax.interp.site_hooks import Sites, score_editor
from vlm_jax.models.layers import gated_mlp, linear, merge_heads, project_heads, scan_layers, unrolled_layers
from vlm_jax.models.params import ParamSpec, dense, norm, stack
from vlm_jax.nn import decode_matmul
from vlm_jax.nn.attention import attention, causal_mask, mask_to_bias, merged_heads
from vlm_jax.nn.tpu_attention import MaskStructure
from vlm_jax.nn.norms import rms_norm
from vlm_jax.nn.rope import apply_rope, rope_cos_sin
from vlm_jax.sharding import constrain

# Query block of the causal attention on full sequences (no cache): measured best on CPU.
CAUSAL_BLOCK = 128

LAYER_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "attn_pattern", "q", "k", "v", "z")


def param_specs(cfg: TextConfig) -> dict:
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim

    def heads_in(n, axis, bias):
        spec = {"kernel": ParamSpec((d, n, e), ("embed", axis, "head_dim"))}
        if bias:
            spec["bias"] = ParamSpec((n, e), (axis, "head_dim"), "zeros")
        return spec

    o_proj = {"kernel": ParamSpec((cfg.num_heads, e, d), ("heads", "head_dim", "embed"))}
    if cfg.o_bias:
        o_proj["bias"] = ParamSpec((d,), ("embed",), "zeros")
    layer = {
        "input_layernorm": norm(d, "embed", bias=False),
        "self_attn": {
            "q_proj": heads_in(cfg.num_heads, "heads", cfg.qkv_bias),
            "k_proj": heads_in(cfg.num_kv_heads, "kv_heads", cfg.qkv_bias),
            "v_proj": heads_in(cfg.num_kv_heads, "kv_heads", cfg.qkv_bias),
            "o_proj": o_proj,
        },
        "post_attention_layernorm": norm(d, "embed", bias=False),
        "mlp": {
            "gate_proj": dense(d, f, "embed", "mlp", cfg.mlp_bias),
            "up_proj": dense(d, f, "embed", "mlp", cfg.mlp_bias),
            "down_proj": dense(f, d, "mlp", "embed", cfg.mlp_bias),
        },
    }
    return {
        "embed_tokens": {"embedding": ParamSpec((cfg.vocab_size, d), ("vocab", "embed"))},
        "layers": stack(layer, cfg.num_layers),
        "norm": norm(d, "embed", bias=False),
    }


def _heads(x: jax.Array, axis: str) -> jax.Array:
    """[B, T, H, E] split over heads on the tensor axis (under a mesh)."""
    return constrain(x, ("batch", "length", axis, None))


def _layer(cfg: TextConfig, wanted: frozenset, fused: bool, biases, cos, sin, cache_index, rebuild_edits,
           attn_edit_free: bool, prefill: bool = False, stacked_cache: bool = False, final_rows: int | None = None,
           structure: MaskStructure | None = None):
    """One decoder layer as a scan body. final_rows: only the last `final_rows` positions' outputs
    are computed (their queries, attention, output projection and MLP); every position's keys and
    values are still computed and cached. h comes out [B, final_rows, D]. structure: every
    layer's mask by its structure, for the fused path's TPU kernel (None: it has none)."""
    groups = cfg.num_heads // cfg.num_kv_heads
    q_cos, q_sin = (cos, sin) if final_rows is None else (cos[:, -final_rows:], sin[:, -final_rows:])

    def layer(p: dict, carry, per_layer: dict, index):
        # with a cache the scan carries (h, cache): each layer writes its slots in place
        h, cache = carry if isinstance(carry, tuple) else (carry, None)
        batch, t_len = h.shape[:2]
        site_ops, attn_ops = rebuild_edits(per_layer["edits"])
        sites = Sites(wanted, site_ops, attn_ops, prefix="text.")
        h = sites("resid_pre", constrain(h, ("batch", "length", "act_embed")))
        x = rms_norm(h, p["input_layernorm"], cfg.rms_norm_eps)
        attn_p = p["self_attn"]
        x_q = x if final_rows is None else x[:, -final_rows:]
        with jax.named_scope("qkv_proj"):
            q = sites("q", apply_rope(_heads(project_heads(x_q, attn_p["q_proj"]), "act_heads"), q_cos, q_sin))
            k = sites("k", apply_rope(_heads(project_heads(x, attn_p["k_proj"]), "act_kv_heads"), cos, sin))
            v = sites("v", _heads(project_heads(x, attn_p["v_proj"]), "act_kv_heads"))
        report = sites.report
        blocked = cache is None or prefill
        if cache is not None:  # write the new keys/values into this layer's slots of the cache
            # in the layout the attention's products read (init_cache), so each product reads
            # the very buffer the write updated in place. A stacked cache [L, ...] is written at
            # this layer's index.
            def write(buffer, new):
                slots = buffer.shape[1:] if stacked_cache else buffer.shape
                new = new.transpose(0, 2, 1, 3).reshape(*slots[:-2], t_len, slots[-1]).astype(buffer.dtype)
                start = (*(0,) * (new.ndim - 2), cache_index, 0)
                if stacked_cache:
                    return jax.lax.dynamic_update_slice(buffer, new[None], (index, *start))
                return jax.lax.dynamic_update_slice(buffer, new, start)

            def read(buffer):  # -> [B, S, K, E], the layout attention() takes
                heads = jax.lax.dynamic_index_in_dim(buffer, index, keepdims=False) if stacked_cache else buffer
                return heads.reshape(batch, -1, *heads.shape[-2:]).transpose(0, 2, 1, 3)

            cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
            if not prefill:  # a prefill attends to its own keys only: the later slots are still empty
                k, v = read(cache["k"]), read(cache["v"])
        bias = biases[per_layer["mask_kind"]] if biases.shape[0] > 1 else biases[0]
        if final_rows is not None:
            h, bias = h[:, -final_rows:], bias[:, :, -final_rows:]
        want_pattern = "attn_pattern" in wanted
        out, pattern = attention(
            q, k, v, scale=cfg.head_dim**-0.5, bias=bias, return_pattern=want_pattern,
            fused=fused and not want_pattern and attn_edit_free, score_edit=score_editor(attn_ops, groups),
            causal_block=CAUSAL_BLOCK if blocked else None, structure=structure,
        )
        sites.record("attn_pattern", pattern)
        with jax.named_scope("out_proj"):
            attn_out = sites("attn_out", merge_heads(sites("z", out), attn_p["o_proj"]))
        h = sites("resid_mid", h + attn_out)
        x = rms_norm(h, p["post_attention_layernorm"], cfg.rms_norm_eps)
        h = sites("resid_post", h + sites("mlp_out", gated_mlp(x, p["mlp"], cfg.hidden_act)))
        return (h if cache is None else (h, cache)), report

    return layer


@jax.named_scope("text_decoder")
def forward(
    params: dict,
    cfg: TextConfig,
    embeds: jax.Array,
    positions: jax.Array,
    key_valid: jax.Array,
    *,
    capture: frozenset = frozenset(),
    fused: bool = False,
    cache: dict | None = None,
    cache_index: jax.Array | int = 0,
    site_ops=(),
    attention_ops=(),
    layer_range: tuple[int, int] | None = None,
    remat: bool | str = False,
    final_rows: int | None = None,
):
    """Runs every decoder layer (or the layers in `layer_range` = (start, end)).

    Args:
      params: the decoder's parameters; "layers" stacked [L, ...] (run with lax.scan) or a
        tuple of per-layer trees (unstack_layers; run unrolled).
      embeds: [B, T, D] input embeddings (image features already merged in).
      positions: [B, T] rotary position ids.
      key_valid: [B, S] False at padding; S = T without a cache, else the cache length.
      capture: per-layer sites (LAYER_SITES) to return stacked [L, ...].
      cache: {'k', 'v': [L, B, K, S, E]} (init_cache), a tuple of per-layer caches
        {'k', 'v': [B, K, S, E]} (init_cache(..., per_layer=True), with unstacked layers) or None.
      cache_index: slot of the first of the T tokens in the cache.
      site_ops, attention_ops: this tower's edits (vlm_jax.interp.edits).
      layer_range: run only layers start..end-1 (embeds is then layer start's input); used by
        sweeps that share the layers before an edit.
      final_rows: a prefill (stacked layers, no capture or edits) whose next token needs only the
        last `final_rows` positions: the last layer computes its queries, attention, output
        projection and MLP there only (every position's keys and values still fill the cache),
        and h comes back [B, final_rows, D]. For the CPU preset's 8 layers, 1/8 of the MLP and
        attention work.

    Returns:
      (h [B, T, D] after the last layer, before the final norm; {site: [L, ...]};
       updated cache or None).
    """
    t_len = embeds.shape[1]
    query_index = cache_index + jnp.arange(t_len)
    # A prefill (the first T tokens into an empty cache) attends only to its T keys, with the
    # blocked causal attention of cache-free forwards, instead of to every cache slot.
    prefill = cache is not None and isinstance(cache_index, int) and cache_index == 0 and t_len > 1
    if prefill:
        key_valid = key_valid[:, :t_len]
    key_index = jnp.arange(key_valid.shape[1])
    # Dynamic/longrope scaling depends on the sequence length, as in transformers.
    seq_len = jnp.max(positions) + 1
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions, embeds.dtype, seq_len)
    kinds = sorted(set(cfg.sliding_windows), key=lambda w: -1 if w is None else w)
    biases = jnp.stack([mask_to_bias(causal_mask(key_valid, query_index, key_index, w)) for w in kinds])
    # The TPU kernel builds its mask from structure, which it can do when every layer has the same
    # kind of mask (a per-layer kind is picked inside the scan) over the sequence's own slots.
    own_slots = isinstance(cache_index, int) and cache_index == 0 and (cache is None or prefill)
    structure = MaskStructure(key_valid, causal=True, window=kinds[0]) if own_slots and len(kinds) == 1 else None
    edit_xs, rebuild = layer_slices([*site_ops, *attention_ops], cfg.num_layers)
    n_site = len(site_ops)

    def rebuild_edits(xs_i):
        ops = rebuild(xs_i)
        return ops[:n_site], ops[n_site:]

    per_layer = {
        "mask_kind": jnp.asarray([kinds.index(w) for w in cfg.sliding_windows], jnp.int32),
        "edits": edit_xs,
    }
    stacked = params["layers"]
    unstacked = isinstance(stacked, (list, tuple))  # unstack_layers: run unrolled
    if final_rows is not None and (not prefill or unstacked or capture or site_ops or attention_ops
                                   or layer_range is not None):
        raise ValueError("final_rows is for a prefill of every stacked layer with no capture or edits (generate's)")
    if layer_range is not None:
        if cache is not None:
            raise ValueError("layer_range runs a slice of the layers and cannot update a key/value cache; pass "
                             "cache=None (sweeps run cache-free forwards).")
        start, end = layer_range
        per_layer = jax.tree.map(lambda a: a[start:end], per_layer)
        if unstacked:
            stacked = stacked[start:end]
        else:
            stacked = jax.tree.map(lambda a: a[start:end], stacked)
    layer = _layer(cfg, frozenset(capture), fused, biases, cos, sin, cache_index, rebuild_edits, not attention_ops,
                   prefill, stacked_cache=cache is not None and not unstacked, structure=structure)
    if unstacked:
        return unrolled_layers(layer, embeds, stacked, per_layer, states=cache, remat=remat)
    if cache is None:
        h, report = scan_layers(layer, embeds, stacked, per_layer, remat=remat)
        return h, report, None
    # The cache rides in the scan carry, not in xs/ys: layer i updates its slots in place, where
    # slicing it in as xs and stacking it back as ys would copy the whole cache on every step.
    carry = (embeds, {"k": cache["k"], "v": cache["v"]})
    if final_rows is None:
        (h, new_cache), report = scan_layers(layer, carry, stacked, per_layer, remat=remat)
        return h, report, new_cache
    last = cfg.num_layers - 1

    def first_layers(carry, index):
        # the stack indexed inside the loop: a slice [:last] taken before it is a copy of those
        # layers' weights (7 ms of a 240 ms batch-1 prefill of the CPU preset)
        layer_params, layer_extras = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False),
                                                  (stacked, per_layer))
        return layer(layer_params, carry, layer_extras, index)

    carry, _ = jax.lax.scan(first_layers, carry, jnp.arange(last))
    final_layer = _layer(cfg, frozenset(), fused, biases, cos, sin, cache_index, rebuild_edits, True, prefill,
                         stacked_cache=True, final_rows=final_rows)
    layer_params, layer_extras = jax.tree.map(lambda a: a[last], (stacked, per_layer))
    (h, new_cache), _ = final_layer(layer_params, carry, layer_extras, last)
    return h, {}, new_cache


def unstack_layers(params: dict) -> dict:
    """The decoder's parameters with "layers" as a tuple of per-layer trees instead of one
    stacked tree: `forward` then runs the layers unrolled (layers.unrolled_layers). Costs one copy of
    the layer weights; worth it where the same weights are read many times (decode steps)."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))}


# the weight products of a decoder layer: (module, projection) -> how many leading axes of its
# kernel are contracted (layers._project)
PROJECTIONS = {("self_attn", "q_proj"): 1, ("self_attn", "k_proj"): 1, ("self_attn", "v_proj"): 1,
               ("self_attn", "o_proj"): 2, ("mlp", "gate_proj"): 1, ("mlp", "up_proj"): 1, ("mlp", "down_proj"): 1}


def decode_kernels(params: dict, lm_head: dict | None, form: str) -> tuple[dict, dict | None]:
    """The decoder's parameters with its weight kernels in a form for the CPU kernels of
    nn/decode_matmul.py, which read them at memory speed for a few rows (decode steps):
      "stacked": layer i's kernels are references into the stacked kernels (StackedKernel; no
        copy); the unembedding too, unless the embeddings are tied (then XLA's product stays);
      "packed": every kernel and the unembedding copied into column panels (PackedKernel); tied
        embeddings get a packed copy of the embedding's transpose.
    The layers come back unstacked (a tuple of per-layer trees, run unrolled: layers.
    unrolled_layers); their small parameters (norms, biases) are sliced out. Inference only.
    Returns (params, lm_head)."""
    if form not in ("stacked", "packed"):
        raise ValueError(f"form must be 'stacked' or 'packed'; got {form!r}")
    stacked = params["layers"]
    if isinstance(stacked, (list, tuple)):
        raise ValueError("decode_kernels takes the decoder with stacked layers (as loaded), not unstack_layers'")

    def kernel_of(stack: jax.Array, i: int, n_in: int):
        return decode_matmul.layer_of(stack, i, n_in) if form == "stacked" else decode_matmul.pack(stack[i], n_in)

    def with_kernels(i: int, layer: dict) -> dict:
        # the sliced kernels unstack_layers gave are replaced (unused, jit drops them)
        layer = dict(layer)
        for (module, name), n_in in PROJECTIONS.items():
            projection = {**layer[module][name], "kernel": kernel_of(stacked[module][name]["kernel"], i, n_in)}
            layer[module] = {**layer[module], name: projection}
        return layer

    if lm_head is not None:
        kernel = lm_head["kernel"]
        lm_head = {**lm_head, "kernel": kernel_of(kernel[None], 0, 1)}  # [None]: a stack of one (no copy)
    elif form == "packed":
        lm_head = {"kernel": decode_matmul.pack(params["embed_tokens"]["embedding"].T, 1)}
    layers = unstack_layers(params)["layers"]
    return {**params, "layers": tuple(with_kernels(i, layer) for i, layer in enumerate(layers))}, lm_head


def split_cache(stacked: dict, extra_slots: int) -> tuple:
    """A stacked cache {'k', 'v': [L, *rows, S, E]} (init_cache) as per-layer caches
    {'k', 'v': [*rows, S + extra_slots, E]} (init_cache(..., per_layer=True)), with extra_slots
    empty slots after the filled ones: a prefill runs on the stacked layers, the decode steps on
    per-layer parameters (unstack_layers or decode_kernels)."""
    def layer(buffer, i):
        slots = [(0, 0)] * (buffer.ndim - 1)
        slots[-2] = (0, extra_slots)
        return jnp.pad(buffer[i], slots)

    n = stacked["k"].shape[0]
    return tuple({"k": layer(stacked["k"], i), "v": layer(stacked["v"], i)} for i in range(n))


@jax.named_scope("unembed")
def final_norm(params: dict, cfg: TextConfig, h: jax.Array) -> jax.Array:
    return rms_norm(h, params["norm"], cfg.rms_norm_eps)


@jax.named_scope("unembed")
def unembed(params: dict, lm_head: dict | None, h: jax.Array) -> jax.Array:
    """Logits [..., V] from final-normed states [..., D] (tied embeddings when lm_head is None)."""
    if lm_head is not None and isinstance(lm_head["kernel"], decode_matmul.KERNEL_FORMS):
        logits = linear(h, lm_head)  # decode steps on CPU (decode_kernels)
    elif lm_head is None:
        logits = jnp.einsum("...d,vd->...v", h, params["embed_tokens"]["embedding"])
    else:
        logits = jnp.einsum("...d,dv->...v", h, lm_head["kernel"])
    return constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("act_vocab",))


def init_cache(cfg: TextConfig, batch: int, length: int, dtype, per_layer: bool = False) -> dict | tuple:
    """An empty key/value cache of `length` slots: {'k', 'v': [L, B*K, S, E]}, or with per_layer
    a tuple of L caches {'k', 'v': [B*K, S, E]} (for unstack_layers parameters); row b*K + j
    holds sequence b's kv head j.

    That is the layout the attention's products read (nn.attention: "heads"), so a decode step
    reads the very buffer it updated in place. Stored [B, K, S, E], the product read a reshape
    of the write, and XLA CPU copied each layer's cache several times in every decode step
    (benchmarks/RESULTS.md). Under a mesh that splits the kv heads the products keep B and K
    apart, and so does the cache: [(L,) B, K, S, E]."""
    rows = (batch * cfg.num_kv_heads,) if merged_heads() else (batch, cfg.num_kv_heads)
    shape = (*rows, length, cfg.head_dim)
    if per_layer:
        return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers))
    shape = (cfg.num_layers, *shape)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
