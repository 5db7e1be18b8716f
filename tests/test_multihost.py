"""Multi-host on one machine: two processes joined by jax.distributed (gloo collectives on CPU),
4 host devices each, one 8-device (data=2, fsdp=2, tensor=2) mesh across both.

The workers (tests/multihost_worker.py) load the checkpoint straight into their own shards, run
forward + capture, the logit lens, generation, feature extraction, two finetuning steps with
checkpoints and a resumed third, and an HF export; this test runs the same workloads
(tests/multihost_inputs.py) in one process, unsharded, and compares.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [process 0 results, process 1 results], workdir, folder)."""
    import vlm_jax as vj
    from multihost_inputs import run_workloads
    from vlm_jax.random_model import build_tokenizer, make_random_llava, tiny_hf_config

    workdir = tmp_path_factory.mktemp("multihost")
    tok = build_tokenizer()
    hf = tiny_hf_config(-(-len(tok) // 8) * 8, tok.convert_tokens_to_ids("<image>"))
    folder = make_random_llava(workdir / "hf", hf, tokenizer=tok, std=0.05)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    workers = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port), folder,
                                 str(workdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    # the single-process reference runs while the workers start up
    single = run_workloads(vj.load(folder, progress=False), str(workdir / "single"), np.asarray)
    logs = []
    for worker in workers:
        try:
            out, _ = worker.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        logs.append(out)
    for i, (worker, log) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"process {i} failed:\n" + log[-4000:]
    hosts = [dict(np.load(workdir / f"process-{i}.npz")) for i in range(2)]
    return single, hosts, workdir, folder


def test_each_process_holds_only_its_own_shards(runs):
    _, hosts, _, _ = runs
    for host in hosts:
        assert host["owns_only_local"]
        assert host["split"] == host["n_params"]  # on this mesh every parameter is split somewhere


@pytest.mark.parametrize("name", ["logits", "text_resid_post", "vision_resid_post"])
def test_forward_and_capture_across_hosts_equal_one_process(runs, name):
    single, hosts, _, _ = runs
    for host in hosts:  # every process sees the whole (gathered) result
        assert host[name].shape == single[name].shape
        np.testing.assert_allclose(host[name], single[name], atol=TOL, rtol=0)


def test_lens_and_generation_across_hosts_equal_one_process(runs):
    single, hosts, _, _ = runs
    for host in hosts:
        np.testing.assert_array_equal(host["lens_ids"], single["lens_ids"])
        np.testing.assert_array_equal(host["tokens"], single["tokens"])


def test_feature_extraction_is_written_once_by_process_zero(runs):
    single, hosts, workdir, _ = runs
    np.testing.assert_allclose(hosts[0]["features_last"], single["features_last"], atol=TOL, rtol=0)
    assert hosts[1]["features_last"].size == 0
    assert not os.path.exists(workdir / "process-1" / "features")


def test_finetuning_steps_across_hosts_equal_one_process(runs):
    single, hosts, workdir, _ = runs
    for host in hosts:
        np.testing.assert_allclose(host["losses"], single["losses"], rtol=TOL)
    with open(workdir / "shared" / "checkpointed" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]  # logged once, by process 0 (both processes share the folder)


def test_checkpoints_written_by_two_hosts_resume_exactly(runs):
    single, hosts, workdir, _ = runs
    for host in hosts:
        np.testing.assert_array_equal(host["resumed_steps"], [3])  # only the step after the checkpoint ran
        np.testing.assert_allclose(host["resumed_losses"], single["resumed_losses"], rtol=TOL)
    assert sorted(os.listdir(workdir / "shared" / "checkpointed" / "checkpoints")) == ["1", "2", "3"]


def test_export_from_shards_on_two_hosts_is_the_original_checkpoint(runs):
    from safetensors.numpy import load_file

    _, _, workdir, folder = runs
    assert not os.path.exists(workdir / "exported-1")  # process 1 gathers but writes nothing
    exported = load_file(str(workdir / "exported-0" / "model.safetensors"))
    original = load_file(os.path.join(folder, "model.safetensors"))
    assert exported.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
