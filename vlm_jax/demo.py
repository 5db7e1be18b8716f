"""The README's main job on the embedded default: a small random LLaVA, end to end.

1. write a random LLaVA as a transformers folder (vlm_jax.random_model);
2. convert it to a vlm_jax checkpoint;
3. load the converted checkpoint, generate for a drawn image;
4. print a logit-lens table: the top token of every layer at a few positions.

The weights are random, so the words are meaningless; the point is that every stage runs
offline and the same commands work on a real checkpoint.
"""

from __future__ import annotations

import os
import time

import numpy as np


def draw_shape_image(size: int = 96, seed: int = 0):
    """A red circle and a blue square on white (PIL image)."""
    from PIL import Image, ImageDraw

    rng = np.random.RandomState(seed)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(5, size // 2 - 30, 2)
    draw.ellipse([x, y, x + 30, y + 30], fill="red")
    draw.rectangle([size // 2 + 5, size // 2 + 5, size // 2 + 35, size // 2 + 35], fill="blue")
    return img


def format_lens_table(tokens: list[list[str]], probs: np.ndarray, columns: list[str]) -> str:
    """A text table: one row per layer, one column per position, 'token (p)' per cell."""
    cells = [[f"{tok} ({p:.2f})" for tok, p in zip(row, prob_row)] for row, prob_row in zip(tokens, probs)]
    width = max(12, *(len(c) for row in cells for c in row), *(len(c) for c in columns))
    lines = ["layer  " + " ".join(c.ljust(width) for c in columns)]
    for layer, row in enumerate(cells):
        lines.append(f"{layer:>5}  " + " ".join(c.ljust(width) for c in row))
    return "\n".join(lines)


def run_demo(workdir: str = "checkpoints", max_new_tokens: int = 12) -> str:
    import vlm_jax as vj
    from vlm_jax.interp.logit_lens import logit_lens, stack_residuals
    from vlm_jax.random_model import build_tokenizer, make_random_llava, tiny_hf_config

    start = time.perf_counter()
    tokenizer = build_tokenizer()
    hf_config = tiny_hf_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), text_layers=4)
    hf_dir = make_random_llava(os.path.join(workdir, "demo-random-llava-hf"), hf_config, force=True)
    print(f"[1/4] wrote a random LLaVA (transformers folder): {hf_dir}")
    converted = vj.load(hf_dir, progress=False).save(os.path.join(workdir, "demo-random-llava-vlm_jax"), force=True)
    print(f"[2/4] converted it to a vlm_jax checkpoint:        {converted}")

    model = vj.load(converted)
    print(f"      {model}")
    prompt = "USER: <image>\nwhat shape is on the left ? ASSISTANT:"
    batch = model.prepare(prompt, images=[draw_shape_image()])
    result = model.generate(batch, max_new_tokens)
    print(f"[3/4] prompt: {prompt!r}")
    print(f"      greedy continuation ({max_new_tokens} tokens): {result.texts[0]!r}")

    out = model.run(batch, capture=("text.embed", "text.resid_post"))
    lens = logit_lens(model.params, model.config, stack_residuals(out.acts), k=1)
    ids, probs = np.asarray(lens.top_ids)[:, 0, :, 0], np.asarray(lens.top_probs)[:, 0, :, 0]  # [L + 1, T]
    tmap = batch.image_tokens
    image_pos = np.nonzero(tmap.patch_mask[0])[0]
    chosen = [int(image_pos[0]), int(image_pos[len(image_pos) // 2]), int(batch.last_positions[0])]
    columns = [f"patch r{tmap.patch_row[0, p]}c{tmap.patch_col[0, p]}" for p in chosen[:2]] + ["last token"]
    tok = model.processor.tokenizer
    words = [[tok.convert_ids_to_tokens(int(ids[layer, p])) for p in chosen] for layer in range(ids.shape[0])]
    print("[4/4] logit lens (top-1 token per layer; layer 0 = input embeddings):")
    table = format_lens_table(words, probs[:, chosen], columns)
    print(table)
    print(f"done in {time.perf_counter() - start:.1f}s. Checkpoints are under {os.path.abspath(workdir)}/")
    return table
