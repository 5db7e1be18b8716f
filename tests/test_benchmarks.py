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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_script_runs_every_workload_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--tiny", "--repeats", "1", "--batch", "2",
           "--lens-batch", "1", "--train-batch", "2", "--new-tokens", "3", "--full-text-layers", "3",
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
