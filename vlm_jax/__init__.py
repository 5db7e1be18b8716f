"""vlm_jax: LLaVA-style vision-language models in JAX, internals as pure functions.

    import vlm_jax as vj
    model = vj.load("llava-hf/llava-1.5-7b-hf")
    batch = model.prepare("USER: <image>\\nWhat is this? ASSISTANT:", images=[img])
    out = model.run(batch, capture=("text.resid_post",))
"""

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

__all__ = [
    "Batch", "CheckpointMismatchError", "Edits", "logit_lens", "stack_edits", "CorruptCheckpointError", "ImageTokenMap", "InputError", "LlavaConfig",
    "Model", "Output", "OutputExistsError", "Processor", "SettingError", "TextConfig", "UnsupportedArchitectureError",
    "VisionConfig", "VlmJaxError", "WeightsMismatchError", "abstract_params", "forward", "from_hf_config",
    "image_token_map", "init_params", "load", "logical_axes", "param_specs", "preset", "to_hf_config",
]
__version__ = "0.1.0"
