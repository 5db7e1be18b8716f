"""Shared benchmark helpers: timing, the machine's matmul peak, FLOP counts, the CPU model."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

from vlm_jax import host_memory


def use_malloc_tunables() -> None:
    """Restarts the script with vlm_jax.host_memory's malloc tunables where it has none yet: every
    script times vlm_jax and PyTorch in one process, so both get the same allocator.
    VLM_JAX_MALLOC_TUNABLES=0 (run_all.py --plain-malloc) measures with plain malloc."""
    host_memory.restart_with_tunables()


def workload_parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """The options every model workload script takes: --batches, --repeats, --workdir (where
    the benchmark model is written once) and --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    parser.add_argument("--json", help="also write the results here")
    return parser


def timed(fn: Callable, repeats: int = 5, warmup: int = 1) -> dict:
    """Median/min seconds of fn() over `repeats` runs after `warmup` runs (fn must block)."""
    first = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm = time.perf_counter() - first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "first": warm / max(warmup, 1)}


def matmul_peak(sizes=(2048, 4096), repeats: int = 5) -> dict:
    """Best float32 matmul rate (FLOP/s) of square matmuls, with JAX and (if installed) torch."""
    import jax
    import jax.numpy as jnp

    best = {}
    for n in sizes:
        a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
        f = jax.jit(lambda x, y: x @ y)
        t = timed(lambda: f(a, a).block_until_ready(), repeats)["min"]
        best["jax"] = max(best.get("jax", 0.0), 2 * n**3 / t)
        try:
            import torch

            ta = torch.from_numpy(np.array(a))  # a writable copy: torch warns about read-only arrays
            with torch.no_grad():
                t = timed(lambda: torch.matmul(ta, ta), repeats)["min"]
            best["torch"] = max(best.get("torch", 0.0), 2 * n**3 / t)
        except ImportError:
            pass
    best["best"] = max(best.values())
    return best


def best_of(*probes: dict) -> dict:
    """matmul_peak's rates, each the best over several probes of one run.

    The scripts probe before and after their timings and take the better: a shared machine's speed
    drifts (one 2-core VM ran a 2048^3 matmul at 270 GFLOP/s for minutes, at 440-510 otherwise),
    and a single probe taken in a slow spell would lower every floor and flatter every ratio."""
    merged = {}
    for probe in probes:
        for name, rate in probe.items():
            merged[name] = max(merged.get(name, 0.0), rate)
    return merged


def peak_line(peak: dict, probes: list[dict]) -> str:
    """'best float32 matmul: ...' with each probe's best, for the scripts' reports."""
    each = " / ".join(f"{p['best'] / 1e9:.0f}" for p in probes)
    libraries = ", ".join(f"{name} {peak[name] / 1e9:.0f}" for name in ("jax", "torch") if name in peak)
    return (f"best float32 matmul: {peak['best'] / 1e9:.0f} GFLOP/s ({libraries}; the better of the probes before "
            f"and after the timings: {each})")


