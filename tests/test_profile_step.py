"""benchmarks/profile_step.py: how it reads op scopes, how it charges time, and that it runs.

The model code names its components with jax.named_scope; the profile charges every traced op
to the scope in its HLO metadata. These tests pin the scope reading on real op names, the time
accounting on a synthetic trace (overlapping ops share, idle spans go to the asynchronous
products before them), and the whole script on a tiny model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from profile_step import attribute, hlo_instructions, scope_of  # noqa: E402


@pytest.mark.parametrize("op_name, expected", [
    ("jit(_train_step)/while/body/closed_call/transpose(jvp(text_decoder))/while/body/closed_call/checkpoint/"
     "attention/dot_general", ("text_decoder", "attention", "backward")),
    ("jit(_train_step)/while/body/closed_call/transpose(jvp(text_decoder))/while/body/closed_call/checkpoint/"
     "rematted_computation/mlp/mul", ("text_decoder", "mlp", "recompute")),
    # a transpose op in the forward pass is not autodiff's transposition
    ("jit(forward)/vision_tower/while/body/closed_call/attention/transpose", ("vision_tower", "attention", "forward")),
    ("jit(_train_step)/jvp(text_decoder)/while/body/closed_call/qkv_proj/rope/mul", ("text_decoder", "rope", "forward")),
    ("jit(_train_step)/optimizer/add", ("optimizer", "rest", "update")),
    ("jit(_train_step)/broadcast_in_dim", ("other", "rest", "forward")),
])
def test_scope_of_reads_component_part_and_phase(op_name, expected):
    assert scope_of(op_name) == expected


def test_hlo_instructions_reads_shapes_opcodes_and_scopes():
    text = """
  %dot.7 = f32[512,1376]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/mlp/transpose"}
  %while.3 = (s32[], f32[2,4]{1,0}) while(%tuple.1), condition=%cond, body=%body
  ROOT %ynn_fusion.2 = f32[8,128,64]{2,1,0} fusion(%x, %y), kind=kCustom, calls=%fused.2, metadata={op_name="jit(f)/attention/dot_general" stack_frame_id=3}
"""
    table = hlo_instructions(text)
    assert table["dot.7"] == ("f32[512,1376]", "dot", "jit(f)/mlp/transpose")
    assert table["while.3"][1] == "while"
    assert table["ynn_fusion.2"] == ("f32[8,128,64]", "fusion", "jit(f)/attention/dot_general")


def test_attribute_shares_overlaps_and_charges_idle_spans_to_async_products():
    """Two ops overlapping for 5 us share those 5 us; the idle span after an asynchronous product
    (an Eigen dot) is charged to it; a container op (while) spanning others is not charged; every
    microsecond of the execution is charged exactly once."""
    instructions = {"a": ("", "fusion", ""), "b": ("", "fusion", ""), "d": ("", "dot", ""), "e": ("", "fusion", ""),
                    "w": ("", "while", "")}

    def event(op, ts, dur, run="1", module="jit_f"):
        return {"ph": "X", "ts": ts, "dur": dur, "name": op, "args": {"hlo_op": op, "hlo_module": module, "run_id": run}}

    events = [event("w", 0, 35), event("a", 0, 10), event("b", 5, 10), event("d", 15, 1), event("e", 30, 5),
              event("a", 100, 4, run="2"), event("x", 0, 50, module="jit_other")]
    charged, runs = attribute(events, instructions, "jit_f")
    assert runs == 2
    assert charged == {"a": 7.5 + 4, "b": 7.5, "d": 1 + 14, "e": 5}
    assert sum(charged.values()) == 35 + 4


def table_rows(stdout: str) -> dict:
    """{(component, part): [forward, backward, recompute, update, total, share]} of the script's table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[-1].endswith("%"):
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def test_profile_script_runs_and_accounts_for_the_step(tmp_path):
    """The script on a tiny model: the full step's table has the text decoder's attention and MLP
    in forward, backward and (remat='dots') nowhere else, the optimizer's update, and shares
    that add up to 100%."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--tiny", "--workload", "full",
           "--steps", "1", "--top", "5", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    # a cell is empty where no time was charged (a charged cell may print as 0.0 on a tiny model)
    for part in ("attention", "mlp", "qkv_proj"):
        forward, backward = rows["text_decoder", part][:2]
        assert forward and backward, (part, rows["text_decoder", part])
    assert rows["optimizer", "rest"][3]
    assert abs(sum(float(r[-1].rstrip("%")) for r in rows.values()) - 100) < 0.5
    assert re.search(r"costliest ops", proc.stdout)


def test_profile_script_runs_a_decode_step(tmp_path):
    """The decode workload on a tiny model at 2 rows: generate's weights form (the stacked
    kernels on CPU), the decoder's MLP and the unembedding in the table, shares adding up."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--tiny", "--workload", "decode",
           "--batch", "2", "--steps", "3", "--top", "3", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decode step: 2 rows, weights stacked" in proc.stdout
    rows = table_rows(proc.stdout)
    assert rows["text_decoder", "mlp"][0] and rows["unembed", "rest"][0]  # charged (see the test above)
    assert all(not r[1] and not r[3] for r in rows.values())  # no backward, no update
    assert abs(sum(float(r[-1].rstrip("%")) for r in rows.values()) - 100) < 0.5


def test_profile_script_runs_the_prefill(tmp_path):
    """The prefill workload on a tiny model: the vision tower, the decoder's MLP and attention in
    the table, forward only."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--tiny", "--workload", "prefill",
           "--batch", "2", "--steps", "2", "--top", "3", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert rows["text_decoder", "mlp"][0] and rows["text_decoder", "attention"][0] and rows["vision_tower", "mlp"][0]
    assert all(not r[1] and not r[3] for r in rows.values())  # no backward, no update


def test_profile_script_runs_a_bfloat16_lora_step_on_padded_rows(tmp_path):
    """The accelerator form (--dtype bfloat16, rows right-padded to 64 tokens as the trainer's
    buckets are) on a tiny model: the padded batch, the text decoder's attention in forward and
    backward, shares adding up."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--tiny", "--workload", "lora",
           "--dtype", "bfloat16", "--pad-to", "64", "--steps", "1", "--top", "3", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workload: lora on a tiny model in bfloat16" in proc.stdout
    assert re.search(r"training batch: 2 rows x 64 tokens \(\d+ real\)", proc.stdout)
    rows = table_rows(proc.stdout)
    forward, backward = rows["text_decoder", "attention"][:2]
    assert forward and backward
    assert abs(sum(float(r[-1].rstrip("%")) for r in rows.values()) - 100) < 0.5
