"""Loading benchmark: peak host memory and time to load a ~1 GB checkpoint.

Writes a random LLaVA of about 1 GB (float32 safetensors), converts it once to a vlm_jax
(orbax) checkpoint, then loads each in fresh processes and reports:
  - peak RSS over the process baseline (after imports), as a ratio to the checkpoint size;
  - load time (median of --repeats), safetensors folder vs converted checkpoint;
  - the same for transformers' from_pretrained, when torch is installed.

    python benchmarks/loading.py [--workdir /tmp/vlm_jax_bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap

from vlm_jax import host_memory

CHILD = textwrap.dedent("""
    import json, os, sys, time
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    which, path = sys.argv[1], sys.argv[2]
    # imports (and transformers' lazy config/processor modules) are paid before the baseline
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llama import configuration_llama  # noqa
    from transformers.models.clip import configuration_clip  # noqa
    if which == "transformers":
        import torch
    else:
        import jax, jax.numpy as jnp
        import vlm_jax as vj
        for name in vj.__all__:  # vlm_jax imports its names on first use: import them all here
            getattr(vj, name)
        jnp.zeros(1).block_until_ready()
        import orbax.checkpoint  # noqa
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter here
    base = status("VmRSS")
    start = time.perf_counter()
    if which == "transformers":
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        # weights may still be lazily mmapped: read every one once, as a forward pass would
        with torch.no_grad():
            sum(float(p.sum()) for p in model.parameters())
    else:
        model = vj.load(path, progress=False)
        jax.block_until_ready(model.params)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "baseline": base, "peak": status("VmHWM")}))
""")


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if f.endswith(".safetensors"))


def run_child(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vlm_jax_bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import vlm_jax as vj
    from vlm_jax.random_model import build_tokenizer, make_random_llava, tiny_hf_config

    hf_dir = os.path.join(args.workdir, "llava-1gb-hf")
    conv_dir = os.path.join(args.workdir, "llava-1gb-vlm_jax")
    if not os.path.exists(hf_dir):
        tok = build_tokenizer()
        config = tiny_hf_config(32064, tok.convert_tokens_to_ids("<image>"), vision_layers=4, text_layers=14,
                                vision_width=256, text_width=1024, image_size=336)
        config["text_config"].update(intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16)
        make_random_llava(hf_dir, config)
    if not os.path.exists(conv_dir):
        vj.load(hf_dir, progress=False).save(conv_dir)
    size = folder_bytes(hf_dir)

    rows = []
    candidates = [("vlm_jax, safetensors folder", "vlm_jax", hf_dir), ("vlm_jax, converted (orbax)", "vlm_jax", conv_dir)]
    if importlib.util.find_spec("torch") is not None:  # transformers needs torch to load
        candidates.append(("transformers from_pretrained", "transformers", hf_dir))
    for label, which, path in candidates:
        runs = [run_child(which, path) for _ in range(args.repeats)]
        peak_over = statistics.median(r["peak"] - r["baseline"] for r in runs)
        rows.append((label, statistics.median(r["seconds"] for r in runs), peak_over / size,
                     statistics.median(r["peak"] for r in runs) / 2**30))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"{host_memory.status()}; "
          f"checkpoint: {size / 2**30:.2f} GiB float32 safetensors; median of {args.repeats} fresh processes")
    print("| loader | load time (s) | peak RSS over baseline / checkpoint size | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for label, seconds, ratio, peak in rows:
        print(f"| {label} | {seconds:.2f} | {ratio:.2f} | {peak:.2f} |")
    st, conv = rows[0][1], rows[1][1]
    print(f"converted (orbax) reload: {conv:.2f} s, {st / conv:.2f}x the speed of reading the safetensors folder ({st:.2f} s)")


if __name__ == "__main__":
    main()
