"""LlavaForConditionalGeneration as one pure function.

    forward(params, config, inputs, *, capture=()) -> Output(logits, acts)

`inputs` holds the arrays transformers' processor returns (input_ids [B, T],
attention_mask [B, T], pixel_values [N, C, H, W]; optional position_ids [B, T]). Image
features replace the image-token embeddings with a gather over a cumulative count, which
is jit-safe where transformers' masked_scatter is dynamic-shape.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from vlm_jax.config import LlavaConfig
from vlm_jax.interp.edits import Edits, for_tower, global_ops
from vlm_jax.interp.site_hooks import apply_site_edit
from vlm_jax.interp.sites import layer_sites, validate_capture
from vlm_jax.models import params as P
from vlm_jax.models import projector, text_decoder, vision_tower
from vlm_jax.sharding import constrain


@flax.struct.dataclass
class Output:
    """logits [B, T, V] (or [B, len(logit_positions), V]); acts {site: array}; cache or None.

    token_index [B, T]: where each input token sits in the outputs when a soft prompt was
    inserted (None otherwise: the identity)."""

    logits: jax.Array | None
    acts: dict
    cache: dict | None = None
    token_index: jax.Array | None = None


def param_specs(cfg: LlavaConfig) -> dict:
    specs = {
        "vision_tower": vision_tower.param_specs(cfg.vision),
        "multi_modal_projector": projector.param_specs(cfg),
        "language_model": text_decoder.param_specs(cfg.text),
    }
    if not cfg.text.tie_word_embeddings:
        specs["lm_head"] = {
            "kernel": P.ParamSpec((cfg.text.hidden_size, cfg.text.vocab_size), ("embed", "vocab"))
        }
    return specs


def init_params(cfg: LlavaConfig, rng: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) weights) for tests and toy models."""
    return P.init_from_specs(param_specs(cfg), rng, dtype, std)


def abstract_params(cfg: LlavaConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every parameter, from jax.eval_shape (nothing is allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))


def logical_axes(cfg: LlavaConfig) -> dict:
    """Logical axis names of every parameter (same tree as the params)."""
    return P.logical_axes_from_specs(param_specs(cfg))


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position ids [B, T] counted over real tokens only (left padding starts at 0),
    as transformers' generate() builds them."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


def merge_image_features(embeds: jax.Array, image_mask: jax.Array, features: jax.Array) -> jax.Array:
    """Puts the image features at the image-token positions, in reading order.

    embeds [B, T, D]; image_mask [B, T] bool; features [N, P, D] with N * P equal to the
    number of image tokens (checked before jit by the Model wrapper).
    """
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.cumsum(image_mask.reshape(-1)) - 1  # k-th image token takes feature row k
    gathered = jnp.take(flat, jnp.clip(order, 0, flat.shape[0] - 1), axis=0).reshape(embeds.shape)
    return jnp.where(image_mask[..., None], gathered, embeds)


def _apply_global(edits, site: str, x: jax.Array) -> jax.Array:
    """Edits on a non-layer site (their masks have a leading axis of 1)."""
    for op in global_ops(edits, site):
        x = apply_site_edit(op.replace(mask=op.mask[0], value=op.value[0]), x)
    return x


def insert_prefix(embeds: jax.Array, attention_mask: jax.Array, prefix: jax.Array):
    """Inserts soft-prompt embeddings prefix [n, D] before each row's first real token.

    embeds [B, T, D], attention_mask [B, T] -> (embeds [B, T + n, D], attention_mask [B, T + n],
    token_index [B, T]: the new position of every original token). Padding stays in front.
    """
    batch, t_len, _ = embeds.shape
    n = prefix.shape[0]
    first = jnp.argmax(attention_mask > 0, axis=1)[:, None]  # [B, 1] first real token
    j = jnp.arange(t_len + n)[None, :]
    in_prefix = (j >= first) & (j < first + n)
    source = jnp.where(j < first, j, jnp.clip(j - n, 0, t_len - 1))
    moved = jnp.take_along_axis(embeds, source[..., None], axis=1)
    from_prefix = jnp.take(prefix.astype(embeds.dtype), jnp.clip(j - first, 0, n - 1), axis=0)
    new_embeds = jnp.where(in_prefix[..., None], from_prefix, moved)
    new_mask = jnp.where(in_prefix, 1, jnp.take_along_axis(attention_mask, source, axis=1))
    t = jnp.arange(t_len)[None, :]
    token_index = jnp.where(t < first, t, t + n)
    return new_embeds, new_mask.astype(attention_mask.dtype), token_index


