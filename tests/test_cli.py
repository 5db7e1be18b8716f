"""The `vlm-jax` commands, hub ids through huggingface_hub's cache, and the README's main job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import vlm_jax as vj
from vlm_jax.cli import main as cli_main
from vlm_jax.demo import draw_shape_image


def test_convert_defaults_under_checkpoints_and_export_round_trips(random_llava, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["convert", random_llava]) == 0
    converted = tmp_path / "checkpoints" / "llava-vlm_jax"
    assert (converted / "vlm_jax.json").exists() and (converted / "params").is_dir()
    assert (converted / "tokenizer.json").exists()
    assert "converted" in capsys.readouterr().out

    assert cli_main(["export", str(converted), str(tmp_path / "hf")]) == 0
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
    inputs = processor(images=[draw_shape_image()], text=["USER: <image>\nwhat is this ? ASSISTANT:"],
                       return_tensors="pt")
    import torch

    with torch.no_grad():
        ref = hf(**inputs).logits.numpy()
    ours = np.asarray(vj.load(str(converted)).run(inputs).logits)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-5


def test_generate_command(random_llava, tmp_path, capsys):
    image = tmp_path / "shape.png"
    draw_shape_image().save(image)
    assert cli_main(["generate", "--model", random_llava, "--image", str(image), "--prompt",
                     "what shape is this ?", "--chat", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model = vj.load(random_llava, progress=False)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is this ?"}]}]
    expected = model.generate(model.prepare(conversation=conversation, images=[draw_shape_image()]), 5).texts[0]
    assert printed == expected


def test_hub_id_loads_through_the_huggingface_cache(random_llava, tmp_path):
    """A hub id resolves through huggingface_hub (offline here: the cache stands in for the hub)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llava"
    shutil.copytree(random_llava, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = ("import vlm_jax as vj; m = vj.load('acme/tiny-llava', progress=False); "
            "print(m.num_params, m.processor is not None)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "True"
    assert int(done.stdout.split()[-2]) == vj.load(random_llava, progress=False).num_params
    missing = subprocess.run([sys.executable, "-c", "import vlm_jax as vj; vj.load('acme/absent')"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "Could not get 'acme/absent' from the Hugging Face hub" in missing.stderr


def test_demo_main_job(tmp_path, capsys):
    assert cli_main(["demo", "--workdir", str(tmp_path), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "logit lens"):
        assert stage in printed
    assert (tmp_path / "demo-random-llava-vlm_jax" / "vlm_jax.json").exists()


def _starts(command: list[str]) -> list[str]:
    """The malloc each start of `python -c ... <command>` ran with: a restart shows as a second line."""
    from vlm_jax import host_memory

    code = ("import os, sys; print('start:', os.environ.get('GLIBC_TUNABLES', 'glibc defaults'), flush=True); "
            "sys.argv = ['vlm-jax', *sys.argv[1:]]; from vlm_jax.cli import main; sys.exit(main())")
    env = host_memory.plain_environment()
    env.pop("VLM_JAX_MALLOC_TUNABLES")
    done = subprocess.run([sys.executable, "-c", code, *command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr  # the bad input below: a clear error after the restart
    assert done.stderr.startswith("error: ")
    return [line for line in done.stdout.splitlines() if line.startswith("start:")]


def test_long_jobs_restart_with_the_malloc_tunables_and_convert_does_not(tmp_path):
    from vlm_jax import host_memory

    if not host_memory.supported():
        pytest.skip("the malloc tunables need Linux with glibc >= 2.26")
    starts = _starts(["probe", "--features", str(tmp_path / "absent"), "--site", "text.resid_post", "--pooling",
                      "last"])
    assert starts[0] == "start: glibc defaults" and len(starts) == 2
    assert host_memory.active({"GLIBC_TUNABLES": starts[1].removeprefix("start: ")})
    assert _starts(["convert", str(tmp_path / "absent")]) == ["start: glibc defaults"]
