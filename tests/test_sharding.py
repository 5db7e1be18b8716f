"""Sharding on 8 host CPU devices (in a subprocess: the device count is fixed at JAX start-up).

The worker (tests/sharding_worker.py) runs every workload unsharded and on a 2x2x2
(data, fsdp, tensor) mesh and reports the differences; these tests judge the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(workdir)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(workdir / "report.json") as f:
        return json.load(f)


def test_parameters_are_split_into_their_rule_shards(report):
    for source in ("hf_shards", "converted_shards"):
        shards = report[source]
        assert shards["bad"] == [], shards["bad"]
        assert shards["split"] == shards["total"]  # on this config every parameter has a split axis
    assert report["fallbacks"] == []
    assert report["hf_param_diff"] == 0.0 and report["converted_param_diff"] == 0.0


def test_sharded_forward_capture_lens_equal_unsharded(report):
    assert report["logits_diff"] < TOL
    for site, diff in report["capture_diff"].items():
        assert diff < TOL, site
    assert report["logits_spec"] == "P(('data', 'fsdp'), None, 'tensor')"  # batch and vocab stay split
    assert report["lens_ids_equal"] and report["lens_prob_diff"] < TOL
    assert report["block_attention_diff"] < TOL
    assert report["sweep_diff"] < TOL and report["sweep_effect"] > 1e-3
    assert report["generate_equal"]


def test_tensor_parallel_attention_gathers_no_activations(report):
    """With heads split over the tensor axis and several sequences per batch shard, no q, k,
    v or attention output is gathered across devices, in the forward or the decode program.
    (Products over one merged batch*heads axis made XLA gather them in every attention.)"""
    tp = report["tensor_parallel"]
    assert tp["forward_attention_gathers"] == [] and tp["decode_attention_gathers"] == []
    assert tp["logits_diff"] < TOL and tp["generate_equal"]


def test_tpu_attention_kernel_runs_per_shard_and_equals_unsharded(report):
    """The fused attention's TPU kernel (splash attention, in Pallas's interpreter) in shard_map
    on two meshes: logits at real positions and the gradient of a loss on them equal the
    unsharded explicit path's; two sequences of the batch are padded."""
    tpu = report["tpu_kernel"]
    assert tpu["padded_rows"] >= 1
    for mesh in ("data2_fsdp2_tensor2", "data4_tensor2"):
        assert tpu[mesh]["kernel_per_shard"], mesh
        assert tpu[mesh]["logits_diff"] < TOL and tpu[mesh]["grad_rel_diff"] < TOL, (mesh, tpu[mesh])


def test_sharded_feature_extraction_equals_unsharded(report):
    assert report["features_files"] == 3
    assert report["features_diff"] < TOL


@pytest.mark.parametrize("kind", ["train_full", "train_lora"])
def test_sharded_training_step_equals_unsharded(report, kind):
    """Full finetuning (remat "full") and LoRA (remat "dots") on data=2 x fsdp=2 x tensor=2."""
    r = report[kind]
    for a, b in zip(r["loss_single"], r["loss_sharded"]):
        assert abs(a - b) <= TOL * max(1.0, abs(a))
    assert r["param_diff"] < TOL and r["opt_diff"] < TOL
    assert r["moments_split"] == r["moments"]  # optimizer state sits with its parameter's shards
    assert r["params_split"] > 0
    assert r["step_compiles"] == 1  # three steps, one compilation


def test_mistakes_that_need_several_devices_are_explained(report):
    bad = report["bad_input"]
    assert bad["indivisible_batch_spec"] in ("P()", "PartitionSpec()")  # replicated, still correct
    assert len(bad["indivisible_batch_warning"]) == 1
    assert "not divisible by data x fsdp = 4" in bad["indivisible_batch_warning"][0]
    assert "12 devices, but 8 are available" in bad["wrong_product"] and "Fix:" in bad["wrong_product"]
    assert "cannot be split into fsdp=3" in bad["fsdp_not_dividing"]
    assert "missing" in bad["mesh_without_axes"] and "make_mesh" in bad["mesh_without_axes"]
