"""Configs: transformers <-> ours, presets, and abstract shapes of the real 7B/13B models."""

from __future__ import annotations

import jax
import pytest
import torch

import hf_factory
import vlm_jax as vj
from vlm_jax.config import PRESETS, from_hf_config, to_hf_config
from vlm_jax.models import params as P


@pytest.mark.parametrize("case", list(hf_factory.CASES))
def test_to_hf_config_round_trips_and_transformers_accepts_it(case):
    from transformers import LlavaConfig

    cfg = from_hf_config(hf_factory.hf_config_dict(case))
    hf_dict = to_hf_config(cfg)
    assert from_hf_config(hf_dict) == cfg
    assert from_hf_config(LlavaConfig(**hf_dict)) == cfg


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-1.5-13b"])
def test_eval_shape_matches_transformers_parameter_count_without_allocating(name):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        hf_model = LlavaForConditionalGeneration(LlavaConfig(**PRESETS[name]))
    hf_count = sum(p.numel() for p in hf_model.parameters())

    before = len(jax.live_arrays())
    abstract = vj.abstract_params(vj.preset(name), jax.numpy.bfloat16)
    assert len(jax.live_arrays()) == before  # nothing was allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    assert P.count(abstract) == hf_count
    # and the specs agree with the per-tensor shapes transformers builds
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    assert sum(int(torch.Size(s).numel()) for s in hf_shapes.values()) == hf_count


def test_logical_axes_cover_every_parameter():
    cfg = vj.preset("llava-1.5-cpu-60m")
    axes = vj.logical_axes(cfg)
    abstract = vj.abstract_params(cfg)
    flat_axes = P.flatten(axes)
    for path, leaf in P.flatten(abstract).items():
        assert len(flat_axes[path]) == len(leaf.shape), path
    assert flat_axes[("language_model", "layers", "self_attn", "q_proj", "kernel")] == (
        "layers", "embed", "heads", "head_dim")


def test_cpu_benchmark_preset_size():
    count = P.count(vj.abstract_params(vj.preset("llava-1.5-cpu-60m")))
    assert 50e6 < count < 70e6


def test_the_package_imports_its_names_on_first_use():
    """`import vlm_jax` imports no jax (the command line restarts itself with malloc tunables
    before anything heavy is imported); every public name and subpackage still resolves."""
    import subprocess
    import sys

    code = ("import sys, vlm_jax; assert 'jax' not in sys.modules, 'import vlm_jax imported jax'; "
            "import vlm_jax.cli; assert 'jax' not in sys.modules, 'import vlm_jax.cli imported jax'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(vj.__all__) == sorted(vj._EXPORTS)
    for name in vj.__all__:
        assert getattr(vj, name) is not None
    assert vj.forward is vj.models.llava.forward and vj.probe.__name__ == "vlm_jax.probe"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        vj.no_such_name
