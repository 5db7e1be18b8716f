"""The processor wrapper and the image-token map."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import hf_factory
import vlm_jax as vj
from vlm_jax.config import from_hf_config
from vlm_jax.demo import draw_shape_image


@pytest.fixture(scope="module")
def model(random_llava):
    return vj.load(random_llava, progress=False)


def test_prepare_returns_numpy_and_image_spans(model):
    img = draw_shape_image()
    batch = model.prepare(["USER: <image>\nwhat color is this ? ASSISTANT:",
                           "USER: <image> and <image>\nhow many shapes ? ASSISTANT:"], images=[img, img, img])
    assert isinstance(batch.input_ids, np.ndarray) and batch.pixel_values.shape == (3, 3, 56, 56)
    per_image = model.config.image_tokens_per_image()
    assert per_image == 16
    spans = batch.image_tokens.spans()
    assert [(b, i) for b, i, _, _ in spans] == [(0, 0), (1, 1), (1, 2)]
    for b, i, start, end in spans:
        assert end - start == per_image
        assert np.all(batch.input_ids[b, start:end] == model.config.image_token_id)
    # row-major patch grid, 4 x 4
    row, grid = batch.image_tokens.grid_positions(2)
    assert row == 1 and grid.shape == (4, 4)
    assert np.all(np.diff(grid.reshape(-1)) == 1)
    np.testing.assert_array_equal(batch.image_tokens.patch_row[1, grid[:, 0]], np.arange(4))
    np.testing.assert_array_equal(batch.image_tokens.patch_col[1, grid[0]], np.arange(4))
    # left padding: the shorter row starts with padding
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1, 0] == 1
    assert batch.last_positions.tolist() == [batch.input_ids.shape[1] - 1] * 2
    assert batch.text_mask.sum() + batch.image_mask.sum() == batch.attention_mask.sum()


def test_run_accepts_the_transformers_processor_output_directly(model):
    img = draw_shape_image()
    hf_out = model.processor.hf(images=[img], text=["USER: <image>\nwhat is this ? ASSISTANT:"], return_tensors="np")
    logits = model.run(hf_out).logits
    assert logits.shape == (*hf_out["input_ids"].shape, model.config.text.vocab_size)
    pt_out = model.processor.hf(images=[img], text=["USER: <image>\nwhat is this ? ASSISTANT:"], return_tensors="pt")
    np.testing.assert_allclose(np.asarray(model.run(pt_out).logits), np.asarray(logits), rtol=1e-6, atol=1e-6)


def test_chat_conversation(model):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape ?"}]}]
    batch = model.prepare(conversation=conversation, images=[draw_shape_image()])
    text = model.processor.tokenizer.decode(batch.input_ids[0], skip_special_tokens=False)
    assert text.startswith("<s> USER :") and text.rstrip().endswith("ASSISTANT :")
    out = model.generate(batch, 4)
    assert out.tokens.shape == (1, 4) and len(out.texts) == 1


@pytest.mark.parametrize("case, prefix", [
    ("clip-llama-mha", 0),  # default strategy drops the class token: all patches
    ("siglip-mistral-sliding-full-nobias", 0),  # no class token, full strategy
    ("dinov2reg-swiglu-llama-bias-linear-rope", 2),  # default drops cls, the 2 registers remain
])
def test_image_token_map_layout(case, prefix):
    hf_config = hf_factory.hf_config_dict(case)
    cfg = from_hf_config(hf_config)
    px = hf_factory.image_size(case)
    batch = hf_factory.make_batch(hf_config, px)
    grid = (px // cfg.vision.patch_size,) * 2
    tmap = vj.image_token_map(batch["input_ids"], cfg, grid)
    per_image = cfg.image_tokens_per_image(*grid)
    assert per_image == grid[0] * grid[1] + prefix
    assert sorted(set(tmap.image_index[tmap.image_mask].tolist())) == [0, 1, 2]
    b, positions = tmap.positions_of(1)
    assert len(positions) == per_image
    assert np.all(tmap.patch_row[b, positions[:prefix]] == -1)
    assert tmap.patch_row[b, positions[prefix]] == 0 and tmap.patch_col[b, positions[-1]] == grid[1] - 1


def test_full_strategy_with_class_token_marks_it():
    hf_config = hf_factory.hf_config_dict("clip-llama-mha")
    hf_config["vision_feature_select_strategy"] = "full"
    cfg = from_hf_config(hf_config)
    ids = np.array([[1, *[hf_factory.IMAGE_TOKEN] * 5, 7]])
    tmap = vj.image_token_map(ids, cfg)
    assert tmap.patch_row[0].tolist() == [-1, -1, 0, 0, 1, 1, -1]
    assert tmap.token_index[0].tolist() == [-1, 0, 1, 2, 3, 4, -1]


def test_prepare_without_processor_is_a_clear_error(hf_checkpoints):
    folder, _, _ = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, progress=False)
    assert model.processor is None
    with pytest.raises(vj.InputError, match="no processor"):
        model.prepare("hi", images=[Image.new("RGB", (28, 28))])
