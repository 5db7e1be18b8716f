"""Study B, "Hidden in Plain Sight": the vision features solve tasks the VLM answers near chance.

Tasks on the toy: relative depth (two marked points, occlusion), shape matching across two
images (squiggles: shapes the toy has no names for), fill-pattern (style) matching.
Analyses (README.md): visual readout without the LLM (dense depth head, cosine MaxSim of patch
features, Gram-matrix similarity) vs the VLM's own answer; the same readouts swept over the
ViT layers, the projector output and every LLM layer; a blind test (image removed); prompt
tuning with 1 / 5 / 10 learned prefix vectors; finetuning only the ViT, only the projector or
only the LLM; answer-to-image attention before and after LLM tuning.

    python experiments/hidden_in_plain_sight/run.py [--model M] [--blink items.jsonl] [--smoke]
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from vlm_jax.datasets import depth, questions  # noqa: E402
from vlm_jax.datasets.shapes import VARIANTS, random_entity, render_scene  # noqa: E402
from vlm_jax.interp import scoring  # noqa: E402
from vlm_jax.interp.geometry import ImageGeometry  # noqa: E402
from vlm_jax.interp.readouts import gram_similarity, maxsim_scores  # noqa: E402
from vlm_jax.probe.dense import fit_dense_heads, relative_depth_accuracy  # noqa: E402

STYLE_QUESTION = "image 2 shows two shapes : A on the left and B on the right . which one has the same fill pattern as image 1 ?"


# ---------------------------------------------------------------------------------------------
# task items


def depth_items(model, rng, n):
    items = []
    for _ in range(n):
        item = depth.depth_item(rng, 64, prefix="")
        item["prompt"] = common.prompt(model, depth.QUESTION, 1, questions.MC_PREFIX)
        item["answer"] = item["label"]
        items.append(item)
    return items


def matching_items(model, rng, n):
    items = []
    for _ in range(n):
        item = questions.correspondence_item(rng, "squiggle", 64, prefix="")
        item["prompt"] = common.prompt(model, questions.correspondence_question(), 2, questions.MC_PREFIX)
        item["answer"] = item["label"]
        items.append(item)
    return items


def style_items(model, rng, n):
    from vlm_jax.datasets.shapes import NAMED_SHAPES

    items = []
    for _ in range(n):
        shapes = rng.choice(NAMED_SHAPES, size=3, replace=False)
        variants = rng.choice([v for v in VARIANTS if v != "hollow"], size=2, replace=False)
        ref_img, _, _, _ = questions.single_shape(rng, str(shapes[0]), 64, variant=str(variants[0]), size_range=(18, 22))
        correct = int(rng.integers(2))
        options = [str(variants[1]), str(variants[1])]
        options[correct] = str(variants[0])
        entities = [random_entity(rng, str(shapes[1 + k]), center=(16 + 32 * k, 32), size=13.0, variant=options[k])
                    for k in range(2)]
        img, boxes, masks = render_scene(entities, 64)
        items.append({"prompt": common.prompt(model, STYLE_QUESTION, 2, questions.MC_PREFIX),
                      "images": [ref_img, img], "label": "AB"[correct], "answer": "AB"[correct], "correct": correct,
                      "ref_box": np.array([10, 10, 54, 54], np.float32), "boxes": list(boxes)})
    return items


def blink_items(model, path):
    from PIL import Image

    from vlm_jax.datasets.readers import read_blink_jsonl

    items = []
    for row in read_blink_jsonl(path):
        letters = [chr(ord("A") + i) for i in range(len(row["options"]))]
        options = " ".join(f"({letter}) {text}" for letter, text in zip(letters, row["options"]))
        items.append({"prompt": common.prompt(model, f"{row['question']} {options}", len(row["images"]),
                                              questions.MC_PREFIX),
                      "images": [Image.open(p).convert("RGB") for p in row["images"]], "label": row["answer"],
                      "task": row["task"], "letters": letters})
    return items


# ---------------------------------------------------------------------------------------------
# answers


def answer(model, items, letters=("A", "B", "C", "D")):
    images = [im for it in items for im in it["images"]] or None
    result = scoring.choose_by_generation(model, [it["prompt"] for it in items], images, prefix="",
                                          letters=letters, max_new_tokens=5)
    acc = float(np.mean([a == it["label"] for a, it in zip(result.answers, items)]))
    return acc, result.answers


def blind_answers(model, items, letters):
    prompts, _ = scoring.blind([it["prompt"] for it in items], None, "no_image")
    result = scoring.choose_by_generation(model, prompts, None, prefix="", letters=letters, max_new_tokens=5)
    return float(np.mean([a == it["label"] for a, it in zip(result.answers, items)])), result.answers


# ---------------------------------------------------------------------------------------------
# readouts on every representation level


def _vision_tokens(model, pil_image, box) -> np.ndarray:
    """Indices into the projector's token sequence (P') of the patches in box."""
    v = model.config.vision
    geometry = ImageGeometry.from_processor(model.processor.hf.image_processor, pil_image, v.patch_size)
    patches = geometry.box_patches(box, min_coverage=0.25)
    if not patches.any():
        patches = geometry.box_patches(box)
    rows, cols = np.nonzero(patches)
    dropped = 1 if model.config.vision_feature_select_strategy == "default" else 0
    return v.num_prefix_tokens - dropped + rows * v.grid_size + cols


def level_states(model, items, sites=("vision.hidden_states", "projector.out", "text.embed", "text.resid_post")):
    """Per item: {level name: [n_levels, image tokens..., D] per image} for vision, projector, LLM."""
    out = []
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        batch = model.prepare([it["prompt"] for it in chunk], images=[im for it in chunk for im in it["images"]])
        acts = model.run(batch, capture=sites, compute_logits=False).acts
        vision = np.asarray(acts["vision.hidden_states"])  # [Lv + 1, N, P, Dv]
        if model.config.vision_feature_select_strategy == "default":
            vision = vision[:, :, 1:]
        proj = np.asarray(acts["projector.out"])[None]  # [1, N, P', D]
        text = np.concatenate([np.asarray(acts["text.embed"])[None], np.asarray(acts["text.resid_post"])])
        for row, item in enumerate(chunk):
            per_image = []
            for k in range(len(item["images"])):
                image = sum(len(it["images"]) for it in chunk[:row]) + k
                _, grid = batch.image_tokens.grid_positions(image)
                per_image.append({"vision": vision[:, image], "projector": proj[:, image],
                                  "llm": text[:, row][:, grid.reshape(-1)] if grid.size else None})
            out.append(per_image)
    return out


def level_names(model) -> list[str]:
    return ([f"ViT {i}" for i in range(model.config.vision.num_layers + 1)] + ["projector"] +
            [f"LLM {i}" for i in range(model.config.text.num_layers + 1)])


def _stack_levels(per_image: dict) -> list[np.ndarray]:
    return [*per_image["vision"], *per_image["projector"], *per_image["llm"]]


def region_readout(model, items, states, kind: str) -> np.ndarray:
    """Accuracy per level of picking the option region most similar to the reference region."""
    correct = []
    for item, per_image in zip(items, states):
        ref_idx = _vision_tokens(model, item["images"][0], item["ref_box"])
        cand_idx = [_vision_tokens(model, item["images"][1], box) for box in item["boxes"]]
        ref_levels, opt_levels = _stack_levels(per_image[0]), _stack_levels(per_image[1])
        row = []
        for ref, opt in zip(ref_levels, opt_levels):
            if kind == "maxsim":  # both images' tokens in one sequence: [1, P_ref + P_opt, D]
                both = np.concatenate([ref, opt])[None]
                scores = np.asarray(maxsim_scores(both, ref_idx, [len(ref) + c for c in cand_idx]))[0]
            else:
                scores = np.array([float(gram_similarity(ref[None, ref_idx], opt[None, c])[0]) for c in cand_idx])
            row.append(int(np.argmax(scores)) == item["correct"])
        correct.append(row)
    return np.mean(correct, axis=0)


def depth_readout(model, train_items, test_items, train_states, test_states) -> np.ndarray:
    """Accuracy per level of a linear depth head trained on the patch grid of that level."""
    g = model.config.vision.grid_size

    def geometry(item):
        return ImageGeometry.from_processor(model.processor.hf.image_processor, item["images"][0],
                                            model.config.vision.patch_size)

    targets = np.stack([geometry(it).patch_average(it["depth"]) for it in train_items])
    points = np.array([geometry(it).patch_of(np.asarray(it["points"])) for it in test_items])  # [N, 2, (row, col)]
    closer = np.array([it["closer"] for it in test_items])
    accs = []
    n_levels = len(_stack_levels(train_states[0][0]))
    for level in range(n_levels):
        feats_tr = np.stack([_stack_levels(s[0])[level][-g * g:] for s in train_states])[:, None]  # [N, 1, P, D]
        feats_te = np.stack([_stack_levels(s[0])[level][-g * g:] for s in test_states])[:, None]
        heads = fit_dense_heads(feats_tr, targets, kind="linear", epochs=40, learning_rate=1e-2)
        accs.append(float(relative_depth_accuracy(heads.predict(feats_te), points, closer)[0]))
    return np.array(accs)


def answer_attention(model, items) -> np.ndarray:
    """[L] mean attention mass from the answer position to the image tokens, per layer."""
    batch = model.prepare([it["prompt"] for it in items], images=[im for it in items for im in it["images"]])
    pattern = np.asarray(model.run(batch, capture=("text.attn_pattern",), compute_logits=False)
                         .acts["text.attn_pattern"])  # [L, B, H, T, S]
    last = batch.last_positions
    image = batch.image_mask
    mass = [pattern[:, b, :, last[b]][:, :, image[b]].sum(-1).mean(-1) for b in range(len(items))]
    return np.mean(mass, axis=0)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    args = common.arguments(__doc__, "hidden_in_plain_sight", lambda p: (
        p.add_argument("--items", type=int, default=48, help="test items per task"),
        p.add_argument("--train-items", type=int, default=192, help="items to train readouts and finetuning"),
        p.add_argument("--steps", type=int, default=60, help="finetuning / prompt-tuning steps (batch 16)"),
        p.add_argument("--lr", type=float, default=3e-4),
        p.add_argument("--blink", help="a BLINK-style jsonl: direct answers and the blind test on real items")))
    if args.smoke:
        args.items, args.train_items, args.steps = 6, 16, 2
    model, rng, results = common.start_study(args)
    out = args.out
    tables: dict = {}

    if args.blink:
        items = blink_items(model, args.blink)
        letters = tuple(items[0]["letters"])
        acc, answers = answer(model, items, letters)
        blind_acc, blind = blind_answers(model, items, letters)
        results.update(direct_accuracy=acc, blind_accuracy=blind_acc,
                       with_image=scoring.answer_distribution(answers, [i["label"] for i in items], letters),
                       blind=scoring.answer_distribution(blind, [i["label"] for i in items], letters))
        tables["BLINK-style items"] = common.md_table(["condition", "accuracy", "majority answer"], [
            ["with image", acc, results["with_image"]["majority"]], ["blind", blind_acc, results["blind"]["majority"]]])
        common.write_results(out, results, tables, "Study B (hidden_in_plain_sight) on BLINK-style items")
        return

    with common.stage(results, "items"):
        tasks = {"depth": depth_items(model, rng, args.items), "matching": matching_items(model, rng, args.items),
                 "style": style_items(model, rng, args.items)}
        letters = {"depth": ("A", "B"), "matching": ("A", "B", "C", "D"), "style": ("A", "B")}
        train_depth = depth_items(model, np.random.default_rng(args.seed + 1), args.train_items)

    with common.stage(results, "VLM answers and blind test"):
        direct, blind = {}, {}
        for name, items in tasks.items():
            direct[name], answers = answer(model, items, letters[name])
            blind[name], blind_ans = blind_answers(model, items, letters[name])
            results.setdefault("answer_distribution", {})[name] = {
                "with image": scoring.answer_distribution(answers, [i["label"] for i in items], letters[name]),
                "blind": scoring.answer_distribution(blind_ans, [i["label"] for i in items], letters[name])}
        results["direct_accuracy"], results["blind_accuracy"] = direct, blind
        common.plot_bars(os.path.join(out, "blind_test.png"),
                         {f"{t} {c}": results["answer_distribution"][t][c]["frequency"]
                          for t in tasks for c in ("with image", "blind")},
                         ylabel="share of answers", title="Answer distributions with and without the image")

    with common.stage(results, "readouts and layer sweep"):
        names = level_names(model)
        states = {name: level_states(model, items) for name, items in tasks.items()}
        train_states = level_states(model, train_depth)
        sweep = {"depth": depth_readout(model, train_depth, tasks["depth"], train_states, states["depth"]),
                 "matching": region_readout(model, tasks["matching"], states["matching"], "maxsim"),
                 "style": region_readout(model, tasks["style"], states["style"], "gram")}
        feature_level = model.config.feature_hidden_state_indices[0]  # what the projector reads
        results["readout_per_level"] = {k: v for k, v in sweep.items()}
        results["levels"] = names
        tables["Encoder readout (the projector's input) vs the VLM's answer"] = common.md_table(
            ["task", "readout", "readout accuracy", "VLM answer", "blind answer", "chance"],
            [[t, {"depth": "linear depth head", "matching": "MaxSim cosine", "style": "Gram similarity"}[t],
              float(sweep[t][feature_level]), direct[t], blind[t], 1 / len(letters[t])] for t in tasks])
        tables["Readout accuracy per representation level"] = common.md_table(
            ["level", *tasks], [[n, *(float(sweep[t][i]) for t in tasks)] for i, n in enumerate(names)])
        common.plot_curves(os.path.join(out, "layer_sweep.png"), {t: list(sweep[t]) for t in tasks},
                           xlabel="representation", ylabel="readout accuracy", xticks=names,
                           title="Readouts from ViT to LLM (dashed: the VLM's answers)",
                           hlines={f"{t} VLM": direct[t] for t in tasks})

    train_examples = train_depth
    with common.stage(results, "prompt tuning"):
        prompt_tuning = {}
        for n in (1, 5, 10):
            trainer = common.finetune(model, train_examples, os.path.join(out, "runs", f"prompt{n}"), steps=args.steps,
                                      lr=1e-2, soft_prompt_tokens=n, seed=args.seed, weight_decay=0.0)
            prompt_tuning[n] = prompt_tuned_accuracy(model, trainer, tasks["depth"])
        results["prompt_tuning_depth"] = prompt_tuning

    with common.stage(results, "component finetuning"):
        components = {}
        attention_before = answer_attention(model, tasks["depth"])
        for part in ("vision_tower", "projector", "text_decoder"):
            trainer = common.finetune(model, train_examples, os.path.join(out, "runs", part), steps=args.steps,
                                      lr=args.lr, trainable=part, seed=args.seed)
            tuned = common.trained_model(model, trainer)
            components[part] = answer(tuned, tasks["depth"], letters["depth"])[0]
            if part == "text_decoder":
                attention_after = answer_attention(tuned, tasks["depth"])
        results["component_finetuning_depth"] = components
        results["answer_to_image_attention"] = {"before": attention_before, "after_llm_tuning": attention_after}
        tables["Depth: prompt tuning and component finetuning"] = common.md_table(
            ["method", "depth accuracy"],
            [["no tuning", direct["depth"]]] + [[f"prompt tuning, {n} vectors", a] for n, a in prompt_tuning.items()]
            + [[f"finetune {p} only", a] for p, a in components.items()]
            + [["depth head on the projector's input (no LLM)", float(sweep["depth"][feature_level])]])
        common.plot_curves(os.path.join(out, "answer_attention.png"),
                           {"before": list(attention_before), "after LLM tuning": list(attention_after)},
                           xlabel="LLM layer", ylabel="attention mass on image tokens",
                           title="Answer-to-image attention, depth task")
    common.write_results(out, results, tables, "Study B: hidden in plain sight (toy)")


def prompt_tuned_accuracy(model, trainer, items) -> float:
    """Accuracy with the trained soft prompt inserted (greedy first token among A/B)."""
    import jax.numpy as jnp

    from vlm_jax.models.llava import forward

    prefix = trainer.params(trainer.state)["soft_prompt"]["embedding"]
    batch = model.prepare([it["prompt"] for it in items], images=[im for it in items for im in it["images"]])
    arrays = model._arrays(batch)
    out = forward(model.params, model.config, arrays, prefix=prefix,
                  logit_positions=jnp.asarray(batch.last_positions[:, None]))
    tok = model.processor.tokenizer
    ids = [tok.convert_tokens_to_ids(x) for x in ("A", "B")]
    picks = np.asarray(out.logits[:, 0, ids]).argmax(-1)
    return float(np.mean([("A", "B")[p] == it["label"] for p, it in zip(picks, items)]))


if __name__ == "__main__":
    main()
