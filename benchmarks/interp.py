"""Interpretability workloads, vlm_jax vs transformers (PyTorch), same run, same machine.

Model: the LLaVA-1.5-shaped CPU preset (CLIP 4x256 at 336 px / 14 -> 576 image tokens, Llama
8x512, vocab 32064, ~62M parameters), random weights written once as a transformers folder so
both libraries load the same tensors. Inputs: batch 1 and 4, one image each, ~600 tokens.

Workloads (each checked equal between the two libraries before timing):
  forward      logits at every position
  capture      forward + every text residual stream (embeddings + each layer's output)
  lens         all-layer logit lens, top-5 at the 576 image tokens, forward included
  sweep8       8 single-layer zero ablations of the image tokens' residual, logits at the last
               position: one vmapped call (vlm_jax) vs 8 hooked forwards (transformers)
Reported: median seconds, the FLOP floor at the machine's best measured matmul rate, the ratio
time / floor, and vlm_jax's speed-up over transformers.

    python benchmarks/interp.py [--batches 1 4] [--repeats 5] [--workdir /tmp/vlm_jax_bench]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    best_of, forward_flops, lens_flops, machine, matmul_peak, peak_line, timed, use_malloc_tunables, workload_parser)

PRESET = "llava-1.5-cpu-60m"


def build_model(workdir: str) -> str:
    from vlm_jax.config import PRESETS
    from vlm_jax.random_model import make_random_llava

    folder = os.path.join(workdir, "llava-1.5-cpu-60m-hf")
    if not os.path.exists(folder):
        make_random_llava(folder, PRESETS[PRESET], with_processor=False)
    return folder


def make_inputs(cfg, batch: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    n_img = cfg.image_tokens_per_image()
    rows = [[1, *rng.randint(3, 31000, 5), *[cfg.image_token_id] * n_img, *rng.randint(3, 31000, 19)]
            for _ in range(batch)]
    ids = np.array(rows, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size).astype(np.float32)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def slow_repeats(repeats: int) -> int:
    """Repeats for the PyTorch sweeps: each call is 8 forwards, so half the repeats, at least 2."""
    return max(2, repeats // 2)


def prepare(cfg, inputs: dict) -> tuple:
    """The same inputs for both libraries.

    Returns (arrays: jax int32/float32 arrays, t_inputs: torch tensors, image_mask [B, T] bool,
    positions [B, P] int32: the image tokens' positions, last [B, 1] int32: the last position).
    """
    import jax.numpy as jnp
    import torch

    arrays = {k: jnp.asarray(v.astype(np.int32) if v.dtype == np.int64 else v) for k, v in inputs.items()}
    t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    image_mask = inputs["input_ids"] == cfg.image_token_id
    positions = np.stack([np.nonzero(row)[0] for row in image_mask]).astype(np.int32)
    batch, t_len = inputs["input_ids"].shape
    last = np.full((batch, 1), t_len - 1, np.int32)
    return arrays, t_inputs, image_mask, positions, last


def jax_workloads(cfg, fused: bool = False) -> dict:
    """The jitted vlm_jax workloads: forward -> logits [B, T, V]; capture -> (logits, acts with
    text.embed and text.resid_post); lens(params, arrays, positions [B, P]) -> top-5 (ids, probs),
    each [L + 1, B, P, 5], with no logits computed for the forward itself. fused: the fused
    attention kernel (the accelerator benchmark; the CPU scripts keep the explicit path)."""
    import jax

    from vlm_jax.interp.logit_lens import gather_positions, logit_lens, stack_residuals
    from vlm_jax.models import llava

    def forward(params, arrays):
        return llava.forward(params, cfg, arrays, fused_attention=fused).logits

    def capture(params, arrays):
        out = llava.forward(params, cfg, arrays, capture=("text.embed", "text.resid_post"), fused_attention=fused)
        return out.logits, out.acts

    def lens(params, arrays, positions):
        out = llava.forward(params, cfg, arrays, capture=("text.embed", "text.resid_post"), compute_logits=False,
                            fused_attention=fused)
        states = gather_positions(stack_residuals(out.acts), positions)
        result = logit_lens(params, cfg, states, k=5)
        return result.top_ids, result.top_probs

    return {"forward": jax.jit(forward), "capture": jax.jit(capture), "lens": jax.jit(lens)}


def sweep_edits(model, image_mask) -> list:
    """One Edits per text layer: zero the image tokens' residual after that layer."""
    n_layers = model.config.text.num_layers
    return [model.edits().zero("text.resid_post", layers=layer, where=image_mask) for layer in range(n_layers)]


def jax_sweep(model, inputs: dict, sets: list, last):
    """All ablations in one vmapped call: logits [n_sets, B, 1, V] at positions `last` [B, 1]."""
    return model.run_sweep(inputs, sets, logit_positions=last, fused_attention=False).logits


def lens_top5(norm, head, h, idx):
    """torch.topk (values, indices), each [B, P, 5], of softmax(head(norm(h))) at positions
    idx [B, P] of the residual h [B, T, D]."""
    import torch

    h = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
    return torch.topk(torch.softmax(head(norm(h)), -1), 5)


def hf_lens(hf, t_inputs: dict, positions, logits_to_keep: int = 1) -> list:
    """transformers' all-layer logit lens: one torch.topk (values, indices [B, P, 5]) per hidden
    state (embeddings + every layer), at the image positions [B, P].

    logits_to_keep: passed to the forward; the default 1 unembeds only the last position (0 would
    unembed every position, work the lens does not need; results before 2026-11-22 were taken so).
    """
    import torch

    lm = hf.model.language_model
    idx = torch.from_numpy(positions.astype(np.int64)).to(hf.device)
    with torch.no_grad():
        out = hf(**t_inputs, output_hidden_states=True, logits_to_keep=logits_to_keep)
        n_layers = len(out.hidden_states) - 1
        # the last state is already normed
        return [lens_top5(torch.nn.Identity() if layer == n_layers else lm.norm, hf.lm_head, h, idx)
                for layer, h in enumerate(out.hidden_states)]


def hf_sweep(hf, t_inputs: dict, image_mask) -> list:
    """8 hooked forwards, one per layer, zeroing the image tokens' residual after that layer:
    logits [B, 1, V] each."""
    import torch

    lm = hf.model.language_model
    mask_t = torch.from_numpy(image_mask)

    def hook(mod, args, output):
        out = output.clone()
        out[mask_t] = 0.0
        return out

    outs = []
    for layer in range(len(lm.layers)):
        handle = lm.layers[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                outs.append(hf(**t_inputs, logits_to_keep=1).logits)
        finally:
            handle.remove()
    return outs


def main() -> None:
    use_malloc_tunables()
    parser = workload_parser(__doc__, repeats=5)
    args = parser.parse_args()

    import jax
    import torch
    from transformers import LlavaForConditionalGeneration

    import vlm_jax as vj
    from vlm_jax.interp.logit_lens import stack_residuals

    folder = build_model(args.workdir)
    model = vj.load(folder, progress=False)
    cfg = model.config
    hf = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa").eval()
    probes = [matmul_peak()]  # and another after the timings: the floors use the better
    print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    n_layers = cfg.text.num_layers
    workloads = jax_workloads(cfg)
    jax_forward, jax_capture, jax_lens = workloads["forward"], workloads["capture"], workloads["lens"]

    results = []
    for batch in args.batches:
        inputs = make_inputs(cfg, batch)
        arrays, t_inputs, image_mask, positions, last = prepare(cfg, inputs)
        t_len = inputs["input_ids"].shape[1]
        fwd_flops = forward_flops(cfg, batch, t_len, batch)

        def record(name, ours, theirs, flops, note=""):
            row = {"batch": batch, "workload": name, "vlm_jax_s": ours["median"],
                   "transformers_s": theirs["median"] if theirs else None, "flops": flops,
                   "speedup": theirs["median"] / ours["median"] if theirs else None, "note": note}
            results.append(row)

        # --- forward -------------------------------------------------------------------------
        with torch.no_grad():
            hf_out = hf(**t_inputs, output_hidden_states=True)
        ours_logits = jax_forward(model.params, arrays)
        assert rel_err(ours_logits, hf_out.logits.numpy()) < 1e-4, "forward logits differ"
        with torch.no_grad():
            t_hf = timed(lambda: hf(**t_inputs), args.repeats)
        t_ours = timed(lambda: jax_forward(model.params, arrays).block_until_ready(), args.repeats)
        record("forward", t_ours, t_hf, fwd_flops)

        # --- capture every text residual -----------------------------------------------------
        logits, acts = jax_capture(model.params, arrays)
        hidden = np.asarray(stack_residuals(acts))
        for layer in range(n_layers):  # transformers' last hidden state is final-normed: compare before it
            assert rel_err(hidden[layer], hf_out.hidden_states[layer].numpy()) < 1e-4, f"hidden state {layer}"
        with torch.no_grad():
            t_hf = timed(lambda: hf(**t_inputs, output_hidden_states=True), args.repeats)
        t_ours = timed(lambda: jax.block_until_ready(jax_capture(model.params, arrays)), args.repeats)
        record("capture", t_ours, t_hf, fwd_flops, note=f"{t_ours['median'] / results[-1]['vlm_jax_s']:.3f}x forward")

        # --- all-layer logit lens at the image tokens -----------------------------------------
        ref = hf_lens(hf, t_inputs, positions)
        ids, probs = jax_lens(model.params, arrays, positions)
        ref_ids = np.stack([t.indices.numpy() for t in ref])
        agree = float(np.mean(np.asarray(ids) == ref_ids))
        assert agree > 0.999, f"lens top-5 ids agree at {agree:.4f}"
        assert rel_err(probs, np.stack([t.values.numpy() for t in ref])) < 1e-3
        t_hf = timed(lambda: hf_lens(hf, t_inputs, positions), args.repeats)
        t_ours = timed(lambda: jax.block_until_ready(jax_lens(model.params, arrays, positions)), args.repeats)
        lens_total = forward_flops(cfg, batch, t_len, batch, logit_positions=0) + lens_flops(
            cfg, batch, positions.shape[1], n_layers + 1)
        record("lens", t_ours, t_hf, lens_total, note=f"top-5 ids agree {agree:.4f}")

        # --- sweep of 8 single-layer ablations -----------------------------------------------
        sets = sweep_edits(model, image_mask)
        sweep = jax_sweep(model, inputs, sets, last)
        ref = np.stack([o.numpy() for o in hf_sweep(hf, t_inputs, image_mask)])
        assert rel_err(sweep, ref) < 1e-4, "sweep logits differ"
        t_hf = timed(lambda: hf_sweep(hf, t_inputs, image_mask), slow_repeats(args.repeats))
        t_ours = timed(lambda: jax.block_until_ready(jax_sweep(model, inputs, sets, last)), args.repeats)
        record("sweep8", t_ours, t_hf, n_layers * forward_flops(cfg, batch, t_len, batch, logit_positions=1))

    probes.append(matmul_peak())
    peak = best_of(*probes)
    print(peak_line(peak, probes))
    for r in results:
        r["floor_s"] = r["flops"] / peak["best"]
        r["vlm_jax_over_floor"] = r["vlm_jax_s"] / r["floor_s"]
        r["transformers_over_floor"] = r["transformers_s"] / r["floor_s"] if r["transformers_s"] else None
    print("\n| batch | workload | vlm_jax (s) | transformers (s) | floor (s) | vlm_jax / floor | transformers / floor "
          "| speed-up | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['workload']} | {r['vlm_jax_s']:.3f} | {r['transformers_s']:.3f} | "
              f"{r['floor_s']:.3f} | {r['vlm_jax_over_floor']:.2f} | {r['transformers_over_floor']:.2f} | "
              f"{r['speedup']:.2f}x | {r['note']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "peak_flops": peak, "probes": probes, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
