"""Bad sharding input on one device: clear errors that say what to write instead."""

from __future__ import annotations

import jax
import pytest

from vlm_jax import sharding as S


@pytest.mark.parametrize("spec", ["fsdp=two", "pipeline=2", "data:2", "tensor="])
def test_parse_mesh_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="bad mesh spec .*data=2,fsdp=2,tensor=2"):
        S.parse_mesh(spec)


def test_parse_mesh_with_more_devices_than_exist():
    with pytest.raises(ValueError, match=r"= 4 devices, but 1 are available. Fix"):
        S.parse_mesh("data=2,tensor=2")


def test_mesh_sizes_below_one():
    with pytest.raises(ValueError, match="must be >= 1"):
        S.make_mesh(fsdp=0)


def test_as_plan_rejects_other_types():
    with pytest.raises(TypeError, match="ShardingPlan or a jax Mesh, not str"):
        S.as_plan("fsdp=2")
    assert S.as_plan(None) is None
    plan = S.parse_mesh("")  # every device on data
    assert S.as_plan(plan) is plan and dict(plan.mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


def test_single_device_batch_is_not_warned_about(recwarn):
    plan = S.parse_mesh("data=1")
    assert plan.batch_sharding((3, 5)).spec == jax.sharding.PartitionSpec()
    assert not [w for w in recwarn if "divisible" in str(w.message)]
