"""Small random LLaVA checkpoints written as real transformers folders.

Used by the README's main job, the tests and the benchmarks, offline: the weights come
from vlm_jax's own initialiser and exporter, the tokenizer is a word-level `tokenizers`
model over a small English vocabulary, and the processor is transformers' LlavaProcessor,
so the folder loads in transformers and in vlm_jax alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from vlm_jax.checkpoint import atomic_output_dir
from vlm_jax.config import from_hf_config
from vlm_jax.models import llava
from vlm_jax.weights import Layout, write_safetensors

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = (
    "USER ASSISTANT : ? . , ! a an the is are was of in on at to and or not this that it what which who "
    "where how many much color colour shape image picture photo left right top bottom middle center "
    "red green blue yellow orange purple black white gray pink brown "
    "circle square triangle star hexagon pentagon squiggle line dot shape shapes "
    "one two three four five six seven eight nine ten zero "
    "big small large tiny above below next near far inside outside there here "
    "cat dog bird car tree house person sky water road sign stop street "
    "yes no maybe answer option correct A B C D ( ) the_end"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(words=WORDS, image_token: str = "<image>"):
    """A word-level fast tokenizer: specials, `words`, newline, then the image token (last id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *words, "\n", image_token]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": image_token},
    )


def build_processor(tokenizer, hf_config: dict):
    """transformers' LlavaProcessor for the tower in hf_config (CLIP-style preprocessing)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = from_hf_config(hf_config)
    size = cfg.vision.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=cfg.vision.num_prefix_tokens, chat_template=CHAT_TEMPLATE,
    )


def tiny_hf_config(vocab_size: int, image_token_id: int, *, vision_layers: int = 2, text_layers: int = 2,
                   vision_width: int = 64, text_width: int = 64, image_size: int = 56, patch_size: int = 14,
                   text_intermediate: int | None = None) -> dict:
    """A small llava-1.5-shaped config (CLIP tower, Llama decoder)."""
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": image_token_id,
        "image_seq_length": (image_size // patch_size) ** 2,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision_width, "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers, "num_attention_heads": 4, "image_size": image_size,
            "patch_size": patch_size, "hidden_act": "quick_gelu",
        },
        "text_config": {
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": text_width,
            "intermediate_size": text_intermediate or 3 * text_width, "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        },
        "pad_token_id": 3,
    }


def make_random_llava(out_dir: str | Path, hf_config: dict | None = None, *, seed: int = 0, dtype=jnp.float32,
                      std: float = 0.02, force: bool = False, with_processor: bool = True, tokenizer=None) -> str:
    """Writes a random LLaVA transformers folder (config, safetensors, tokenizer, processor).

    Without hf_config, a tiny CLIP + Llama model over the built-in word vocabulary (or over
    `tokenizer`). The processor is only written when its <image> id matches the config's.
    """
    tokenizer = tokenizer or build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    hf_config = hf_config or tiny_hf_config(len(tokenizer), image_token_id)
    cfg = from_hf_config(hf_config)
    if with_processor and cfg.image_token_id != image_token_id:
        raise ValueError(f"the word tokenizer's <image> id is {image_token_id} but the config says "
                         f"{cfg.image_token_id}; pass with_processor=False")
    if cfg.text.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {cfg.text.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    params = llava.init_params(cfg, jax.random.key(seed), dtype, std)
    with atomic_output_dir(out_dir, force) as tmp:
        write_safetensors(params, cfg, str(tmp), Layout.default(cfg))
        (tmp / "config.json").write_text(json.dumps({**hf_config, "dtype": jnp.dtype(dtype).name}, indent=2))
        if with_processor:
            build_processor(tokenizer, hf_config).save_pretrained(str(tmp))
    return str(Path(out_dir).absolute())