def image_features(params: dict, cfg: LlavaConfig, pixel_values: jax.Array, *, capture=(), fused=False,
                   edits: Edits | None = None, remat: bool | str = False):
    """Vision tower + feature selection + projector: [N, C, H, W] -> ([N, P', D], acts)."""
    capture = tuple(capture)
    wanted = layer_sites(capture, "vision")
    site_ops, attention_ops = for_tower(edits, "vision")
    hidden, vacts, last = vision_tower.forward(
        params["vision_tower"], cfg.vision, pixel_values, cfg.feature_hidden_state_indices,
        capture=wanted, fused=fused, site_ops=site_ops, attention_ops=attention_ops, remat=remat,
    )
    if cfg.vision_feature_select_strategy == "default":
        hidden = [x[:, 1:] for x in hidden]
    features = jnp.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
    features = _apply_global(edits, "vision.features", features)
    projected = _apply_global(edits, "projector.out", projector.forward(params["multi_modal_projector"], cfg, features))
    acts = {f"vision.{k}": v for k, v in vacts.items() if f"vision.{k}" in capture}
    if "vision.hidden_states" in capture:
        # resid_pre of every layer + the output of the last one (every layer ran: capture is set)
        acts["vision.hidden_states"] = jnp.concatenate([vacts["resid_pre"], last[None]], axis=0)
    if "vision.features" in capture:
        acts["vision.features"] = features
    if "projector.out" in capture:
        acts["projector.out"] = projected
    return projected, acts


def embed_inputs(params: dict, config: LlavaConfig, inputs: Mapping[str, Any], *, capture=(), edits=None,
                 fused_attention: bool = False, remat: bool | str = False):
    """Token embeddings with the image features merged in (the text decoder's input).

    Returns (embeds [B, T, D], position_ids [B, T], attention_mask [B, T], acts).
    """
    input_ids = jnp.asarray(inputs["input_ids"])
    attention_mask = inputs.get("attention_mask")
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
    position_ids = inputs.get("position_ids")
    position_ids = default_positions(attention_mask) if position_ids is None else jnp.asarray(position_ids)
    # Under a mesh the table's width is gathered first (its rows stay split on tensor), so the
    # lookup lands batch-split instead of forcing a full rematerialisation.
    table = constrain(params["language_model"]["embed_tokens"]["embedding"], ("act_vocab", None))
    with jax.named_scope("embed"):
        embeds = jnp.take(table, input_ids, axis=0)
    acts: dict = {}
    pixel_values = inputs.get("pixel_values")
    if pixel_values is not None:
        projected, vacts = image_features(params, config, jnp.asarray(pixel_values), capture=capture,
                                          fused=fused_attention, edits=edits, remat=remat)
        acts.update(vacts)
        embeds = merge_image_features(embeds, input_ids == config.image_token_id, projected)
    embeds = _apply_global(edits, "text.embed", constrain(embeds, ("batch", "length", "act_embed")))
    if "text.embed" in capture:
        acts["text.embed"] = embeds
    return embeds, position_ids, attention_mask, acts


