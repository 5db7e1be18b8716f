"""Logit-lens report for one image: per-patch top tokens per layer as a PNG and a text table.

Backs `vlm-jax lens --model M --image I --prompt P`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from vlm_jax.interp.logit_lens import decode_ids, gather_positions, logit_lens, stack_residuals


@dataclass
class PatchLens:
    tokens: np.ndarray  # [L + 1, rows, cols] top-1 token strings per patch
    probs: np.ndarray  # [L + 1, rows, cols]
    last_tokens: np.ndarray  # [L + 1, k] top-k strings at the last position
    last_probs: np.ndarray  # [L + 1, k]
    image: np.ndarray  # [H, W, 3] the model-input image, de-normalised to [0, 1]


def patch_lens(model, batch, image: int = 0, k: int = 5) -> PatchLens:
    """Top-1 token per patch of `image` and top-k at the row's last position, for every layer
    (layer 0 = input embeddings)."""
    out = model.run(batch, capture=("text.embed", "text.resid_post"), compute_logits=False)
    resid = stack_residuals(out.acts)  # [L + 1, B, T, D]
    row, grid = batch.image_tokens.grid_positions(image)
    positions = np.concatenate([grid.reshape(-1), [batch.last_positions[row]]])[None]
    states = gather_positions(resid[:, row:row + 1], positions)  # [L + 1, 1, P + 1, D]
    lens = logit_lens(model.params, model.config, states, k=k)
    ids, probs = np.asarray(lens.top_ids)[:, 0], np.asarray(lens.top_probs)[:, 0]
    tok = model.processor.tokenizer
    n_layers = ids.shape[0]
    rows, cols = grid.shape
    processor = model.processor.hf.image_processor
    pixels = np.asarray(batch.pixel_values[image], np.float32).transpose(1, 2, 0)
    mean = np.asarray(getattr(processor, "image_mean", None) or (0.0, 0.0, 0.0))
    std = np.asarray(getattr(processor, "image_std", None) or (1.0, 1.0, 1.0))
    return PatchLens(
        tokens=decode_ids(tok, ids[:, :-1, 0]).reshape(n_layers, rows, cols),
        probs=probs[:, :-1, 0].reshape(n_layers, rows, cols),
        last_tokens=decode_ids(tok, ids[:, -1]),
        last_probs=probs[:, -1],
        image=np.clip(pixels * std + mean, 0.0, 1.0),
    )


def default_layers(n_layers: int, most: int = 8) -> list[int]:
    """Up to `most` evenly spaced layers including the first and the last."""
    if n_layers <= most:
        return list(range(n_layers))
    return sorted(set(np.linspace(0, n_layers - 1, most).round().astype(int).tolist()))


def lens_table(lens: PatchLens, layers=None, common: int = 3) -> str:
    """Per layer: the most frequent top-1 tokens over the patches and the last position's top-k."""
    layers = default_layers(lens.tokens.shape[0], most=lens.tokens.shape[0]) if layers is None else layers
    lines = ["layer | most frequent patch tokens (count) | last position top tokens (prob)", "---|---|---"]
    for layer in layers:
        counts = Counter(lens.tokens[layer].reshape(-1).tolist()).most_common(common)
        patch = ", ".join(f"{t!r} ({c})" for t, c in counts)
        last = ", ".join(f"{t!r} ({p:.2f})" for t, p in zip(lens.last_tokens[layer], lens.last_probs[layer]))
        lines.append(f"{layer} | {patch} | {last}")
    return "\n".join(lines)


def plot_patch_lens(lens: PatchLens, out_path: str, layers=None, title: str = "") -> str:
    """A PNG with one panel per layer: the image, its patch grid, and each patch's top token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = default_layers(lens.tokens.shape[0]) if layers is None else list(layers)
    rows, cols = lens.tokens.shape[1:]
    n = len(layers)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    cell = max(3.0, 0.35 * cols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows), squeeze=False)
    height, width = lens.image.shape[:2]
    fontsize = max(3.0, min(9.0, 220.0 / max(rows, cols) / 2.5))
    for ax, layer in zip(axes.flat, layers):
        ax.imshow(lens.image, alpha=0.45, extent=(0, cols, rows, 0))
        for r in range(rows):
            for c in range(cols):
                p = float(lens.probs[layer, r, c])
                ax.text(c + 0.5, r + 0.5, str(lens.tokens[layer, r, c])[:8], ha="center", va="center",
                        fontsize=fontsize, alpha=0.35 + 0.65 * min(1.0, p * 4))
        ax.set_xticks(np.arange(cols + 1))
        ax.set_yticks(np.arange(rows + 1))
        ax.grid(color="white", linewidth=0.3)
        ax.tick_params(labelbottom=False, labelleft=False, length=0)
        ax.set_title(f"layer {layer}" + (" (embeddings)" if layer == 0 else ""), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=150)
    plt.close(fig)
    return out_path
