"""Study C, "LLMs Can Compensate for Deficiencies in Visual Representations".

Reduce how much the vision tower contextualises its patches (each patch attends only to
itself, optionally plus the class token, in all or in the late ViT layers), or block attention
among image tokens inside the LLM, and measure per LLM layer how identifiable an object is from
its own patches: the logit lens gives the rank of the object's label token at each patch of the
object's mask, and the best (lowest) rank over those patches is its identifiability. The
model's direct answers under each ablation show how much the LLM compensates.

On the toy the "part" is the whole shape (label: its name); with --cub it is a CUB-200 part
(beak, tail, wing, ...) located by its keypoint.

    python experiments/compensate/run.py [--model M] [--cub CUB_200_2011] [--smoke]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from vlm_jax.datasets import questions  # noqa: E402
from vlm_jax.interp.geometry import ImageGeometry  # noqa: E402
from vlm_jax.interp.logit_lens import gather_positions, label_token_ids, logit_lens, stack_residuals  # noqa: E402


def conditions(model) -> dict:
    """Name -> Edits builder (a function of the batch's image/text masks)."""
    lv, lt = model.config.vision.num_layers, model.config.text.num_layers
    late = list(range(lv // 2, lv))
    early = list(range(lt // 2))
    has_cls = model.config.vision.class_token

    def none(batch):
        return model.edits()

    def vis_diag(layers, keep_cls):
        return lambda batch: model.edits().diagonal_attention("vision", layers=layers, keep_class_token=keep_cls)

    def llm_block(layers):
        def build(batch):
            img = batch.image_mask
            same_image = img[:, :, None] & img[:, None, :] & ~np.eye(img.shape[1], dtype=bool)[None]
            return model.edits().block_attention("text", layers=layers, edges=same_image)
        return build

    out = {"baseline": none,
           "ViT diagonal, all layers": vis_diag(None, False),
           "ViT diagonal, late layers": vis_diag(late, False)}
    if has_cls:
        out["ViT diagonal + CLS, all layers"] = vis_diag(None, True)
    out["LLM image-image blocked, all layers"] = llm_block(None)
    out["LLM image-image blocked, early layers"] = llm_block(early)

    def both(batch):
        edits = vis_diag(None, False)(batch)
        img = batch.image_mask
        same_image = img[:, :, None] & img[:, None, :] & ~np.eye(img.shape[1], dtype=bool)[None]
        return edits.block_attention("text", edges=same_image)

    out["ViT diagonal + LLM blocked"] = both
    return out


def synthetic_items(model, rng, n):
    items = []
    for _ in range(n):
        item = questions.name_question(rng, 64)
        item["prompt"] = common.prompt(model, "what shape is this ?", 1)
        item["part_mask"] = item["masks"][0]
        item["part_label"] = item["label"]
        items.append(item)
    return items


def cub_items(model, root, rng, n):
    from PIL import Image

    from vlm_jax.datasets.readers import read_cub

    rows = [r for r in read_cub(root, split="test") if r["parts"]]
    items = []
    for r in rng.permutation(len(rows))[:n]:
        row = rows[int(r)]
        part = row["parts"][int(rng.integers(len(row["parts"])))]
        image = Image.open(row["image"]).convert("RGB")
        items.append({"prompt": common.prompt(model, "What kind of bird is this?", 1), "images": [image],
                      "part_point": part["xy"], "part_label": part["part"].split()[-1], "label": row["labels"]["fine"]})
    return items


def part_positions(model, batch, row: int, item) -> np.ndarray:
    geometry = ImageGeometry.from_processor(model.processor.hf.image_processor, item["images"][0],
                                            model.config.vision.patch_size)
    _, grid = batch.image_tokens.grid_positions(row)
    if "part_mask" in item:
        patches = geometry.mask_patches(item["part_mask"], min_coverage=0.3)
        if not patches.any():
            patches = geometry.mask_coverage(item["part_mask"]) > 0
        return grid[patches]
    r, c = geometry.patch_of(np.asarray(item["part_point"]))
    if r < 0:
        return np.empty(0, int)
    rows, cols = np.arange(max(r - 1, 0), min(r + 2, grid.shape[0])), np.arange(max(c - 1, 0), min(c + 2, grid.shape[1]))
    return grid[np.ix_(rows, cols)].reshape(-1)  # the keypoint's patch and its neighbours


def identifiability(model, items, build_edits, batch_size=16) -> np.ndarray:
    """[L + 1] median over items of the best rank of the item's label over its part's patches."""
    tok = model.processor.tokenizer
    best_ranks = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = model.prepare([it["prompt"] for it in chunk], images=[it["images"][0] for it in chunk])
        edits = build_edits(batch)
        out = model.run(batch, capture=("text.embed", "text.resid_post"), edits=edits if len(edits) else None,
                        compute_logits=False)
        resid = stack_residuals(out.acts)
        for row, item in enumerate(chunk):
            positions = part_positions(model, batch, row, item)
            if len(positions) == 0:
                continue
            targets = label_token_ids(tok, [item["part_label"]])
            lens = logit_lens(model.params, model.config, gather_positions(resid[:, row:row + 1], positions[None]),
                              k=1, targets=targets)
            best_ranks.append(np.asarray(lens.first_rank)[:, 0, :, 0].min(axis=1))  # [L + 1]
    return np.median(best_ranks, axis=0)


def direct_accuracy(model, items, build_edits) -> float:
    """Greedy answer under the edits contains the label (3 new tokens, via the edited forward)."""
    from vlm_jax.models.llava import forward

    tok = model.processor.tokenizer
    hits = []
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        batch = model.prepare([it["prompt"] for it in chunk], images=[it["images"][0] for it in chunk])
        edits = build_edits(batch)
        arrays = model._arrays(batch)
        ids, mask = arrays["input_ids"], arrays["attention_mask"]
        words = [[] for _ in chunk]
        for _ in range(3):  # short answers: re-run the edited forward per token (no KV cache with edits)
            out = forward(model.params, model.config, {**arrays, "input_ids": ids, "attention_mask": mask},
                          edits=_extend(edits, ids.shape[1]) if len(edits) else None,
                          logit_positions=np.full((len(chunk), 1), ids.shape[1] - 1, np.int32))
            nxt = np.asarray(out.logits[:, 0]).argmax(-1).astype(np.int32)
            for row, t in enumerate(nxt):
                words[row].append(tok.decode([int(t)]).strip())
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((len(chunk), 1), mask.dtype)], axis=1)
        hits += [item["label"] in w for item, w in zip(chunk, words)]
    return float(np.mean(hits))


def _extend(edits, length: int):
    """Attention-edge masks padded to a longer sequence (generated tokens are not edited)."""
    ops = []
    for op in edits.ops:
        if hasattr(op, "edges") and op.tower == "text" and op.edges.shape[-1] < length:
            pad = length - op.edges.shape[-1]
            ops.append(op.replace(edges=np.pad(np.asarray(op.edges), ((0, 0), (0, pad), (0, pad)))))
        else:
            ops.append(op)
    return edits.replace(ops=tuple(ops))


def main() -> None:
    args = common.arguments(__doc__, "compensate", lambda p: (
        p.add_argument("--items", type=int, default=96),
        p.add_argument("--cub", help="a local CUB_200_2011 folder: parts located by their keypoints")))
    if args.smoke:
        args.items = 6
    model, rng, results = common.start_study(args, items=args.items)
    out = args.out
    tables: dict = {}
    items = cub_items(model, args.cub, rng, args.items) if args.cub else synthetic_items(model, rng, args.items)
    ranks, accuracy = {}, {}
    with common.stage(results, "identifiability per condition"):
        for name, build in conditions(model).items():
            ranks[name] = identifiability(model, items, build)
            accuracy[name] = direct_accuracy(model, items, build)
    results["median_best_rank_per_layer"] = ranks
    results["direct_accuracy"] = accuracy
    n_layers = len(ranks["baseline"])
    tables["Median best rank of the part's label over its patches (0 = top token; per LLM layer)"] = common.md_table(
        ["layer", *ranks], [[layer, *(float(ranks[c][layer]) for c in ranks)] for layer in range(n_layers)])
    tables["Direct answers under each ablation"] = common.md_table(
        ["condition", "answer accuracy", "best layer rank", "layer of best rank"],
        [[c, accuracy[c], float(np.min(ranks[c])), int(np.argmin(ranks[c]))] for c in ranks])
    _log_scale(os.path.join(out, "identifiability_per_layer.png"), ranks)
    common.write_results(out, results, tables, "Study C: LLMs compensate for weaker visual contextualisation"
                         + (" (CUB-200 parts)" if args.cub else " (toy)"))


def _log_scale(path, ranks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, values in ranks.items():
        ax.plot(np.arange(len(values)), np.asarray(values) + 1, marker="o", markersize=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("LLM layer (0 = projector output)")
    ax.set_ylabel("median best rank + 1 (log)")
    ax.set_title("Part identifiability under contextualisation ablations", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
