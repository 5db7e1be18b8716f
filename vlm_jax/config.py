"""Frozen, hashable model configs (static arguments of every jitted function).

`from_hf_config` reads a transformers LlavaConfig (or its config.json dict) through
transformers' own config classes, so defaults and legacy fields (rope_scaling, layer_types,
...) are normalised exactly as transformers normalises them. `to_hf_config` writes the
dict back. Presets give the llava-1.5 configs without touching the hub.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from vlm_jax.errors import UnsupportedArchitectureError
from vlm_jax.nn.activations import ACTIVATIONS

SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers")
SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, as in transformers' `rope_parameters`."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    attention_factor: float | None = None  # yarn, longrope
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    long_factor: tuple[float, ...] | None = None  # longrope
    short_factor: tuple[float, ...] | None = None  # longrope


@dataclass(frozen=True)
class VisionConfig:
    """A ViT vision tower: CLIP, SigLIP or DINOv2 (with or without registers)."""

    model_type: str  # one of SUPPORTED_VISION
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = True
    num_register_tokens: int = 0
    layerscale_value: float = 1.0  # DINOv2 init value of the layer scales
    swiglu: bool = False  # DINOv2-giant style SwiGLU MLP
    use_head: bool = False  # SigLIP attention-pooling head (weights carried, unused by LLaVA)
    use_mask_token: bool = False  # DINOv2 mask token (weights carried, unused by LLaVA)

    @property
    def family(self) -> str:
        return {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(self.model_type, "dinov2")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def class_token(self) -> bool:
        return self.family != "siglip"

    @property
    def pre_layernorm(self) -> bool:
        return self.family == "clip"

    @property
    def patch_bias(self) -> bool:
        return self.family != "clip"

    @property
    def layer_scale(self) -> bool:
        return self.family == "dinov2"

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in the tower's sequence: class token + registers."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table."""
        return self.grid_size**2 + int(self.class_token)


@dataclass(frozen=True)
class TextConfig:
    """A decoder-only LM: Llama, Mistral or Qwen2 (RMSNorm, RoPE, GQA, SwiGLU)."""

    model_type: str  # one of SUPPORTED_TEXT
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # per-layer sliding window size (None = full causal attention)
    sliding_windows: tuple[int | None, ...] = ()
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)


@dataclass(frozen=True)
class LlavaConfig:
    """LlavaForConditionalGeneration: vision tower -> projector -> text decoder."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    vision_feature_layers: tuple[int, ...] = (-2,)
    vision_feature_layer_is_list: bool = False
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_seq_length: int = 576

    @property
    def feature_hidden_state_indices(self) -> tuple[int, ...]:
        """Indices into HF's vision hidden_states tuple (0 = embeddings, i + 1 = layer i)."""
        n = self.vision.num_layers + 1
        return tuple(i % n for i in self.vision_feature_layers)

    @property
    def vision_layers_needed(self) -> int:
        """Vision layers that must run to produce the projector's input."""
        return max(self.feature_hidden_state_indices)

    def image_tokens_per_image(self, grid_h: int | None = None, grid_w: int | None = None) -> int:
        """Image placeholder tokens per image for a (grid_h x grid_w) patch grid."""
        grid_h = grid_h or self.vision.grid_size
        grid_w = grid_w or self.vision.grid_size
        n = grid_h * grid_w + self.vision.num_prefix_tokens
        return n - 1 if self.vision_feature_select_strategy == "default" else n


# ----------------------------------------------------------------------------------------------
# transformers config -> ours


