"""No recompilation across batches of one bucket: XLA compilations are counted with
jax.monitoring while the same workload runs on new data of the same shapes. A program served
from the persistent compilation cache (conftest.py) counts too: JAX records the same backend
compile event for it, since jit had to compile it again instead of reusing it."""

from __future__ import annotations

import contextlib

import jax
import jax.monitoring
import numpy as np
import pytest

import vlm_jax as vj
from vlm_jax.probe.features import extract_features
from vlm_jax.train import TrainConfig, Trainer

_COMPILES = {"n": 0}


def _listener(name, secs, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def counting():
    box = {"n": 0}
    start = _COMPILES["n"]
    try:
        yield box
    finally:
        box["n"] = _COMPILES["n"] - start


WORDS = ["what shape is this", "what colour is it", "where is the shape", "is it red", "how many shapes are there"]


def examples(n, seed):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"<image> {WORDS[int(rng.integers(len(WORDS)))]}",
             "images": [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)],
             "answer": ["red", "blue", "circle"][int(rng.integers(3))]} for _ in range(n)]


@pytest.fixture(scope="module")
def model(random_llava):
    return vj.load(random_llava, progress=False)


def test_forward_capture_and_lens_compile_once_per_shape(model):
    def batch(seed):
        exs = examples(4, seed)
        return model.prepare(["<image> what shape is this"] * 4, images=[e["images"][0] for e in exs])

    sites = ("text.resid_post", "text.embed")
    out = model.run(batch(0), capture=sites)
    vj.logit_lens(model.params, model.config, vj.interp.stack_residuals(out.acts), k=5)
    with counting() as compiles:
        for seed in (1, 2, 3):
            out = model.run(batch(seed), capture=sites)
            vj.logit_lens(model.params, model.config, vj.interp.stack_residuals(out.acts), k=5)
    assert compiles["n"] == 0


def test_generation_compiles_once_per_shape(model):
    prompts = ["<image> what shape is this"] * 2
    exs = examples(2, 0)
    model.generate(model.prepare(prompts, images=[e["images"][0] for e in exs]), 4)
    with counting() as compiles:
        for seed in (1, 2):
            exs = examples(2, seed)
            model.generate(model.prepare(prompts, images=[e["images"][0] for e in exs]), 4)
    assert compiles["n"] == 0


def test_feature_extraction_compiles_once_for_all_batches_of_a_bucket(model, tmp_path):
    kw = dict(sites=("text.resid_post",), pooling=("last",), batch_size=4, progress=False, token_bucket=64)
    with counting() as one_batch:
        extract_features(model, examples(4, 0), str(tmp_path / "one"), **kw)
    assert one_batch["n"] >= 1
    # A second extraction (another folder, prompts of different lengths, all in the 64-token
    # bucket) reuses the first one's program: no compilation at all.
    with counting() as five_batches:
        extract_features(model, examples(20, 1), str(tmp_path / "five"), **kw)
    assert five_batches["n"] == 0


def test_training_steps_of_one_bucket_compile_once(model, random_llava, tmp_path):
    cfg = TrainConfig(model=random_llava, train_data=examples(32, 0), output_dir=str(tmp_path / "run"), batch_size=4,
                      max_steps=6, save_checkpoints=False, progress=False, token_bucket=32)
    trainer = Trainer(cfg, model=model)
    trainer.run()
    assert trainer._step._cache_size() == 1
