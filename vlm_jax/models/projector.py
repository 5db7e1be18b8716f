"""The multimodal projector: linear_1 -> activation -> linear_2."""

from __future__ import annotations

import jax

from vlm_jax.config import LlavaConfig
from vlm_jax.models.layers import linear
from vlm_jax.models.params import dense
from vlm_jax.nn.activations import activation


def param_specs(cfg: LlavaConfig) -> dict:
    d_in = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
    d_out = cfg.text.hidden_size
    return {
        "linear_1": dense(d_in, d_out, "vision_embed", "projector_mlp", cfg.projector_bias),
        "linear_2": dense(d_out, d_out, "projector_mlp", "embed", cfg.projector_bias),
    }


@jax.named_scope("projector")
def forward(params: dict, cfg: LlavaConfig, features: jax.Array) -> jax.Array:
    """features [N, P, Dv * n_feature_layers] -> image embeddings [N, P, D]."""
    h = linear(features, params["linear_1"])
    return linear(activation(cfg.projector_hidden_act)(h), params["linear_2"])