def stream_peak(megabytes: int = 512, repeats: int = 7) -> float:
    """Best rate (bytes/s) at which a jitted sum reads a float32 array of `megabytes`, far larger
    than any CPU cache: the memory bandwidth that bounds decoding at small batch."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t = timed(lambda: total(x).block_until_ready(), repeats)["min"]
    return x.nbytes / t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import jax

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"jax {jax.__version__} ({jax.default_backend()}), {host_memory.status()}")


def forward_flops(cfg, batch: int, tokens: int, images: int, logit_positions: int | None = None,
                  vision_layers: int | None = None) -> float:
    """FLOPs of one LLaVA forward pass (matmuls and attention; causal attention counted half).

    logit_positions: positions per row that are unembedded (None = all tokens, 0 = none).
    """
    v, t = cfg.vision, cfg.text
    p = v.grid_size**2 + v.num_prefix_tokens
    n_v = cfg.vision_layers_needed if vision_layers is None else vision_layers
    vision = images * (
        2 * v.grid_size**2 * v.num_channels * v.patch_size**2 * v.hidden_size
        + n_v * (2 * p * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) + 4 * p * p * v.hidden_size)
    )
    p_out = cfg.image_tokens_per_image()
    projector = images * 2 * p_out * (v.hidden_size * len(cfg.vision_feature_layers) * t.hidden_size + t.hidden_size**2)
    proj = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    per_token = 2 * (proj + 3 * t.hidden_size * t.intermediate_size)
    attention = 4 * t.num_heads * t.head_dim * tokens * (tokens + 1) / 2
    text = batch * t.num_layers * (tokens * per_token + attention)
    n_logits = tokens if logit_positions is None else logit_positions
    head = batch * n_logits * 2 * t.hidden_size * t.vocab_size
    return float(vision + projector + text + head)


def lens_flops(cfg, batch: int, positions: int, layers: int) -> float:
    """FLOPs of unembedding `positions` states per row at `layers` layers."""
    return float(batch * layers * positions * 2 * cfg.text.hidden_size * cfg.text.vocab_size)


def train_step_flops(cfg, batch: int, tokens: int, images: int, answer_positions: int, lora: bool) -> float:
    """Least FLOPs of one training step: the forward (logits only at the answer positions) and
    the backward. Full finetuning forms every weight gradient as well as the gradients it passes
    back (two products per weight: 3x the forward). LoRA on the text decoder passes gradients
    back through the decoder's layers only (one product per weight); the adapters' own products
    are a rounding error and not counted."""
    forward = forward_flops(cfg, batch, tokens, images, logit_positions=answer_positions)
    if not lora:
        return 3 * forward
    return forward + forward_flops(cfg, batch, tokens, images=0, logit_positions=answer_positions)


def decode_step_flops(cfg, batch: int, cached_tokens: int) -> float:
    """FLOPs of one cached decode step: one token per row through every text weight and the
    unembedding, and attention over `cached_tokens`."""
    attention = 4 * cfg.text.num_layers * cfg.text.hidden_size * cached_tokens
    per_row = forward_flops(cfg, 1, 1, 0, logit_positions=1) + attention
    return float(batch * per_row)


def generation_flops(cfg, batch: int, prompt: int, new_tokens: int) -> float:
    """FLOPs of greedy decoding: the prefill (logits at the last position) and new_tokens - 1
    cached steps of one token each (every weight once, attention over the cache).
    Decoding at small batch is bound by reading the weights, not by these FLOPs."""
    prefill = forward_flops(cfg, batch, prompt, batch, logit_positions=1)
    return prefill + (new_tokens - 1) * decode_step_flops(cfg, batch, prompt)


def decode_step_bytes(cfg, batch: int, cached_tokens: int, dtype_bytes: int = 4) -> float:
    """Least bytes one cached decode step reads: every text-decoder weight and the unembedding
    once (the embedding row lookups are negligible), and each row's keys and values of the
    `cached_tokens` it attends to."""
    t = cfg.text
    proj = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    layer = proj + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    weights = t.num_layers * layer + t.hidden_size * (t.vocab_size + 1)
    cache = batch * t.num_layers * 2 * t.num_kv_heads * t.head_dim * cached_tokens
    return float((weights + cache) * dtype_bytes)


def generation_floor(cfg, batch: int, prompt: int, new_tokens: int, flop_rate: float, byte_rate: float) -> float:
    """Least seconds of greedy decoding on a roofline: the prefill's FLOPs at `flop_rate`, then
    each of the new_tokens - 1 cached steps at the slower of its FLOPs (at `flop_rate`) and its
    bytes (decode_step_bytes at `byte_rate`)."""
    prefill = forward_flops(cfg, batch, prompt, batch, logit_positions=1) / flop_rate
    steps = sum(max(decode_step_flops(cfg, batch, prompt + i) / flop_rate,
                    decode_step_bytes(cfg, batch, prompt + i) / byte_rate) for i in range(1, new_tokens))
    return prefill + steps
