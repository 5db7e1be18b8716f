"""Study D, "Finer": the model knows fine-grained concepts in text but cannot reach them from images.

Analyses (README.md): open-ended answers at the superordinate / coarse / fine level scored by
token-F1 (ground truth cut to 10 words) and lenient exact match (ground truth within the first
20 generated words); the text-only probe (the class's attributes as text, no image) against
the image; linear probes for the fine class on the visual features before and after the
projector (and at every LLM layer); ATTRSEEK, two turns: "what attributes do you see?", then
"what kind of X is it?".

    python experiments/finer/run.py [--model M] [--cub CUB_200_2011] [--smoke]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from vlm_jax.datasets import hierarchy  # noqa: E402
from vlm_jax.interp.scoring import lenient_match, token_f1  # noqa: E402
from vlm_jax.probe.features import extract_features  # noqa: E402
from vlm_jax.probe.linear import evaluate, fit_logistic  # noqa: E402

LEVELS = hierarchy.LEVELS


def synthetic_items(rng, per_class: int) -> list[dict]:
    items = []
    for fine in hierarchy.FINE_CLASSES:
        variant, shape = fine.split()
        for _ in range(per_class):
            items.append(hierarchy.fine_item(rng, 64, shape=shape, variant=variant))
    return [items[i] for i in rng.permutation(len(items))]


def cub_items(root, rng, n) -> list[dict]:
    from PIL import Image

    from vlm_jax.datasets.readers import read_cub

    rows = read_cub(root, split="test", with_attributes=True)
    chosen = [rows[int(i)] for i in rng.permutation(len(rows))[:n]]
    return [{"images": [Image.open(r["image"]).convert("RGB")], "labels": r["labels"],
             "attributes": ", ".join(a.replace("::", " ").replace("_", " ") for a in r["attributes"][:8]),
             "class_id": r["class_id"]} for r in chosen]


def questions_for(args):
    if args.cub:
        return {"superordinate": "What kind of animal is this? Answer:",
                "coarse": "What kind of bird is this? Answer:",
                "fine": "What is the exact species of this bird? Answer:"}, "What attributes do you see?"
    return hierarchy.QUESTIONS, hierarchy.ATTRIBUTE_QUESTION


def generate(model, prompts, images, tokens: int = 8) -> list[str]:
    texts = []
    for start in range(0, len(prompts), 32):
        batch = model.prepare(prompts[start:start + 32], images=images[start:start + 32] if images else None)
        texts += model.generate(batch, tokens).texts
    return texts


def score(texts, truths) -> dict:
    return {"lenient_em": float(np.mean([lenient_match(t, g) for t, g in zip(texts, truths)])),
            "token_f1": float(np.mean([token_f1(t, g) for t, g in zip(texts, truths)]))}


def main() -> None:
    args = common.arguments(__doc__, "finer", lambda p: (
        p.add_argument("--per-class", type=int, default=4, help="images per fine class (toy)"),
        p.add_argument("--cub", help="a local CUB_200_2011 folder (species as the fine level)"),
        p.add_argument("--cub-items", type=int, default=500)))
    if args.smoke:
        args.per_class, args.cub_items = 1, 12
    model, rng, results = common.start_study(args)
    out = args.out
    tables: dict = {}
    items = cub_items(args.cub, rng, args.cub_items) if args.cub else synthetic_items(rng, args.per_class)
    level_questions, attribute_question = questions_for(args)
    images = [it["images"][0] for it in items]

    with common.stage(results, "open-ended answers per level"):
        per_level = {}
        for level in LEVELS:
            prompts = [common.prompt(model, level_questions[level], 1) for _ in items]
            texts = generate(model, prompts, images)
            per_level[level] = score(texts, [it["labels"][level] for it in items])
            per_level[level]["examples"] = [[t, it["labels"][level]] for t, it in zip(texts[:5], items[:5])]
        results["open_ended"] = per_level
        tables["Open-ended answers (lenient EM, token-F1)"] = common.md_table(
            ["level", "lenient EM", "token-F1"], [[lv, per_level[lv]["lenient_em"], per_level[lv]["token_f1"]]
                                                  for lv in LEVELS])
        common.plot_bars(os.path.join(out, "levels.png"),
                         {lv: {"lenient EM": per_level[lv]["lenient_em"], "token-F1": per_level[lv]["token_f1"]}
                          for lv in LEVELS}, ylabel="score", title="Superordinate -> coarse -> fine (from images)")

    with common.stage(results, "text-only vs image"):
        if args.cub:
            text_prompts = [common.prompt(model, f"A bird with {it['attributes']}. {level_questions['fine']}", 0)
                            for it in items]
        else:
            text_prompts = [hierarchy.text_only_prompt(*reversed(it["labels"]["fine"].split())) for it in items]
        texts = generate(model, text_prompts, None)
        text_only = score(texts, [it["labels"]["fine"] for it in items])
        results["text_only_fine"] = text_only
        tables["Fine level: attributes as text (no image) vs the image"] = common.md_table(
            ["input", "lenient EM", "token-F1"],
            [["text only (attributes)", text_only["lenient_em"], text_only["token_f1"]],
             ["image only", per_level["fine"]["lenient_em"], per_level["fine"]["token_f1"]]])

    with common.stage(results, "ATTRSEEK (two turns)"):
        first = [common.prompt(model, attribute_question, 1) for _ in items]
        described = generate(model, first, images, tokens=10)
        second = [model.processor.chat([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": attribute_question}]},
            {"role": "assistant", "content": [{"type": "text", "text": d.strip()}]},
            {"role": "user", "content": [{"type": "text", "text": level_questions["fine"]}]}]) for d in described]
        texts = generate(model, second, images)
        attrseek = score(texts, [it["labels"]["fine"] for it in items])
        results["attrseek_fine"] = attrseek
        results["attrseek_examples"] = [[d, t] for d, t in zip(described[:5], texts[:5])]
        tables["ATTRSEEK: describe attributes first, then name the fine class"] = common.md_table(
            ["method", "lenient EM", "token-F1"],
            [["direct (one turn)", per_level["fine"]["lenient_em"], per_level["fine"]["token_f1"]],
             ["ATTRSEEK (two turns)", attrseek["lenient_em"], attrseek["token_f1"]]])

    with common.stage(results, "linear probes before / after the projector"):
        labels = np.array([it["class_id"] if args.cub else hierarchy.FINE_CLASSES.index(it["labels"]["fine"])
                           for it in items])
        examples = [{"prompt": common.prompt(model, level_questions["fine"], 1), "images": it["images"]} for it in items]
        store = extract_features(model, examples, os.path.join(out, "features"),
                                 sites=("vision.features", "projector.out", "text.hidden_states"),
                                 pooling=("image_mean",), batch_size=16, progress=False)
        n = len(items)
        train, test = np.arange(n) < int(0.7 * n), np.arange(n) >= int(0.7 * n)
        probes = {}
        if len(np.unique(labels[train])) >= 2:
            for site in ("vision.features", "projector.out", "text.hidden_states"):
                X = np.asarray(store.layers_first(site, "image_mean"))
                probe = fit_logistic(X[:, train], labels[train], num_classes=int(labels.max()) + 1,
                                     lambdas=(1e-4, 1e-3, 1e-2, 1e-1), folds=3 if train.sum() >= 9 else None,
                                     max_iter=1000)  # small, nearly separable sets converge slowly at 1e-4
                probes[site] = evaluate(probe, X[:, test], labels[test]).accuracy
        results["fine_class_probe_accuracy"] = probes
        if probes:
            rows = [["before the projector (vision.features)", float(probes["vision.features"][0])],
                    ["after the projector (projector.out)", float(probes["projector.out"][0])]]
            rows += [[f"LLM layer {i} (image tokens)", float(a)] for i, a in enumerate(probes["text.hidden_states"])]
            tables["Linear probes for the fine class (held-out accuracy)"] = common.md_table(["features", "accuracy"], rows)
            common.plot_curves(os.path.join(out, "probes.png"),
                               {"LLM layers": list(probes["text.hidden_states"])}, xlabel="LLM layer",
                               ylabel="fine-class probe accuracy", title="Fine-class linear probes",
                               hlines={"before projector": float(probes["vision.features"][0]),
                                       "after projector": float(probes["projector.out"][0])})
    common.write_results(out, results, tables, "Study D: Finer" + (" (CUB-200)" if args.cub else " (toy)"))


if __name__ == "__main__":
    main()
