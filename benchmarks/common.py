"""Shared benchmark helpers: timing, the machine's matmul peak, FLOP counts, the CPU model."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np


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

            ta = torch.from_numpy(np.asarray(a))
            with torch.no_grad():
                t = timed(lambda: torch.matmul(ta, ta), repeats)["min"]
            best["torch"] = max(best.get("torch", 0.0), 2 * n**3 / t)
        except ImportError:
            pass
    best["best"] = max(best.values())
    return best


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
            f"jax {jax.__version__} ({jax.default_backend()})")


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
