"""Finetuning step throughput: vlm_jax vs PyTorch + transformers (AdamW), same model and data.

Model: the LLaVA-1.5-shaped CPU preset (CLIP 4x256 at 336 px -> 576 image tokens, Llama 8x512,
vocab 32064), random weights in float32, loaded by both libraries from the same folder.
Batch: 2 examples of ~600 tokens (1 image each) with a 6-token answer; loss on the answer
tokens only. Two variants:
  full   every parameter trains (AdamW)
  lora   rank-8 LoRA on the text decoder's q_proj and v_proj (alpha 16); everything else frozen
Both sides float32; transformers without gradient checkpointing, vlm_jax with the policies in
--remat (default: none, the same as transformers). The first steps (compilation / warm-up) are
excluded (two steps each); the losses of the first step are checked equal before timing.

    python benchmarks/finetune.py [--steps 5] [--batch 2] [--remat none dots full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import best_of, machine, matmul_peak, peak_line, train_step_flops, use_malloc_tunables  # noqa: E402
from interp import build_model, make_inputs  # noqa: E402

from vlm_jax.models.layers import REMAT_POLICIES  # noqa: E402

ANSWER = 6


def batch_arrays(cfg, batch: int, seed: int) -> dict:
    inputs = make_inputs(cfg, batch, seed)
    t = inputs["input_ids"].shape[1]
    positions = np.tile(np.arange(t - ANSWER, t), (batch, 1)).astype(np.int32)
    return {
        "input_ids": inputs["input_ids"].astype(np.int32),
        "attention_mask": inputs["attention_mask"].astype(np.int32),
        "pixel_values": inputs["pixel_values"],
        "target_positions": positions,
        "target_ids": np.take_along_axis(inputs["input_ids"], positions, 1).astype(np.int32),
        "target_valid": np.ones((batch, ANSWER), bool),
    }


def pad_right(data: dict, multiple: int) -> dict:
    """batch_arrays' batch with its rows right-padded (token 0, attention mask 0) to a
    multiple of `multiple` tokens; the loss positions stay where they are."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rows are padded to a multiple of a whole number of tokens >= 1 (1: no padding); "
                         f"got {multiple!r}")
    t_len = data["input_ids"].shape[1]
    extra = -t_len % multiple
    if extra == 0:
        return data
    out = dict(data)
    for key in ("input_ids", "attention_mask"):
        out[key] = np.pad(data[key], ((0, 0), (0, extra)))
    return out


def compiled_step(model, folder: str, variant: str, remat, batch: dict, output_dir: str,
                  param_dtype: str = "float32"):
    """vlm_jax's training step for `variant` ('full': every parameter; 'lora': rank-8 LoRA on the
    text decoder's q_proj / v_proj) under `remat`, compiled once for `batch` ([accum, micro, ...]).
    Returns (trainer, the compiled program, a function running one step and returning its loss)."""
    from vlm_jax.train import LoraConfig, TrainConfig, Trainer

    lora = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"), towers=("text",)) if variant == "lora" else None
    cfg = TrainConfig(model=folder, train_data=[{}], output_dir=output_dir, lora=lora, param_dtype=param_dtype,
                      learning_rate=1e-5, betas=(0.9, 0.95), batch_size=1, max_grad_norm=None, remat=remat,
                      progress=False)
    trainer = Trainer(cfg, model=model)
    holder = {"state": trainer.initial_state()}  # the step donates its state: each step's output feeds the next
    program = trainer._step.lower(holder["state"], trainer.frozen, batch).compile()

    def step() -> float:
        holder["state"], metrics = program(holder["state"], trainer.frozen, batch)
        return float(metrics["loss"])

    return trainer, program, step


