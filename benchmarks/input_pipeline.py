"""The input pipeline: finetuning and feature extraction with the next batch prepared on a
background thread (vlm_jax.prefetch) against preparing each batch when its step comes.

A step has a host half (the transformers processor: tokenising, resizing and normalising the
images; padding) and a device half (the compiled call). This script times both halves alone,
then whole loops, `Trainer.run()` (LoRA) and `extract_features()`, with prefetch depth 0 and 1,
alternating in one process, in two placements of the work on this machine's cores:
  shared     XLA's threads on every core, as on a plain CPU run: the prefetch thread competes
             with the step for the cores
  free core  XLA and the loop's thread on core 0, the prefetch thread on core 1: the situation of
             an accelerator's host, whose cores wait while the device runs a step
The second needs two cores or more; it is skipped on one.

Model: --model cpu-preset, the LLaVA-1.5-shaped CPU preset (CLIP at 336 px -> 576 image tokens,
Llama 8x512; random weights, the built-in word tokenizer and a CLIP image processor), or toy, the
tiny model of checkpoints/toy-llava (64 px, 16 image tokens), whose steps are short next to
the processor, as a large model's are on an accelerator. Examples: one 640 x 480 photo-sized
image each and a short prompt. Outputs are checked equal with and without prefetching.

    python benchmarks/input_pipeline.py [--model toy cpu-preset] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, timed, use_malloc_tunables  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "checkpoints", "toy-llava")


def preset_with_processor(workdir: str) -> str:
    """The CPU preset written once as a transformers folder with the word tokenizer's processor
    (the preset's own <image> and pad ids are those of a Llama tokenizer)."""
    from vlm_jax.config import PRESETS
    from vlm_jax.random_model import build_tokenizer, make_random_llava

    folder = os.path.join(workdir, "llava-1.5-cpu-60m-processor-hf")
    if not os.path.exists(folder):
        tokenizer = build_tokenizer()
        hf = dict(PRESETS["llava-1.5-cpu-60m"])
        hf.update(image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
        hf["text_config"] = {**hf["text_config"], "pad_token_id": tokenizer.pad_token_id}
        make_random_llava(folder, hf, tokenizer=tokenizer)
    return folder


class Examples:
    """n examples (one 640 x 480 image, a prompt, an answer) read by index, like a dataset on disk.
    With pin_to set, a read on any thread but the main one moves that thread to those cores:
    how the benchmark places the prefetch thread (it reads the examples of the batch it makes)."""

    def __init__(self, model, n: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        content = [{"type": "image"}, {"type": "text", "text": "what color is this ?"}]
        self.prompt = model.processor.chat([{"role": "user", "content": content}])
        self.images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), np.uint8)) for _ in range(n)]
        self.pin_to: set[int] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if self.pin_to is not None and threading.current_thread() is not threading.main_thread():
            os.sched_setaffinity(0, self.pin_to)
        return {"prompt": self.prompt, "images": [self.images[i]], "answer": " red"}


def pin_every_thread(cores: set[int]) -> None:
    """Every thread of this process (XLA's pools, the main thread) onto `cores`."""
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)


