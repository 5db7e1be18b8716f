"""ViT vision towers: CLIP, SigLIP and DINOv2 (optionally with registers and SwiGLU).

One pre-norm encoder serves all three; the families differ in the embeddings (class token,
registers, learned positions, interpolation) and in small per-layer switches (layer scale,
SwiGLU MLP). Parameters use CLIP's names for every family; weights.py maps SigLIP and
DINOv2 checkpoints onto them.

Sequence layout of one image: [class token?][registers...][patches, row-major].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlm_jax.config import VisionConfig
from vlm_jax.interp.edits import layer_slices
from vlm_jax.interp.site_hooks import Sites, score_editor
from vlm_jax.models.layers import gated_mlp, merge_heads, plain_mlp, project_heads, scan_layers
from vlm_jax.models.params import ParamSpec, dense, norm, stack
from vlm_jax.nn.attention import attention
from vlm_jax.nn.interpolate import bicubic_matrix
from vlm_jax.nn.norms import layer_norm
from vlm_jax.sharding import constrain

LAYER_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "attn_pattern", "q", "k", "v", "z")


def param_specs(cfg: VisionConfig) -> dict:
    d, f, h, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    p, c = cfg.patch_size, cfg.num_channels
    embeddings = {
        "patch_embedding": {"kernel": ParamSpec((c, p, p, d), (None, None, None, "vision_embed"))},
        "position_embedding": {"embedding": ParamSpec((cfg.num_positions, d), (None, "vision_embed"))},
    }
    if cfg.patch_bias:
        embeddings["patch_embedding"]["bias"] = ParamSpec((d,), ("vision_embed",), "zeros")
    if cfg.class_token:
        embeddings["class_embedding"] = ParamSpec((d,), ("vision_embed",))
    if cfg.num_register_tokens:
        embeddings["register_tokens"] = ParamSpec((cfg.num_register_tokens, d), (None, "vision_embed"))
    if cfg.use_mask_token:
        embeddings["mask_token"] = ParamSpec((d,), ("vision_embed",), "zeros")

    def heads_in(bias):
        spec = {"kernel": ParamSpec((d, h, e), ("vision_embed", "vision_heads", "head_dim"))}
        if bias:
            spec["bias"] = ParamSpec((h, e), ("vision_heads", "head_dim"), "zeros")
        return spec

    layer = {
        "layer_norm1": norm(d, "vision_embed", bias=True),
        "self_attn": {
            "q_proj": heads_in(cfg.qkv_bias),
            "k_proj": heads_in(cfg.qkv_bias),
            "v_proj": heads_in(cfg.qkv_bias),
            "out_proj": {
                "kernel": ParamSpec((h, e, d), ("vision_heads", "head_dim", "vision_embed")),
                "bias": ParamSpec((d,), ("vision_embed",), "zeros"),
            },
        },
        "layer_norm2": norm(d, "vision_embed", bias=True),
    }
    if cfg.swiglu:
        layer["mlp"] = {
            "gate_proj": dense(d, f, "vision_embed", "vision_mlp", bias=True),
            "up_proj": dense(d, f, "vision_embed", "vision_mlp", bias=True),
            "down_proj": dense(f, d, "vision_mlp", "vision_embed", bias=True),
        }
    else:
        layer["mlp"] = {
            "fc1": dense(d, f, "vision_embed", "vision_mlp", bias=True),
            "fc2": dense(f, d, "vision_mlp", "vision_embed", bias=True),
        }
    if cfg.layer_scale:
        for name in ("layer_scale1", "layer_scale2"):
            layer[name] = {"lambda1": ParamSpec((d,), ("vision_embed",), "constant", cfg.layerscale_value)}

    specs = {"embeddings": embeddings, "layers": stack(layer, cfg.num_layers)}
    if cfg.pre_layernorm:
        specs["pre_layrnorm"] = norm(d, "vision_embed", bias=True)
    # Final norm (CLIP/SigLIP post_layernorm, DINOv2 layernorm): carried for export and
    # pooled readouts; LLaVA reads un-normed hidden states.
    specs["post_layernorm"] = norm(d, "vision_embed", bias=True)
    if cfg.use_head:  # SigLIP's attention-pooling head, carried for export
        specs["head"] = {
            "probe": ParamSpec((d,), ("vision_embed",)),
            "attention": {
                "in_proj": dense(d, 3 * d, "vision_embed", None, bias=True),
                "out_proj": dense(d, d, "vision_embed", "vision_embed", bias=True),
            },
            "layernorm": norm(d, "vision_embed", bias=True),
            "mlp": {
                "fc1": dense(d, f, "vision_embed", "vision_mlp", bias=True),
                "fc2": dense(f, d, "vision_mlp", "vision_embed", bias=True),
            },
        }
    return specs


def embed(params: dict, cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
    """Patch + class/register tokens + positions: pixel_values [N, C, H, W] -> [N, P, D]."""
    emb = params["embeddings"]
    kernel = emb["patch_embedding"]["kernel"]
    n, c, height, width = pixel_values.shape
    p = cfg.patch_size
    gh, gw = height // p, width // p
    x = pixel_values.astype(kernel.dtype)[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
    patches = jnp.einsum("ncipjq,cpqd->nijd", x, kernel).reshape(n, gh * gw, -1)
    if "bias" in emb["patch_embedding"]:
        patches = patches + emb["patch_embedding"]["bias"]

    table = emb["position_embedding"]["embedding"]  # [num_positions, D]
    n_cls = int(cfg.class_token)
    if (gh, gw) != (cfg.grid_size, cfg.grid_size):
        # DINOv2 resizes its position grid to the input (transformers does it in float32).
        antialias = cfg.model_type == "dinov2_with_registers"  # as transformers does per model
        rows = bicubic_matrix(cfg.grid_size, gh, antialias)
        cols = bicubic_matrix(cfg.grid_size, gw, antialias)
        grid = table[n_cls:].astype(jnp.float32).reshape(cfg.grid_size, cfg.grid_size, -1)
        grid = jnp.einsum("ij,jkd,lk->ild", rows, grid, cols).reshape(gh * gw, -1).astype(table.dtype)
        table = jnp.concatenate([table[:n_cls], grid], axis=0)

    tokens = patches
    if cfg.class_token:
        cls = jnp.broadcast_to(emb["class_embedding"].astype(patches.dtype), (n, 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
    tokens = tokens + table[None].astype(tokens.dtype)
    if cfg.num_register_tokens:
        regs = jnp.broadcast_to(emb["register_tokens"].astype(tokens.dtype), (n, *emb["register_tokens"].shape))
        tokens = jnp.concatenate([tokens[:, :1], regs, tokens[:, 1:]], axis=1)
    if cfg.pre_layernorm:
        tokens = layer_norm(tokens, params["pre_layrnorm"], cfg.layer_norm_eps)
    return tokens


def _layer(cfg: VisionConfig, wanted: frozenset, fused: bool, rebuild_edits, attn_edit_free: bool):
    def layer(p: dict, h: jax.Array, per_layer: dict, index):
        site_ops, attn_ops = rebuild_edits(per_layer["edits"])
        sites = Sites(wanted, site_ops, attn_ops, prefix="vision.")
        h = sites("resid_pre", constrain(h, ("batch", "length", "act_embed")))
        x = layer_norm(h, p["layer_norm1"], cfg.layer_norm_eps)
        attn_p = p["self_attn"]
        with jax.named_scope("qkv_proj"):
            q, k, v = (sites(name, project_heads(x, attn_p[f"{name}_proj"])) for name in ("q", "k", "v"))
        want_pattern = "attn_pattern" in wanted
        out, pattern = attention(
            q, k, v, scale=cfg.head_dim**-0.5, return_pattern=want_pattern,
            fused=fused and not want_pattern and attn_edit_free, score_edit=score_editor(attn_ops, 1),
        )
        sites.record("attn_pattern", pattern)
        with jax.named_scope("out_proj"):
            attn_out = merge_heads(sites("z", out), attn_p["out_proj"])
        if cfg.layer_scale:
            attn_out = attn_out * p["layer_scale1"]["lambda1"]
        h = sites("resid_mid", h + sites("attn_out", attn_out))
        x = layer_norm(h, p["layer_norm2"], cfg.layer_norm_eps)
        mlp_out = gated_mlp(x, p["mlp"], "silu") if cfg.swiglu else plain_mlp(x, p["mlp"], cfg.hidden_act)
        if cfg.layer_scale:
            mlp_out = mlp_out * p["layer_scale2"]["lambda1"]
        h = sites("resid_post", h + sites("mlp_out", mlp_out))
        return h, sites.report

    return layer


@jax.named_scope("vision_tower")
def forward(
    params: dict,
    cfg: VisionConfig,
    pixel_values: jax.Array,
    hidden_state_indices: tuple[int, ...],
    *,
    capture: frozenset = frozenset(),
    fused: bool = False,
    site_ops=(),
    attention_ops=(),
    remat: bool | str = False,
):
    """Runs the tower far enough to produce the requested hidden states.

    Args:
      pixel_values: [N, C, H, W].
      hidden_state_indices: indices into transformers' hidden_states tuple (0 = embeddings,
        i + 1 = output of layer i) to return.
      capture: per-layer site names (LAYER_SITES) to return stacked over all layers.
      site_ops, attention_ops: this tower's edits (vlm_jax.interp.edits).

    Returns:
      (list of [N, P, D] hidden states in the order asked, {site: [L, N, P, ...]},
       output of the last layer run [N, P, D]).
    """
    h0 = embed(params, cfg, pixel_values)
    # Every layer runs when per-layer activations are captured or edited; else only up to
    # the deepest feature layer.
    edited = bool(site_ops or attention_ops)
    n_run = cfg.num_layers if (capture or edited) else max(hidden_state_indices)
    inner = set(capture)
    # Hidden states other than the embeddings and the last layer run come from resid_post.
    if any(0 < i < n_run for i in hidden_state_indices):
        inner.add("resid_post")
    edit_xs, rebuild = layer_slices([*site_ops, *attention_ops], cfg.num_layers)
    n_site = len(site_ops)

    def rebuild_edits(xs_i):
        ops = rebuild(xs_i)
        return ops[:n_site], ops[n_site:]

    layer = _layer(cfg, frozenset(inner), fused, rebuild_edits, not attention_ops)
    h, report = scan_layers(layer, h0, params["layers"], {"edits": edit_xs}, n_layers=n_run, remat=remat)
    selected = []
    for i in hidden_state_indices:
        selected.append(h0 if i == 0 else h if i == n_run else report["resid_post"][i - 1])
    return selected, {k: v for k, v in report.items() if k in capture}, h


def post_layernorm(params: dict, cfg: VisionConfig, h: jax.Array) -> jax.Array:
    """The tower's final norm (CLIP/SigLIP post_layernorm, DINOv2 layernorm)."""
    return layer_norm(h, params["post_layernorm"], cfg.layer_norm_eps)