def lora_torch(model, rank=8, alpha=16.0):
    """Rank-r adapters on the text decoder's q_proj / v_proj (A random, B zero), base frozen."""
    import torch
    from torch import nn

    class LoraLinear(nn.Module):
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            like = {"device": base.weight.device, "dtype": base.weight.dtype}
            self.a = nn.Parameter(torch.randn(base.in_features, rank, **like) / rank)
            self.b = nn.Parameter(torch.zeros(rank, base.out_features, **like))
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + (x @ self.a) @ self.b * self.scale

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.language_model.layers:
        layer.self_attn.q_proj = LoraLinear(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoraLinear(layer.self_attn.v_proj)
    return [p for p in model.parameters() if p.requires_grad]


def torch_step_fn(model, params, data):
    """One AdamW step of `params` on `data` (loss on its target tokens, the last ANSWER real
    ones), on the model's device and in its dtype; returns the loss (a float, so the step has
    finished)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    device = model.device
    ids = torch.from_numpy(data["input_ids"].astype(np.int64)).to(device)
    labels = torch.full_like(ids, -100)  # the loss at batch_arrays' target positions only (padding may follow them)
    rows = torch.arange(ids.shape[0], device=device)[:, None]
    labels[rows, torch.from_numpy(data["target_positions"].astype(np.int64)).to(device)] = torch.from_numpy(
        data["target_ids"].astype(np.int64)).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.from_numpy(data["attention_mask"].astype(np.int64)).to(device),
              "pixel_values": torch.from_numpy(data["pixel_values"]).to(device, model.dtype)}

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        optimizer.step()
        return float(out.loss)

    return step


def main() -> None:
    use_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--remat", nargs="+", default=["none"], choices=tuple(REMAT_POLICIES),
                        help="vlm_jax's rematerialisation policies to time (TrainConfig.remat); transformers "
                             "runs without gradient checkpointing")
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    args = parser.parse_args()

    import torch
    from transformers import LlavaForConditionalGeneration

    import vlm_jax as vj

    folder = build_model(args.workdir)
    model = vj.load(folder, dtype="float32", progress=False)
    probes = [matmul_peak()]  # and another after the timings: the floors use the better
    data = batch_arrays(model.config, args.batch, seed=0)
    tokens = int(data["attention_mask"].sum())
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"batch: {args.batch} x {data['input_ids'].shape[1]} tokens ({tokens} real), answer {ANSWER} tokens")
    rows, temp_mib = [], {}
    for variant in ("full", "lora"):
        batch = {k: v[None] for k, v in data.items()}  # [accum=1, batch, ...]
        steps = {}  # one compiled step per rematerialisation policy, each with its own state
        for remat in args.remat:
            # the step compiled once: timed below, and asked for its temporary memory
            trainer, program, steps[remat] = compiled_step(model, folder, variant, remat, batch,
                                                           os.path.join(args.workdir, "ft"))
            temp_mib[variant, remat] = program.memory_analysis().temp_size_in_bytes / 2**20
        hf = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
        hf.train()
        params = lora_torch(hf) if variant == "lora" else list(hf.parameters())
        steps["transformers"] = torch_step_fn(hf, params, data)
        first = {name: fn() for name, fn in steps.items()}
        for remat in args.remat:
            assert abs(first[remat] - first["transformers"]) <= 1e-3 * abs(first["transformers"]), first
        # a second untimed step: vlm_jax's step donates its state, so its outputs take turns in two
        # sets of buffers, and the second step still page-faults its fresh ones in (1.6 s against
        # 0.8 s for a full step with the malloc tunables, zero faults from the third on)
        for fn in steps.values():
            fn()
        times = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        n_trainable = sum(int(x.size) for x in trainer.initial_trainable.values())
        med = {k: statistics.median(v) for k, v in times.items()}
        b, t_len = data["input_ids"].shape
        flops = train_step_flops(model.config, b, t_len, b, ANSWER, lora=variant == "lora")
        for remat in args.remat:
            rows.append((variant, remat, n_trainable, med[remat], med["transformers"], flops, temp_mib[variant, remat]))
        del hf
    probes.append(matmul_peak())
    peak = best_of(*probes)
    print(f"{peak_line(peak, probes)}; floor = the step's least FLOPs at that rate")
    print("\n| variant | remat | trainable params | vlm_jax step (s) | vlm_jax tokens/s | transformers step (s) "
          "| transformers tokens/s | ratio | floor (s) | vlm_jax / floor | transformers / floor "
          "| vlm_jax step's temporary memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, remat, n, ours, theirs, flops, temp in rows:
        floor = flops / peak["best"]
        print(f"| {variant} | {remat} | {n / 1e6:.2f}M | {ours:.3f} | {tokens / ours:.0f} | {theirs:.3f} "
              f"| {tokens / theirs:.0f} | {theirs / ours:.2f}x | {floor:.3f} | {ours / floor:.2f} | {theirs / floor:.2f} | {temp:.0f} |")


if __name__ == "__main__":
    main()
