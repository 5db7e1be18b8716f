"""Every benchmark workload in one command, vlm_jax against the tools researchers would use.

    python benchmarks/run_all.py [--quick] [--out benchmarks/last_run]

Runs, one after another on the same machine (each script checks that the outputs of the two
libraries agree before it times anything):
  interp.py      forward, capture-all, all-layer logit lens, 8-ablation sweep vs transformers;
                 each against its FLOP floor at the machine's best measured matmul rate
  interp_tools.py  capture-all, logit lens and 8-ablation sweep with nnsight (NNsight traces)
                 and TransformerLens (TransformerBridge run_with_cache / run_with_hooks), next to
                 transformers hooks and vlm_jax; a tool that is not installed, or cannot boot
                 offline, is reported as such and skipped
  generation.py  greedy decoding tokens/s vs transformers' generate()
  finetune.py    full and LoRA finetuning steps (tokens/s) vs PyTorch + transformers
  probes.py      33-layer logistic probes vs scikit-learn
  loading.py     peak host memory while loading, orbax reload time
  input_pipeline.py  finetuning and feature-extraction loops with the next batch prepared on a
                 background thread, against preparing each when its step comes (vlm_jax alone)
  gpu.py         only where a CUDA GPU is visible: the llava-1.5-7b-shaped model in bf16 (prefill,
                 logit lens, decoding, LoRA and full finetuning; tokens/s and MFU) vs transformers
TransformerLens and nnsight are timed by interp_tools.py (the runner first reports whether each
is installed); the other scripts compare vlm_jax with transformers alone.

Each script's output is printed and, with --out, saved as <out>/<script>.txt. The scripts run
with vlm_jax/host_memory.py's malloc tunables (both libraries share each script's process), but
loading.py, which measures peak memory, with glibc's defaults; --plain-malloc runs every script
with the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

from vlm_jax import host_memory

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = [
    ("interp", ["--batches", "1", "4", "--repeats", "5"]),
    ("interp_tools", ["--batches", "1", "--repeats", "3"]),
    ("generation", ["--batches", "1", "4", "--new-tokens", "32", "128", "--repeats", "3"]),
    ("finetune", ["--steps", "5", "--remat", "none", "dots", "full"]),
    ("probes", ["--repeats", "3"]),
    ("loading", ["--repeats", "3"]),
    ("input_pipeline", ["--repeats", "5"]),
    ("gpu", ["--repeats", "5"]),
]
QUICK = [
    ("interp", ["--batches", "1", "--repeats", "2"]),
    ("interp_tools", ["--batches", "1", "--repeats", "1"]),
    ("generation", ["--batches", "1", "--new-tokens", "8", "--repeats", "1"]),
    ("finetune", ["--steps", "2"]),
    ("probes", ["--repeats", "1"]),
    ("loading", ["--repeats", "1"]),
    ("input_pipeline", ["--repeats", "1", "--steps", "3"]),
    ("gpu", ["--repeats", "2", "--batch", "2", "--new-tokens", "16"]),
]


def gpu_visible() -> bool:
    """Whether torch sees a CUDA GPU (gpu.py compares both libraries on one)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and batch sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=[name for name, _ in FULL])
    parser.add_argument("--out", help="folder for each script's output")
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench", help="where the benchmark model is written")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="run the scripts with glibc's default malloc (not vlm_jax/host_memory.py's tunables)")
    args = parser.parse_args()
    plain = host_memory.plain_environment()
    tuned = plain if args.plain_malloc else host_memory.environment()
    for tool in ("transformer_lens", "nnsight"):
        found = importlib.util.find_spec(tool) is not None
        print(f"{tool}: {'installed (timed by interp_tools)' if found else 'not installed'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    failures = []
    for name, extra in QUICK if args.quick else FULL:
        if args.only and name not in args.only:
            continue
        if name == "gpu" and not gpu_visible():
            print("\n===== gpu: skipped (no CUDA GPU visible)")
            continue
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *extra]
        if name not in ("probes", "gpu"):
            cmd += ["--workdir", args.workdir]
        print(f"\n===== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=plain if name == "loading" else tuned)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            failures.append(name)
        print(f"===== {name}: {'ok' if not proc.returncode else 'FAILED'} in {time.perf_counter() - start:.0f} s")
        if args.out:
            with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
                f.write(proc.stdout)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
