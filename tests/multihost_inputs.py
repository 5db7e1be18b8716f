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


def train_config(folder: str, output_dir: str, steps: int = TRAIN_STEPS, save: bool = False):
    """Full finetuning, batch 8; with `save`, an orbax checkpoint after every step."""
    from vlm_jax.train import TrainConfig

    return TrainConfig(model=folder, train_data=examples(16, seed=3), output_dir=output_dir, batch_size=8,
                       max_steps=steps, learning_rate=1e-4, warmup_ratio=0.0, save_checkpoints=save,
                       checkpoint_every=1, progress=False, seed=0)


def run_workloads(model, workdir: str, gather, shared_dir: str | None = None) -> dict:
    """Every multi-host workload on `model`; `gather` turns a result array into numpy.
    shared_dir: a folder every process passes the same (orbax checkpoints; default workdir)."""
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
    # two steps with a checkpoint after each, then a longer run resumes from the last one (step 2)
    saved_dir = os.path.join(shared_dir or workdir, "checkpointed")
    trained = Trainer(train_config(model.source, saved_dir, save=True), model=model).run()
    results["losses"] = np.asarray([trained.losses[step] for step in sorted(trained.losses)])
    resumed = Trainer(train_config(model.source, saved_dir, steps=TRAIN_STEPS + 1, save=True), model=model).run()
    results["resumed_losses"] = np.asarray([resumed.losses[step] for step in sorted(resumed.losses)])
    results["resumed_steps"] = np.asarray(sorted(resumed.losses))
    return results
