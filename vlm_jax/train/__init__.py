"""Finetuning: the whole model, one component, LoRA adapters or a soft prompt (trainer.py)."""

from vlm_jax.train.lora import LoraConfig, add_lora, lora_parameter_count, merge_lora
from vlm_jax.train.trainer import TrainConfig, Trainer, TrainingDivergedError, TrainResult, load_config

__all__ = ["LoraConfig", "TrainConfig", "TrainResult", "Trainer", "TrainingDivergedError", "add_lora", "load_config",
           "lora_parameter_count", "merge_lora"]