def forward(
    params: dict,
    config: LlavaConfig,
    inputs: Mapping[str, Any],
    *,
    capture: tuple[str, ...] = (),
    edits: Edits | None = None,
    fused_attention: bool = False,
    logit_positions: jax.Array | None = None,
    compute_logits: bool = True,
    cache: dict | None = None,
    cache_index: jax.Array | int = 0,
    key_valid: jax.Array | None = None,
    prefix: jax.Array | None = None,
    remat: bool | str = False,
    last_position_only: bool = False,
) -> Output:
    """The whole model. Pure and jit-able (config and capture are static).

    Args:
      inputs: input_ids [B, T]; attention_mask [B, T] (optional, default all ones);
        pixel_values [N, C, H, W] (optional); position_ids [B, T] (optional, default
        counted over attention_mask).
      capture: site names (see vlm_jax.interp.sites) to return in Output.acts.
      edits: vlm_jax.interp.edits.Edits applied during the pass (captures see edited values).
      fused_attention: use the fused attention kernel wherever no pattern is captured and no
        attention edge is edited.
      logit_positions: [B, K] token indices: compute logits only there ([B, K, V]); with a
        soft prompt they index the input tokens.
      compute_logits: False skips the unembedding (Output.logits is None).
      cache, cache_index, key_valid: generation with a KV cache (see generate.py):
        key_valid [B, S] marks the valid cache slots including the new tokens.
      prefix: soft-prompt embeddings [n, D] inserted before each row's first real token
        (positions are recounted; Output.token_index maps input tokens to output positions).
      remat: what each layer keeps for the backward pass (training): False/'none' everything,
        True/'full' only its input, 'dots' its weight products' and attention's outputs
        (layers.remat_policy).
      last_position_only: a cache prefill that needs the next token only (generate's): the last
        decoder layer runs its queries, attention, output projection and MLP at the last position
        alone, and Output.logits is [B, 1, V] there (logit_positions is then ignored); every
        position's keys and values still fill the cache. No capture, edits or soft prompt.
    """
    if last_position_only and (cache is None or capture or edits is not None or prefix is not None):
        raise ValueError("last_position_only is for a cache prefill without capture, edits or a soft prompt "
                         "(generate's); run the full forward pass for those")
    capture = validate_capture(capture)
    if edits is not None and not edits.ops:
        edits = None  # an empty edit set is the plain forward pass
    if edits is not None and cache is not None:
        raise ValueError("edits are not supported with a KV cache (generation); run the forward pass instead")
    embeds, position_ids, attention_mask, acts = embed_inputs(params, config, inputs, capture=capture, edits=edits,
                                                              fused_attention=fused_attention, remat=remat)
    token_index = None
    if prefix is not None:
        if edits is not None or cache is not None:
            raise ValueError("a soft prompt cannot be combined with edits or a KV cache")
        embeds, attention_mask, token_index = insert_prefix(embeds, attention_mask, prefix)
        position_ids = default_positions(attention_mask)
    lm = params["language_model"]

    wanted = layer_sites(capture, "text")
    site_ops, attention_ops = for_tower(edits, "text")
    h, tacts, new_cache = text_decoder.forward(
        lm, config.text, embeds, position_ids,
        attention_mask if key_valid is None else key_valid,
        capture=wanted, fused=fused_attention, cache=cache, cache_index=cache_index,
        site_ops=site_ops, attention_ops=attention_ops, remat=remat, final_rows=1 if last_position_only else None,
    )
    acts.update({f"text.{k}": v for k, v in tacts.items() if f"text.{k}" in capture})
    final = _apply_global(edits, "text.final", text_decoder.final_norm(lm, config.text, h))
    if "text.hidden_states" in capture:
        # transformers' convention: the last entry is the final-normed output
        acts["text.hidden_states"] = jnp.concatenate([tacts["resid_pre"], final[None]], axis=0)
    if "text.final" in capture:
        acts["text.final"] = final
    logits = None
    if compute_logits:
        if logit_positions is not None and not last_position_only:
            if token_index is not None:  # positions are given in input coordinates
                logit_positions = jnp.take_along_axis(token_index, logit_positions, axis=1)
            final = jnp.take_along_axis(final, logit_positions[..., None], axis=1)
        logits = text_decoder.unembed(lm, params.get("lm_head"), final)
    if "logits" in capture:
        acts["logits"] = logits
    return Output(logits=logits, acts=acts, cache=new_cache, token_index=token_index)


forward_jit = jax.jit(forward, static_argnames=("config", "capture", "fused_attention", "compute_logits", "remat",
                                               "last_position_only"))
