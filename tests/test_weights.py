"""HF folders in (both key layouts, sharded), vlm_jax checkpoints, and HF folders out."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf_factory
import vlm_jax as vj
from vlm_jax.safetensors_io import TensorReader, read_header


def read_all(folder: str) -> dict[str, np.ndarray]:
    """Every tensor in an HF folder by name (bf16 included)."""
    out = {}
    with TensorReader() as reader:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                for key, entry in read_header(os.path.join(folder, name)).items():
                    out[key] = reader.read(entry)
    return out


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def transformers_logits(folder: str, batch: dict) -> np.ndarray:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    logits, _, _ = hf_factory.hf_forward(model, batch)
    return logits


@pytest.mark.parametrize("case", ["clip-llama-mha", "clip-gelu-llama3rope-gqa-tied-multilayer",
                                  "siglip-mistral-sliding-full-nobias", "dinov2reg-swiglu-llama-bias-linear-rope",
                                  "dinov2-qwen2-mixed-sliding-interpolated"])
def test_hf_round_trip_is_bitwise_and_loads_in_transformers(hf_checkpoints, tmp_path, case):
    folder, hf_model, hf_config = hf_checkpoints(case)
    model = vj.load(folder, progress=False)
    out = model.export_hf(tmp_path / "export")
    assert_bitwise_equal(read_all(folder), read_all(out))
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size(case))
    ref, _, _ = hf_factory.hf_forward(hf_model, batch)
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(transformers_logits(out, batch), ref, valid) == 0.0


def test_export_in_another_dtype_casts_every_tensor(hf_checkpoints, tmp_path):
    import json

    import ml_dtypes

    folder, _, _ = hf_checkpoints("clip-llama-mha")
    out = vj.load(folder, progress=False).export_hf(tmp_path / "bf16", dtype="bfloat16")
    expected = {key: value.astype(ml_dtypes.bfloat16) for key, value in read_all(folder).items()}
    assert_bitwise_equal(expected, read_all(out))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_converted_checkpoint_round_trip(hf_checkpoints, tmp_path):
    folder, hf_model, hf_config = hf_checkpoints("siglip-mistral-sliding-full-nobias")
    converted = vj.load(folder, progress=False).save(tmp_path / "converted")
    assert os.path.exists(os.path.join(converted, "vlm_jax.json"))
    reloaded = vj.load(converted)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("siglip-mistral-sliding-full-nobias"))
    ref, _, _ = hf_factory.hf_forward(hf_model, batch)
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(reloaded.run(batch).logits, ref, valid) <= 1e-5
    exported = reloaded.export_hf(tmp_path / "exported")
    assert_bitwise_equal(read_all(folder), read_all(exported))


def test_converted_checkpoint_restores_in_another_dtype(hf_checkpoints, tmp_path):
    folder, _, _ = hf_checkpoints("clip-llama-mha")
    converted = vj.load(folder, progress=False).save(tmp_path / "c")
    model = vj.load(converted, dtype="bfloat16")
    assert str(model.dtype) == "bfloat16"


def _rewrite_to_current_layout(src: str, dst: str) -> None:
    """The layout transformers 4.5x wrote: model.language_model.*, model.vision_tower.vision_model.*,
    model.multi_modal_projector.*, lm_head.weight."""
    tensors = {}
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        for key in f.keys():
            new = key
            if key.startswith("language_model.model."):
                new = "model.language_model." + key[len("language_model.model."):]
            elif key == "language_model.lm_head.weight":
                new = "lm_head.weight"
            elif key.startswith("vision_tower."):
                new = "model.vision_tower.vision_model." + key[len("vision_tower."):]
            elif key.startswith("multi_modal_projector."):
                new = "model." + key
            tensors[new] = f.get_tensor(key)
    tensors["model.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(5)[None]  # legacy buffer
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def test_current_key_layout_loads_and_exports_under_the_same_names(hf_checkpoints, tmp_path):
    folder, hf_model, hf_config = hf_checkpoints("clip-llama-mha")
    current = str(tmp_path / "current")
    _rewrite_to_current_layout(folder, current)
    model = vj.load(current, progress=False)
    assert model.layout.top == "current" and model.layout.vision_inner
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"))
    ref, _, _ = hf_factory.hf_forward(hf_model, batch)
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(model.run(batch).logits, ref, valid) <= 1e-5
    exported = read_all(model.export_hf(tmp_path / "out"))
    original = read_all(current)
    del original["model.vision_tower.vision_model.embeddings.position_ids"]  # a buffer, not a parameter
    assert_bitwise_equal(original, exported)


def test_dinov2_current_attention_names_load(hf_checkpoints, tmp_path):
    folder, _, hf_config = hf_checkpoints("dinov2-qwen2-mixed-sliding-interpolated")
    tensors = {}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for key in f.keys():
            new = key.replace(".attention.attention.query.", ".attention.q_proj.")
            new = new.replace(".attention.attention.key.", ".attention.k_proj.")
            new = new.replace(".attention.attention.value.", ".attention.v_proj.")
            new = new.replace(".attention.output.dense.", ".attention.o_proj.")
            tensors[new] = f.get_tensor(key)
    dst = tmp_path / "dino"
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    a = vj.load(folder, progress=False)
    b = vj.load(str(dst), progress=False)
    assert b.layout.dinov2_names == "current"
    batch = hf_factory.make_batch(hf_config, 28)
    np.testing.assert_array_equal(np.asarray(a.run(batch).logits), np.asarray(b.run(batch).logits))
    assert_bitwise_equal(tensors_np(tensors), read_all(b.export_hf(tmp_path / "out")))


def tensors_np(tensors: dict) -> dict:
    return {k: v.numpy() for k, v in tensors.items()}


def test_sharded_checkpoints_in_and_out(tmp_path):
    hf_config = hf_factory.hf_config_dict("clip-llama-mha")
    hf_model = hf_factory.build_hf_model(hf_config)
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(str(folder), max_shard_size="20KB")
    assert os.path.exists(folder / "model.safetensors.index.json")
    model = vj.load(str(folder), progress=False)
    batch = hf_factory.make_batch(hf_config, hf_factory.image_size("clip-llama-mha"))
    ref, _, _ = hf_factory.hf_forward(hf_model, batch)
    valid = batch["attention_mask"].astype(bool)
    assert hf_factory.rel_err(model.run(batch).logits, ref, valid) <= 1e-5
    out = model.export_hf(tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
    assert len(set(index["weight_map"].values())) > 1
    assert_bitwise_equal(read_all(str(folder)), read_all(out))
    assert hf_factory.rel_err(transformers_logits(out, batch), ref, valid) == 0.0


def test_bf16_checkpoint_round_trip_keeps_bf16(tmp_path):
    hf_config = hf_factory.hf_config_dict("clip-llama-mha")
    hf_model = hf_factory.build_hf_model(hf_config).to(torch.bfloat16)
    folder = hf_factory.save_hf_model(hf_model, tmp_path / "bf16")
    model = vj.load(folder, progress=False)
    assert str(model.dtype) == "bfloat16"
    assert_bitwise_equal(read_all(folder), read_all(model.export_hf(tmp_path / "out")))


def test_load_casts_dtype(hf_checkpoints):
    folder, _, _ = hf_checkpoints("clip-llama-mha")
    model = vj.load(folder, dtype="bfloat16", progress=False)
    import jax

    assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {"bfloat16"}