def _as_hf_config(hf_config: Any):
    """Returns a transformers LlavaConfig from a dict, a PretrainedConfig or a config.json path."""
    from transformers import PretrainedConfig
    from transformers import LlavaConfig as HFLlavaConfig

    if isinstance(hf_config, PretrainedConfig):
        cfg = hf_config
    else:
        data = dict(hf_config)
        model_type = data.get("model_type")
        if model_type != "llava":
            raise UnsupportedArchitectureError(
                f"Unsupported architecture: model_type={model_type!r} "
                f"(architectures={data.get('architectures')}). vlm_jax implements model_type 'llava' "
                f"(LlavaForConditionalGeneration) with vision towers {', '.join(SUPPORTED_VISION)} and "
                f"text decoders {', '.join(SUPPORTED_TEXT)}. Fix: load a LLaVA checkpoint "
                f"(e.g. llava-hf/llava-1.5-7b-hf)."
            )
        data = {k: v for k, v in data.items() if k not in ("transformers_version",)}
        for sub in ("vision_config", "text_config"):
            _check_sub_type(sub, (data.get(sub) or {}).get("model_type"))
        cfg = HFLlavaConfig(**data)
    if getattr(cfg, "model_type", None) != "llava":
        raise UnsupportedArchitectureError(
            f"Unsupported architecture {type(cfg).__name__} (model_type={cfg.model_type!r}); "
            "vlm_jax implements model_type 'llava'."
        )
    return cfg


def _check_sub_type(which: str, model_type: str | None) -> None:
    supported = SUPPORTED_VISION if which == "vision_config" else SUPPORTED_TEXT
    if model_type is not None and model_type not in supported:
        raise UnsupportedArchitectureError(
            f"Unsupported {which.replace('_config', '')} architecture {model_type!r}. "
            f"Supported: {', '.join(supported)}. Fix: use a LLaVA checkpoint whose {which} "
            "has one of these model types."
        )


