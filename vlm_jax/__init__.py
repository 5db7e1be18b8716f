"""vlm_jax: LLaVA-style vision-language models in JAX, internals as pure functions.

    import vlm_jax as vj
    model = vj.load("llava-hf/llava-1.5-7b-hf")
    batch = model.prepare("USER: <image>\\nWhat is this? ASSISTANT:", images=[img])
    out = model.run(batch, capture=("text.resid_post",))

The names below are imported on first use (PEP 562), so `import vlm_jax` alone does not import
jax: the command line and the benchmark scripts restart themselves with malloc tunables
(vlm_jax/host_memory.py) before they import it, which took ~0.6 s more when the package imported
everything up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(("LlavaConfig", "TextConfig", "VisionConfig", "from_hf_config", "preset", "to_hf_config"),
                    "vlm_jax.config"),
    **dict.fromkeys(("CheckpointMismatchError", "CorruptCheckpointError", "InputError", "OutputExistsError",
                     "SettingError", "UnsupportedArchitectureError", "VlmJaxError", "WeightsMismatchError"),
                    "vlm_jax.errors"),
    **dict.fromkeys(("Batch", "ImageTokenMap", "Processor", "image_token_map"), "vlm_jax.inputs"),
    **dict.fromkeys(("Edits", "logit_lens", "stack_edits"), "vlm_jax.interp"),
    "load": "vlm_jax.loading",
    "Model": "vlm_jax.model",
    **dict.fromkeys(("Output", "abstract_params", "forward", "init_params", "logical_axes", "param_specs"),
                    "vlm_jax.models.llava"),
}

__all__ = [
    "Batch", "CheckpointMismatchError", "CorruptCheckpointError", "Edits", "ImageTokenMap", "InputError",
    "LlavaConfig", "Model", "Output", "OutputExistsError", "Processor", "SettingError", "TextConfig",
    "UnsupportedArchitectureError", "VisionConfig", "VlmJaxError", "WeightsMismatchError", "abstract_params",
    "forward", "from_hf_config", "image_token_map", "init_params", "load", "logical_axes", "logit_lens", "param_specs",
    "preset", "stack_edits", "to_hf_config",
]  # = the keys of _EXPORTS (tests/test_config.py checks)
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name, imported from its module on first use; else a submodule (vlm_jax.probe, ...)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # the submodule exists but something it imports does not
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from vlm_jax.config import LlavaConfig, TextConfig, VisionConfig, from_hf_config, preset, to_hf_config
    from vlm_jax.errors import (
        CheckpointMismatchError,
        CorruptCheckpointError,
        InputError,
        OutputExistsError,
        SettingError,
        UnsupportedArchitectureError,
        VlmJaxError,
        WeightsMismatchError,
    )
    from vlm_jax.inputs import Batch, ImageTokenMap, Processor, image_token_map
    from vlm_jax.interp import Edits, logit_lens, stack_edits
    from vlm_jax.loading import load
    from vlm_jax.model import Model
    from vlm_jax.models.llava import Output, abstract_params, forward, init_params, logical_axes, param_specs