def main() -> None:
    use_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=("cpu-preset", "toy"), default=["toy"],
                        help="toy (default, ~20 s) and/or cpu-preset (~4 min: its steps are long next to the processor)")
    parser.add_argument("--steps", type=int, default=8, help="finetuning steps per timed run")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--extract-batch", type=int, default=8)
    parser.add_argument("--extract-batches", type=int, default=4, help="batches per timed extraction")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import vlm_jax as vj
    from vlm_jax.probe.features import extract_features
    from vlm_jax.train import LoraConfig, TrainConfig, Trainer

    cores = sorted(os.sched_getaffinity(0))
    print(f"machine: {machine()}")
    results = []
    for name in args.model:
        pin_every_thread(set(cores))  # each model starts from the shared placement
        folder = TOY if name == "toy" else preset_with_processor(args.workdir)
        model = vj.load(folder, dtype="float32", progress=False)
        n_train = args.steps * args.train_batch
        data = Examples(model, max(n_train, args.extract_batch * args.extract_batches))
        scratch = tempfile.mkdtemp()
        trainer = Trainer(TrainConfig(model=folder, train_data=data, output_dir=os.path.join(scratch, "train"),
                                      param_dtype="float32", batch_size=args.train_batch, max_steps=args.steps,
                                      lora=LoraConfig(rank=8, alpha=16.0), save_checkpoints=False, remat=False,
                                      progress=False, resume=False), model=model)
        extract_kw = dict(sites=("text.resid_post",), pooling=("image_mean", "last"), batch_size=args.extract_batch,
                          progress=False)
        n_extract = args.extract_batch * args.extract_batches

        class FirstExamples:  # the extraction's examples: the first n_extract of `data`
            def __len__(self):
                return n_extract

            def __getitem__(self, i):
                return data[i]

        def train(depth):
            trainer.config.prefetch_batches = depth
            return trainer.run().losses

        def extract(depth):
            out = os.path.join(tempfile.mkdtemp(dir=scratch), "features")
            store = extract_features(model, FirstExamples(), out, prefetch=depth, **extract_kw)
            arrays = {p: np.array(store.load("text.resid_post", p)) for p in extract_kw["pooling"]}
            shutil.rmtree(os.path.dirname(out))
            return arrays
        # compile, and check that prefetching changes nothing
        losses = {depth: train(depth) for depth in (0, 1)}
        feats = {depth: extract(depth) for depth in (0, 1)}
        assert losses[0] == losses[1], (losses[0], losses[1])
        assert all(np.array_equal(feats[0][p], feats[1][p]) for p in feats[0]), "extraction differs with prefetch"

        # the halves alone
        collate = timed(lambda: trainer.batch(0), args.repeats)["median"]
        state = trainer.initial_state()
        batch = trainer._place(trainer.batch(0))

        def one_step():
            nonlocal state
            state, metrics = trainer._step(state, trainer.frozen, batch)
            float(metrics["loss"])

        step = timed(one_step, args.repeats)["median"]
        row = {"model": name, "train_batch": args.train_batch, "collate_s": collate, "step_s": step, "loops": {}}
        placements = [("shared", None)] + ([("free core", ({cores[0]}, {cores[1]}))] if len(cores) > 1 else [])
        for placement, pins in placements:
            if pins is not None:
                pin_every_thread(pins[0])
                data.pin_to = pins[1]
            times = {(what, depth): [] for what in ("train", "extract") for depth in (0, 1)}
            for _ in range(args.repeats):
                for depth in (0, 1):
                    times[("train", depth)].append(timed(lambda: train(depth), 1, warmup=0)["median"])
                    times[("extract", depth)].append(timed(lambda: extract(depth), 1, warmup=0)["median"])
            medians = {f"{what} depth {depth}": statistics.median(ts) for (what, depth), ts in times.items()}
            row["loops"][placement] = medians
        data.pin_to = None
        shutil.rmtree(scratch)
        results.append(row)

        print(f"\n{name}: collate {collate * 1e3:.1f} ms per batch of {args.train_batch}, LoRA step "
              f"{step * 1e3:.1f} ms; loops (medians of {args.repeats}, prefetch depth 0 -> 1):")
        print("| placement | finetuning, {0} steps (s) | speed-up | extraction, {1} examples (s) | speed-up |".format(
            args.steps, n_extract))
        print("|---|---|---|---|---|")
        for placement, m in row["loops"].items():
            print(f"| {placement} | {m['train depth 0']:.3f} -> {m['train depth 1']:.3f} | "
                  f"{m['train depth 0'] / m['train depth 1']:.2f}x | {m['extract depth 0']:.3f} -> "
                  f"{m['extract depth 1']:.3f} | {m['extract depth 0'] / m['extract depth 1']:.2f}x |")
    pin_every_thread(set(cores))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
