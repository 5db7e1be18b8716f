"""The accelerator benchmark script (benchmarks/gpu.py) runs end to end.

No GPU is needed: --tiny runs the same code (model folders, both libraries, every workload and
its agreement check, the MFU arithmetic) on a tiny float32 model on CPU, so the script that a
session with a lent GPU runs is known to work before device time is spent on it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_script_runs_every_workload_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--tiny", "--repeats", "1", "--batch", "2",
           "--lens-batch", "1", "--train-batch", "2", "--new-tokens", "3", "--full-text-layers", "3",
           "--train-pad-to", "64",
           "--workdir", str(tmp_path / "models"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["workload"]: row for row in report["results"]}
    assert set(rows) == {"prefill", "lens", "decode", "lora", "full"}
    for row in rows.values():
        for key in ("vlm_jax_s", "transformers_s", "vlm_jax_mfu", "transformers_mfu"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["workload"], key, row[key])
    assert "all tokens 1.00" in rows["decode"]["note"]  # float32: the same tokens as generate()
    assert "| full |" in proc.stdout and report["peak_flops"]["best"] > 0
    assert "64 tokens per row" in rows["lora"]["note"]  # --train-pad-to: padded, and the losses still agreed


def test_decode_step_bytes_count_every_weight_a_step_reads():
    """The roofline floor of decoding reads each text-decoder weight and the unembedding once:
    decode_step_bytes with an empty cache equals those parameters of the real parameter specs,
    and the cache adds keys and values per row, layer and token."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import decode_step_bytes, generation_floor

    from vlm_jax.config import preset
    from vlm_jax.models import llava
    from vlm_jax.models.params import flatten

    for name in ("llava-1.5-cpu-60m", "llava-1.5-7b"):
        cfg = preset(name)
        specs = flatten(llava.param_specs(cfg))
        read = sum(math.prod(s.shape) for path, s in specs.items()
                   if path[0] == "lm_head" or (path[0] == "language_model" and path[1] != "embed_tokens"))
        assert decode_step_bytes(cfg, batch=3, cached_tokens=0) == 4 * read
        t = cfg.text
        per_token = 2 * t.num_layers * t.num_kv_heads * t.head_dim * 4
        assert decode_step_bytes(cfg, 3, 10) - decode_step_bytes(cfg, 3, 0) == 3 * 10 * per_token
    # a step bound by memory costs its bytes at the read rate; by FLOPs, its FLOPs at the matmul rate
    cfg = preset("llava-1.5-cpu-60m")
    slow_memory = generation_floor(cfg, 1, 600, 2, 1e11, 1e9) - generation_floor(cfg, 1, 600, 1, 1e11, 1e9)
    assert math.isclose(slow_memory, decode_step_bytes(cfg, 1, 601) / 1e9)


def test_padding_training_rows_pads_right_and_refuses_a_bad_multiple():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from finetune import pad_right

    data = {"input_ids": np.ones((2, 5), np.int32), "attention_mask": np.ones((2, 5), np.int32),
            "target_positions": np.array([[3, 4], [3, 4]])}
    padded = pad_right(data, 4)
    assert padded["input_ids"].shape == (2, 8) and padded["attention_mask"][:, 5:].sum() == 0
    assert padded["target_positions"] is data["target_positions"]
    for bad in (0, -64, 2.0):
        with pytest.raises(ValueError, match="whole number of tokens >= 1"):
            pad_right(data, bad)
