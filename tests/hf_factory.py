"""Tiny transformers LLaVA checkpoints for parity tests (random init, save_pretrained, no network)."""

from __future__ import annotations

import copy

import numpy as np
import torch

VOCAB = 160
IMAGE_TOKEN = 159
PAD = 0

CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, image_size=28, patch_size=14, hidden_act="quick_gelu")
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, image_size=28, patch_size=7, hidden_act="gelu_pytorch_tanh")
DINOV2 = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
              image_size=42, patch_size=14, layerscale_value=0.5)
DINOV2_REG = dict(model_type="dinov2_with_registers", hidden_size=32, mlp_ratio=4, num_hidden_layers=3,
                  num_attention_heads=4, image_size=28, patch_size=14, num_register_tokens=2, use_swiglu_ffn=True)
LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=PAD,
             bos_token_id=1, eos_token_id=2)
MISTRAL = dict(LLAMA, model_type="mistral", num_key_value_heads=2, sliding_window=7)
QWEN2 = dict(LLAMA, model_type="qwen2", num_hidden_layers=3, num_key_value_heads=1, use_sliding_window=True,
             sliding_window=6, max_window_layers=1)

# Each case covers a slice of the architectures LlavaConfig admits; together they cover all of it.
CASES = {
    "clip-llama-mha": dict(vision=CLIP, text=LLAMA),
    "clip-gelu-llama3rope-gqa-tied-multilayer": dict(
        vision=dict(CLIP, hidden_act="gelu"),
        text=dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=16)),
        top=dict(vision_feature_layer=[-3, -1], tie_word_embeddings=True),
    ),
    "siglip-mistral-sliding-full-nobias": dict(
        vision=SIGLIP, text=MISTRAL,
        top=dict(vision_feature_layer=-1, vision_feature_select_strategy="full", multimodal_projector_bias=False,
                 projector_hidden_act="gelu"),
    ),
    "dinov2-qwen2-mixed-sliding-interpolated": dict(
        vision=DINOV2, text=QWEN2, top=dict(vision_feature_layer=-2), image_size=28,
    ),
    "dinov2reg-swiglu-llama-bias-linear-rope": dict(
        vision=DINOV2_REG,
        text=dict(LLAMA, attention_bias=True, mlp_bias=True, head_dim=16,
                  rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        top=dict(vision_feature_layer=[0, -1]), image_size=56,
    ),
    "clip-llama-dynamic-rope": dict(
        vision=CLIP, text=dict(LLAMA, max_position_embeddings=12,
                               rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)),
    ),
    "clip-llama-yarn-rope": dict(
        vision=CLIP, text=dict(LLAMA, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                            original_max_position_embeddings=16)),
    ),
    "clip-llama-longrope": dict(
        vision=CLIP, text=dict(LLAMA, max_position_embeddings=64,
                               rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                    original_max_position_embeddings=16,
                                                    long_factor=[1.0, 1.5, 2.0, 3.0], short_factor=[1.0, 1.1, 1.2, 1.3])),
    ),
}


def hf_config_dict(case: str) -> dict:
    spec = copy.deepcopy(CASES[case])
    return dict(model_type="llava", vision_config=spec["vision"], text_config=spec["text"],
                image_token_index=IMAGE_TOKEN, **spec.get("top", {}))


def image_size(case: str) -> int:
    spec = CASES[case]
    return spec.get("image_size", spec["vision"]["image_size"])


def build_hf_model(hf_config: dict, seed: int = 0, std: float | None = None):
    """A transformers LlavaForConditionalGeneration in eval mode (eager attention, fp32)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(**copy.deepcopy(hf_config))
    model = LlavaForConditionalGeneration(config).eval()
    if std is not None:  # wider init: peaked logits, so bf16 top-1 comparisons are meaningful
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, std)
    model.config._attn_implementation = "eager"
    model.set_attn_implementation("eager")
    return model


def save_hf_model(model, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


def tokens_per_image(hf_config: dict, image_px: int) -> int:
    from vlm_jax.config import from_hf_config

    cfg = from_hf_config(hf_config)
    grid = image_px // cfg.vision.patch_size
    return cfg.image_tokens_per_image(grid, grid)


def rule_tokens(start: int, n: int) -> list[int]:
    """A deterministic token sequence (each token fixes the next), for briefly trained models."""
    out = [3 + start % 97]
    for _ in range(n - 1):
        out.append(3 + (out[-1] * 7 + 5) % 97)
    return out


def make_batch(hf_config: dict, image_px: int, padding: str = "left", seed: int = 0, text: str = "random"):
    """input_ids/attention_mask/pixel_values for 2 rows: row 0 shows 2 images, row 1 shows 1;
    rows have different lengths (padding on `padding`). text="rule" draws text from rule_tokens."""
    rng = np.random.RandomState(seed)
    n_img = tokens_per_image(hf_config, image_px)

    def words(n):
        return rule_tokens(int(rng.randint(0, 97)), n) if text == "rule" else list(rng.randint(3, 100, n))

    rows = [
        [1, *words(3), *[IMAGE_TOKEN] * n_img, *words(2), *[IMAGE_TOKEN] * n_img, *words(4)],
        [1, *words(2), *[IMAGE_TOKEN] * n_img, *words(3)],
    ]
    width = max(len(r) for r in rows)
    ids = np.full((2, width), PAD, np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, row in enumerate(rows):
        if padding == "left":
            ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
        else:
            ids[b, :len(row)], mask[b, :len(row)] = row, 1
    pixels = rng.randn(3, 3, image_px, image_px).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' generate() builds them (and vlm_jax by default)."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask > 0, pos, 0)


def hf_forward(model, batch: dict):
    """Logits, text hidden states and vision hidden states of the transformers model."""
    with torch.no_grad():
        t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
        pixel_values = t["pixel_values"].to(model.dtype)
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pixel_values,
                    position_ids=torch.from_numpy(positions(batch["attention_mask"])), output_hidden_states=True)
        vision = model.model.vision_tower(pixel_values, output_hidden_states=True)
    to_np = lambda x: x.float().numpy()  # noqa: E731
    return to_np(out.logits), [to_np(h) for h in out.hidden_states], [to_np(h) for h in vision.hidden_states]


def rel_err(ours, ref, mask=None) -> float:
    """max |ours - ref| / max |ref| over the selected entries."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask], ref[mask]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def train_briefly(model, hf_config: dict, image_px: int, steps: int = 120, lr: float = 3e-3) -> None:
    """Next-token training on rule_tokens batches: predictions become confident, as in a trained model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batch = make_batch(hf_config, image_px, seed=1000 + step, text="rule")
        ids = torch.from_numpy(batch["input_ids"])
        mask = torch.from_numpy(batch["attention_mask"])
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(batch["pixel_values"]),
                    position_ids=torch.from_numpy(positions(batch["attention_mask"])), labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