def _check_act(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(
            f"Unsupported activation {name!r} in {where}. Supported: {', '.join(sorted(ACTIVATIONS))}."
        )
    return name


def _vision_from_hf(vc) -> VisionConfig:
    mt = vc.model_type
    _check_sub_type("vision_config", mt)
    common = dict(
        model_type=mt,
        hidden_size=vc.hidden_size,
        num_layers=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        image_size=_as_int_size(vc.image_size),
        patch_size=_as_int_size(vc.patch_size),
        num_channels=vc.num_channels,
        hidden_act=_check_act(vc.hidden_act, "vision_config.hidden_act"),
        layer_norm_eps=vc.layer_norm_eps,
    )
    if vc.hidden_size % vc.num_attention_heads:
        raise UnsupportedArchitectureError(
            f"vision hidden_size {vc.hidden_size} is not divisible by num_attention_heads "
            f"{vc.num_attention_heads}"
        )
    if mt in ("clip_vision_model", "siglip_vision_model"):
        return VisionConfig(
            intermediate_size=vc.intermediate_size,
            use_head=bool(getattr(vc, "vision_use_head", True)) if mt == "siglip_vision_model" else False,
            **common,
        )
    hidden_features = int(vc.hidden_size * vc.mlp_ratio)
    swiglu = bool(vc.use_swiglu_ffn)
    if swiglu:  # transformers' Dinov2SwiGLUFFN rounding
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
    if getattr(vc, "head_dim", None) not in (None, vc.hidden_size // vc.num_attention_heads):
        raise UnsupportedArchitectureError("DINOv2 configs with a custom head_dim are not supported")
    return VisionConfig(
        intermediate_size=hidden_features,
        qkv_bias=bool(vc.qkv_bias),
        num_register_tokens=int(getattr(vc, "num_register_tokens", 0)) if mt == "dinov2_with_registers" else 0,
        layerscale_value=float(vc.layerscale_value),
        swiglu=swiglu,
        use_mask_token=True if mt == "dinov2_with_registers" else bool(getattr(vc, "use_mask_token", True)),
        **common,
    )


def _as_int_size(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise UnsupportedArchitectureError(f"non-square image/patch size {v} is not supported")
        return int(v[0])
    return int(v)


def _rope_from_hf(tc) -> RopeConfig:
    params = getattr(tc, "rope_parameters", None)
    if params is None:  # transformers < 5 style
        params = dict(getattr(tc, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(tc, "rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedArchitectureError(
            f"Unsupported rope_type {rope_type!r}. Supported: {', '.join(SUPPORTED_ROPE)}."
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial_rotary_factor != 1 is not supported by these decoders")
    tup = lambda v: None if v is None else tuple(float(x) for x in v)  # noqa: E731
    opt = lambda k: None if params.get(k) is None else float(params[k])  # noqa: E731
    omp = params.get("original_max_position_embeddings")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(params.get("rope_theta", 10000.0)),
        factor=opt("factor"),
        original_max_position_embeddings=None if omp is None else int(omp),
        low_freq_factor=opt("low_freq_factor"),
        high_freq_factor=opt("high_freq_factor"),
        attention_factor=opt("attention_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        long_factor=tup(params.get("long_factor")),
        short_factor=tup(params.get("short_factor")),
    )


def _text_from_hf(tc, tie: bool) -> TextConfig:
    mt = tc.model_type
    _check_sub_type("text_config", mt)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    n_layers = tc.num_hidden_layers
    if mt == "mistral":
        windows = (getattr(tc, "sliding_window", None),) * n_layers
    elif mt == "qwen2":
        types = getattr(tc, "layer_types", None) or ["full_attention"] * n_layers
        windows = tuple(tc.sliding_window if t == "sliding_attention" else None for t in types[:n_layers])
    else:
        windows = (None,) * n_layers
    eos = getattr(tc, "eos_token_id", None)
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    if tc.num_attention_heads % n_kv:
        raise UnsupportedArchitectureError(
            f"num_attention_heads {tc.num_attention_heads} is not a multiple of num_key_value_heads {n_kv}"
        )
    return TextConfig(
        model_type=mt,
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_layers=n_layers,
        num_heads=tc.num_attention_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=tc.rms_norm_eps,
        hidden_act=_check_act(tc.hidden_act, "text_config.hidden_act"),
        max_position_embeddings=tc.max_position_embeddings,
        rope=_rope_from_hf(tc),
        qkv_bias=True if mt == "qwen2" else bool(getattr(tc, "attention_bias", False)),
        o_bias=bool(getattr(tc, "attention_bias", False)) if mt == "llama" else False,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)) if mt == "llama" else False,
        sliding_windows=tuple(None if w is None else int(w) for w in windows),
        tie_word_embeddings=tie,
        pad_token_id=getattr(tc, "pad_token_id", None),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_ids=eos,
    )


def from_hf_config(hf_config: Any) -> LlavaConfig:
    """LlavaConfig from a transformers LlavaConfig, its dict, or a loaded config.json."""
    cfg = _as_hf_config(hf_config)
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise UnsupportedArchitectureError(
            f"vision_feature_select_strategy={strategy!r}; supported: 'default', 'full'"
        )
    layers = cfg.vision_feature_layer
    is_list = isinstance(layers, (list, tuple))
    layers = tuple(int(x) for x in layers) if is_list else (int(layers),)
    vision = _vision_from_hf(cfg.vision_config)
    tie = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.text_config, "tie_word_embeddings", False))
    text = _text_from_hf(cfg.text_config, tie)
    for layer in layers:
        if not -(vision.num_layers + 1) <= layer <= vision.num_layers:
            raise UnsupportedArchitectureError(
                f"vision_feature_layer {layer} is out of range for a {vision.num_layers}-layer tower"
            )
    return LlavaConfig(
        vision=vision,
        text=text,
        image_token_id=int(cfg.image_token_id),
        vision_feature_layers=layers,
        vision_feature_layer_is_list=is_list,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=_check_act(cfg.projector_hidden_act, "projector_hidden_act"),
        projector_bias=bool(getattr(cfg, "multimodal_projector_bias", True)),
        image_seq_length=int(getattr(cfg, "image_seq_length", 576)),
    )


# ----------------------------------------------------------------------------------------------
# ours -> transformers config dict


def _rope_to_hf(rope: RopeConfig) -> dict:
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    for f in dataclasses.fields(RopeConfig):
        if f.name in ("rope_type", "theta"):
            continue
        v = getattr(rope, f.name)
        if f.name == "truncate":
            if rope.rope_type == "yarn" and not v:
                out["truncate"] = False
            continue
        if v is not None:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _vision_to_hf(v: VisionConfig) -> dict:
    d: dict[str, Any] = dict(
        model_type=v.model_type,
        hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
    )
    if v.family in ("clip", "siglip"):
        d["intermediate_size"] = v.intermediate_size
        if v.family == "siglip":
            d["vision_use_head"] = v.use_head
        return d
    mlp_ratio = v.intermediate_size / v.hidden_size
    if v.swiglu:  # invert transformers' rounding: find a ratio that reproduces the width
        mlp_ratio = next(
            r / 4 for r in range(1, 64) if (int(int(v.hidden_size * r / 4) * 2 / 3) + 7) // 8 * 8 == v.intermediate_size
        )
    d.update(
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        qkv_bias=v.qkv_bias,
        layerscale_value=v.layerscale_value,
        use_swiglu_ffn=v.swiglu,
    )
    if v.model_type == "dinov2":
        d["use_mask_token"] = v.use_mask_token
    else:
        d["num_register_tokens"] = v.num_register_tokens
    return d


def _text_to_hf(t: TextConfig) -> dict:
    d: dict[str, Any] = dict(
        model_type=t.model_type,
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=_rope_to_hf(t.rope),
        tie_word_embeddings=t.tie_word_embeddings,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=(list(t.eos_token_ids) if len(t.eos_token_ids) > 1 else (t.eos_token_ids or (None,))[0]),
    )
    if t.model_type == "llama":
        if t.qkv_bias != t.o_bias:
            raise UnsupportedArchitectureError("Llama has one attention_bias flag for q, k, v and o")
        d.update(attention_bias=t.qkv_bias, mlp_bias=t.mlp_bias)
    elif t.model_type == "mistral":
        windows = set(t.sliding_windows)
        if len(windows) != 1:
            raise UnsupportedArchitectureError("Mistral uses one sliding window for every layer")
        d["sliding_window"] = windows.pop()
    elif t.model_type == "qwen2":
        sizes = {w for w in t.sliding_windows if w is not None}
        if len(sizes) > 1:
            raise UnsupportedArchitectureError("Qwen2 uses one sliding window size")
        d["use_sliding_window"] = bool(sizes)
        d["sliding_window"] = sizes.pop() if sizes else None
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in t.sliding_windows]
        if d["use_sliding_window"]:
            d["max_window_layers"] = next(i for i, w in enumerate(t.sliding_windows) if w)
    return d


def to_hf_config(cfg: LlavaConfig) -> dict:
    """A config.json dict that transformers' LlavaConfig loads into the same model."""
    layer = list(cfg.vision_feature_layers) if cfg.vision_feature_layer_is_list else cfg.vision_feature_layers[0]
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": _vision_to_hf(cfg.vision),
        "text_config": _text_to_hf(cfg.text),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "projector_hidden_act": cfg.projector_hidden_act,
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


def config_to_dict(cfg: LlavaConfig) -> dict:
    """Plain-JSON form of our config (stored in converted checkpoints)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any]) -> LlavaConfig:
    def tup(x):
        return tuple(x) if isinstance(x, list) else x

    rope = RopeConfig(**{k: tup(v) for k, v in d["text"]["rope"].items()})
    text = TextConfig(**{**{k: tup(v) for k, v in d["text"].items()}, "rope": rope})
    vision = VisionConfig(**d["vision"])
    rest = {k: tup(v) for k, v in d.items() if k not in ("text", "vision")}
    return LlavaConfig(vision=vision, text=text, **rest)


# ----------------------------------------------------------------------------------------------
# presets (HF config dicts; no hub access needed)

_CLIP_L_336 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768,
)


def _llava15(hidden, layers, heads, inter) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 32000,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "pad_token_id": 32001,
        "vision_config": dict(_CLIP_L_336),
        "text_config": dict(
            model_type="llama", vocab_size=32064, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            pad_token_id=32001, bos_token_id=1, eos_token_id=2,
        ),
    }


PRESETS: dict[str, dict] = {
    # llava-hf/llava-1.5-7b-hf and -13b-hf (CLIP ViT-L/14-336, Vicuna-1.5)
    "llava-1.5-7b": _llava15(4096, 32, 32, 11008),
    "llava-1.5-13b": _llava15(5120, 40, 40, 13824),
    # The CPU benchmark shape: LLaVA-1.5 geometry (576 image tokens, vocab 32064), ~60M params.
    "llava-1.5-cpu-60m": {
        **_llava15(512, 8, 8, 1376),
        "vision_config": dict(_CLIP_L_336, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                              num_attention_heads=4),
    },
}


def preset(name: str) -> LlavaConfig:
    """A LlavaConfig from PRESETS (e.g. 'llava-1.5-7b')."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return from_hf_config(PRESETS[name])

