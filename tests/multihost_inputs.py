"""Inputs of the multi-host test, shared by the test (its single-process reference) and the
worker processes, so both sides run exactly the same workloads."""

from __future__ import annotations

import numpy as np

SITES = ("text.embed", "text.resid_post", "vision.resid_post")
FEATURES = dict(sites=("text.resid_post",), pooling=("image_mean", "last"), batch_size=4, progress=False)
NEW_TOKENS = 5
TRAIN_STEPS = 2


def examples(n: int, seed: int = 0) -> list[dict]:
    """n prompts with one 56x56 image each and a one-word answer."""
    rng = np.random.default_rng(seed)
    words = ["what shape is this", "what colour is it", "where is the shape", "how many shapes"]
    return [{"prompt": f"<image> {words[i % 4]}", "images": [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)],
             "answer": ["red", "blue", "circle"][i % 3]} for i in range(n)]


def batch_inputs(model) -> object:
    """The forward/generation batch: 4 prompts (one per data x fsdp shard)."""
    exs = examples(4)
    return model.prepare([ex["prompt"] for ex in exs], images=[ex["images"][0] for ex in exs])


def train_config(folder: str, output_dir: str):
    """Two full-finetuning steps of batch 8, no checkpoints."""
    from vlm_jax.train import TrainConfig

    return TrainConfig(model=folder, train_data=examples(16, seed=3), output_dir=output_dir, batch_size=8,
                       max_steps=TRAIN_STEPS, learning_rate=1e-4, warmup_ratio=0.0, save_checkpoints=False,
                       progress=False, seed=0)


def run_workloads(model, workdir: str, gather) -> dict:
    """Every multi-host workload on `model`; `gather` turns a result array into numpy."""
    import os

    import vlm_jax as vj
    from vlm_jax.probe.features import extract_features
    from vlm_jax.train import Trainer

    batch = batch_inputs(model)
    out = model.run(batch, capture=SITES)
    lens = vj.logit_lens(model.params, model.config, vj.interp.stack_residuals(out.acts), k=5)
    results = {
        "logits": gather(out.logits),
        "text_resid_post": gather(out.acts["text.resid_post"]),
        "vision_resid_post": gather(out.acts["vision.resid_post"]),
        "lens_ids": gather(lens.top_ids),
        "tokens": np.asarray(model.generate(batch, NEW_TOKENS).tokens),
    }
    store = extract_features(model, examples(8), os.path.join(workdir, "features"), **FEATURES)
    results["features_last"] = np.asarray(store.load("text.resid_post", "last")) if os.path.exists(
        store.path("text.resid_post", "last")) else np.zeros(0)
    trained = Trainer(train_config(model.source, os.path.join(workdir, "train")), model=model).run()
    results["losses"] = np.asarray([trained.losses[step] for step in sorted(trained.losses)])
    return results
