"""Bad input: one clear error naming the problem and the fix, and nothing half written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf_factory
import vlm_jax as vj
from vlm_jax.cli import main as cli_main


@pytest.fixture(scope="module")
def clip_case(hf_checkpoints):
    folder, _, hf_config = hf_checkpoints("clip-llama-mha")
    return folder, hf_config, vj.load(folder, progress=False)


def test_image_token_count_must_match_images(clip_case):
    _, hf_config, model = clip_case
    batch = hf_factory.make_batch(hf_config, 28)
    batch["pixel_values"] = batch["pixel_values"][:2]  # prompts show 3 images
    with pytest.raises(vj.InputError, match=r"image tokens but 2 image\(s\) need .*<image>"):
        model.run(batch)


def test_image_tokens_without_pixels(clip_case):
    _, hf_config, model = clip_case
    batch = hf_factory.make_batch(hf_config, 28)
    del batch["pixel_values"]
    with pytest.raises(vj.InputError, match="no pixel_values"):
        model.run(batch)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 28, 28), r"must be \[images, 3, height, width\]"),
    ((3, 3, 56, 56), r"takes 28x28 images"),
    ((3, 28, 28), r"must be \[images, 3, height, width\]"),
])
def test_wrong_pixel_shape(clip_case, shape, message):
    _, hf_config, model = clip_case
    batch = hf_factory.make_batch(hf_config, 28)
    batch["pixel_values"] = np.zeros(shape, np.float32)
    with pytest.raises(vj.InputError, match=message):
        model.run(batch)


def test_token_ids_outside_the_vocabulary(clip_case):
    _, hf_config, model = clip_case
    batch = hf_factory.make_batch(hf_config, 28)
    batch["input_ids"][1, -1] = hf_factory.VOCAB + 5
    with pytest.raises(vj.InputError, match=r"token id 165 at input_ids\[1, .*outside the vocabulary \[0, 160\)"):
        model.run(batch)


def test_mask_shape_must_match(clip_case):
    _, hf_config, model = clip_case
    batch = hf_factory.make_batch(hf_config, 28)
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(vj.InputError, match="attention_mask has shape"):
        model.run(batch)


def test_weights_mismatch_lists_every_problem(clip_case, tmp_path):
    folder = clip_case[0]
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    del tensors["multi_modal_projector.linear_2.bias"]
    tensors["language_model.model.layers.0.self_attn.rotary.extra"] = torch.zeros(3)
    tensors["vision_tower.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(folder, "config.json"), bad / "config.json")
    with pytest.raises(vj.WeightsMismatchError) as info:
        vj.load(str(bad), progress=False)
    err = info.value
    assert sorted(err.missing) == ["language_model.model.layers.1.mlp.up_proj.weight",
                                   "multi_modal_projector.linear_2.bias"]
    assert err.unexpected == ["language_model.model.layers.0.self_attn.rotary.extra"]
    assert err.mismatched == [("vision_tower.encoder.layers.0.mlp.fc1.weight", (64, 32), (7, 32))]
    text = str(err)
    assert "2 missing" in text and "1 unexpected" in text and "expected (64, 32), found (7, 32)" in text


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path):
    config = hf_factory.hf_config_dict("clip-llama-mha")
    config["text_config"]["model_type"] = "gemma"
    with pytest.raises(vj.UnsupportedArchitectureError, match=r"'gemma'.*Supported: llama, mistral, qwen2"):
        vj.from_hf_config(config)
    with pytest.raises(vj.UnsupportedArchitectureError, match=r"model_type='llava_next'.*implements model_type 'llava'"):
        vj.from_hf_config({**config, "model_type": "llava_next"})
    config = hf_factory.hf_config_dict("clip-llama-mha")
    config["vision_config"]["model_type"] = "vit"
    with pytest.raises(vj.UnsupportedArchitectureError, match="'vit'.*clip_vision_model"):
        vj.from_hf_config(config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(vj.UnsupportedArchitectureError, match="bert"):
        vj.load(str(tmp_path), progress=False)


def test_truncated_safetensors(clip_case, tmp_path):
    folder = clip_case[0]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(vj.CorruptCheckpointError, match="model.safetensors is truncated.*download or save"):
        vj.load(str(broken), progress=False)
    path.write_bytes(data[:4])
    with pytest.raises(vj.CorruptCheckpointError, match="truncated"):
        vj.load(str(broken), progress=False)


def test_missing_shard(tmp_path):
    hf_config = hf_factory.hf_config_dict("clip-llama-mha")
    folder = tmp_path / "sharded"
    hf_factory.build_hf_model(hf_config).save_pretrained(str(folder), max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))[0]
    os.remove(folder / shard)
    with pytest.raises(vj.CorruptCheckpointError, match="shard.*not in the folder"):
        vj.load(str(folder), progress=False)


def test_existing_output_folder_is_refused_unless_forced(clip_case, tmp_path, capsys):
    folder, _, model = clip_case
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(vj.OutputExistsError, match="already exists.*--force"):
        model.save(out)
    assert (out / "keep.txt").read_text() == "mine"
    assert cli_main(["convert", folder, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", folder, str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "vlm_jax.json").exists()
    with pytest.raises(vj.OutputExistsError):
        model.export_hf(out)


def test_failed_convert_leaves_no_partial_folder(clip_case, tmp_path, monkeypatch):
    folder, _, model = clip_case
    import orbax.checkpoint as ocp

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []
    # a failure while replacing (--force) keeps the old folder intact
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        model.save(old, force=True)
    assert os.listdir(tmp_path) == ["old"] and (old / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_no_partial_folder(clip_case, tmp_path, monkeypatch):
    _, _, model = clip_case
    import vlm_jax.weights as weights

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "write_safetensors", explode)
    monkeypatch.setattr("vlm_jax.checkpoint.write_safetensors", explode)
    with pytest.raises(OSError, match="disk full"):
        model.export_hf(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_unknown_capture_site_lists_valid_ones(clip_case):
    _, hf_config, model = clip_case
    with pytest.raises(KeyError, match=r"unknown capture site\(s\) \['text.resid'\].*text.resid_post"):
        model.run(hf_factory.make_batch(hf_config, 28), capture=("text.resid",))


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(vj.VlmJaxError, match="no config.json"):
        vj.load(str(tmp_path), progress=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_factory.hf_config_dict("clip-llama-mha")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(vj.CorruptCheckpointError, match="PyTorch pickles.*safe_serialization"):
        vj.load(str(tmp_path), progress=False)
