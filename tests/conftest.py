"""Shared test setup: float32 matmuls at full precision, tiny checkpoints built once per session."""

from __future__ import annotations

import os
import sys

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, os.path.dirname(__file__))

import hf_factory  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """case name -> (folder, transformers model, hf config dict); built lazily, once."""
    cache = {}

    def get(case: str):
        if case not in cache:
            hf_config = hf_factory.hf_config_dict(case)
            model = hf_factory.build_hf_model(hf_config)
            folder = hf_factory.save_hf_model(model, tmp_path_factory.mktemp(case))
            cache[case] = (folder, model, hf_config)
        return cache[case]

    return get


@pytest.fixture(scope="session")
def random_llava(tmp_path_factory):
    """A random LLaVA transformers folder with tokenizer and processor (vlm_jax.random_model)."""
    from vlm_jax.random_model import make_random_llava

    return make_random_llava(tmp_path_factory.mktemp("random") / "llava")
