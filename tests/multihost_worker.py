"""One of two processes of a multi-host run on CPU, started by tests/test_multihost.py.

    python tests/multihost_worker.py PROCESS_ID PORT FOLDER WORKDIR

Each process has 4 host CPU devices; jax.distributed joins the two into one 8-device
(data=2, fsdp=2, tensor=2) mesh over gloo collectives, as the hosts of a TPU pod are joined.
Both processes load the same checkpoint (each reading only its own devices' shards), run the
workloads of tests/multihost_inputs.py on the global mesh and export the model; process 0
writes WORKDIR/process-0.npz for the test to compare with a single-process unsharded run.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402

import vlm_jax as vj  # noqa: E402
from multihost_inputs import run_workloads  # noqa: E402
from vlm_jax import sharding as S  # noqa: E402
from vlm_jax.models.params import flatten  # noqa: E402
from vlm_jax.multihost import to_host  # noqa: E402


def main(process_id: int, port: int, folder: str, workdir: str) -> None:
    S.initialize_distributed(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    plan = S.ShardingPlan(S.make_mesh(data=2, fsdp=2, tensor=2))
    model = vj.load(folder, progress=False, sharding=plan)

    # every parameter is split by its rule, and this process holds only its own 4 devices' shards
    local = {d.id for d in jax.local_devices()}
    params = flatten(model.params).values()
    held = [{s.device.id for s in a.addressable_shards} for a in params]
    results = run_workloads(model, os.path.join(workdir, f"process-{process_id}"), to_host,
                            shared_dir=os.path.join(workdir, "shared"))
    results["owns_only_local"] = np.asarray(all(ids == local for ids in held))
    results["split"] = np.asarray(sum(a.addressable_shards[0].data.shape != a.shape for a in params))
    results["n_params"] = np.asarray(len(held))
    model.export_hf(os.path.join(workdir, f"exported-{process_id}"))
    tmp = os.path.join(workdir, f".process-{process_id}.npz")
    np.savez(tmp, **results)
    os.replace(tmp, os.path.join(workdir, f"process-{process_id}.npz"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
