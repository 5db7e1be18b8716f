"""Study A, "VLMs Need Words": matching entities across two images, named vs unnamed.

Analyses (see README.md): direct multiple-choice answers (prefilled "The correct option is (");
the training-free MaxSim representation probe at every LLM layer; the logit-lens Jaccard
overlap of the four candidates' decoded tokens per layer; teaching names to squiggles
(random strings / human names / ordinary words) then re-testing; task finetuning on squiggle
correspondence then re-probing.

    python experiments/needs_words/run.py [--model M] [--spair SPair-71k] [--smoke]
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

from vlm_jax.datasets import questions  # noqa: E402
from vlm_jax.interp import scoring  # noqa: E402
from vlm_jax.interp.geometry import ImageGeometry  # noqa: E402
from vlm_jax.interp.lens_report import patch_lens, plot_patch_lens  # noqa: E402
from vlm_jax.interp.logit_lens import (COLOR_WORDS, OPTION_LETTERS, gather_positions, ids_for_words,  # noqa: E402
                                       logit_lens, mean_pairwise_jaccard, stack_residuals)
from vlm_jax.interp.readouts import maxsim_scores  # noqa: E402

TEACHING_NAMES = {
    "random strings": ("blick", "dax", "wug", "fep", "zorb", "kiki", "tupa", "glorp", "snib", "vex"),
    "human names": ("alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "iris", "jack"),
    "ordinary words": ("apple", "chair", "river", "cloud", "lamp", "horse", "bread", "stone", "piano", "tiger"),
}
TAUGHT = tuple(range(10))  # squiggle ids given names; never named in the toy's training
TASK_POOL = tuple(range(10, 40))  # squiggles used to finetune the task (disjoint from TAUGHT)


def synthetic_items(model, rng, family: str, n: int, pool=tuple(range(40))) -> list[dict]:
    items = []
    for _ in range(n):
        item = questions.correspondence_item(rng, family, 64, squiggle_pool=pool, prefix="")
        item["prompt"] = common.prompt(model, questions.correspondence_question(), 2, questions.MC_PREFIX)
        items.append(item)
    return items


def spair_items(model, root: str, rng, n: int, part_names: dict | None = None) -> list[dict]:
    """SPair-71k pairs as study A items: a REF box around a source keypoint drawn on image 1,
    four labelled candidate boxes (the true target keypoint and three others) on image 2.

    part_names ({category: {keypoint id: name or null}}, the study's nameable / unnameable
    split, which SPair-71k itself does not ship) sets each item's "family" to "nameable" or
    "unnameable"; without it every item is "spair"."""
    from PIL import Image, ImageDraw

    from vlm_jax.datasets.readers import read_spair

    items = []
    for pair in read_spair(root, "test"):
        if len(items) >= n:
            break
        shared = [i for i, (s, t) in enumerate(zip(pair["source_keypoints"], pair["target_keypoints"]))
                  if min(s) >= 0 and min(t) >= 0]
        if len(pair["target_keypoints"]) < 4 or not shared:
            continue
        k = int(rng.choice(shared))
        others = [i for i in range(len(pair["target_keypoints"])) if i != k and min(pair["target_keypoints"][i]) >= 0]
        if len(others) < 3:
            continue
        chosen = [k, *rng.choice(others, size=3, replace=False)]
        order = rng.permutation(4)
        src, trg = Image.open(pair["source_image"]).convert("RGB"), Image.open(pair["target_image"]).convert("RGB")
        half = 0.06 * max(src.size)
        sx, sy = pair["source_keypoints"][k]
        ref_box = np.array([sx - half, sy - half, sx + half, sy + half], np.float32)
        ImageDraw.Draw(src).rectangle(ref_box.tolist(), outline=(255, 0, 0), width=3)
        boxes, draw = [], ImageDraw.Draw(trg)
        half = 0.06 * max(trg.size)
        for slot, which in enumerate(order):
            tx, ty = pair["target_keypoints"][int(chosen[which])]
            box = np.array([tx - half, ty - half, tx + half, ty + half], np.float32)
            draw.rectangle(box.tolist(), outline=(255, 0, 0), width=3)
            draw.text((box[0] + 2, box[1] + 2), questions.LETTERS[slot], fill=(255, 0, 0))
            boxes.append(box)
        correct = int(np.nonzero(order == 0)[0][0])
        question = ("the red box in image 1 marks a point of the object. image 2 shows four boxes labelled A, B, C "
                    "and D. which box marks the same point?")
        family = "spair"
        if part_names is not None:
            kp_id = str(pair["keypoint_ids"][k]) if "keypoint_ids" in pair else str(k)
            family = "nameable" if part_names.get(pair["category"], {}).get(kp_id) else "unnameable"
        items.append({"prompt": common.prompt(model, question, 2, questions.MC_PREFIX), "images": [src, trg],
                      "family": family, "category": pair["category"], "label": questions.LETTERS[correct], "correct": correct,
                      "ref_box": ref_box, "boxes": boxes})
    if not items:
        raise SystemExit(f"no usable SPair-71k test pairs under {root}")
    return items


def region_tokens(model, batch, image: int, pil_image, box) -> np.ndarray:
    geometry = ImageGeometry.from_processor(model.processor.hf.image_processor, pil_image,
                                            model.config.vision.patch_size)
    patches = geometry.box_patches(box, min_coverage=0.25)
    if not patches.any():
        patches = geometry.box_patches(box)
    _, grid = batch.image_tokens.grid_positions(image)
    return grid[patches]


def probe(model, items: list[dict], batch_size: int = 16):
    """MaxSim accuracy [L + 1], mean pairwise Jaccard [L + 1] of the candidates' top-1 tokens."""
    tok = model.processor.tokenizer
    ignore = ids_for_words(tok, COLOR_WORDS + OPTION_LETTERS)
    correct, jaccard = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = model.prepare([it["prompt"] for it in chunk], images=[im for it in chunk for im in it["images"]])
        out = model.run(batch, capture=("text.embed", "text.resid_post"), compute_logits=False)
        resid = stack_residuals(out.acts)  # [L + 1, B, T, D]
        for row, item in enumerate(chunk):
            ref = region_tokens(model, batch, 2 * row, item["images"][0], item["ref_box"])
            cands = [region_tokens(model, batch, 2 * row + 1, item["images"][1], box) for box in item["boxes"]]
            scores = np.asarray(maxsim_scores(resid[:, row], ref, cands))  # [L + 1, 4]
            correct.append(scores.argmax(axis=1) == item["correct"])
            positions = np.concatenate(cands)
            lens = logit_lens(model.params, model.config, gather_positions(resid[:, row:row + 1], positions[None]), k=1)
            top1 = np.asarray(lens.top_ids)[:, 0, :, 0]  # [L + 1, P]
            bounds = np.cumsum([0] + [len(c) for c in cands])
            regions = [np.arange(bounds[i], bounds[i + 1]) for i in range(4)]
            jaccard.append(mean_pairwise_jaccard(top1, regions, ignore))
    return np.mean(correct, axis=0), np.mean(jaccard, axis=0)


def direct(model, items: list[dict]):
    result = scoring.choose_by_generation(model, [it["prompt"] for it in items],
                                          [im for it in items for im in it["images"]], prefix="", max_new_tokens=5)
    answers = result.answers
    acc = float(np.mean([a == it["label"] for a, it in zip(answers, items)]))
    return acc, answers


def naming_examples(model, rng, names: tuple[str, ...], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        i = int(rng.integers(len(TAUGHT)))
        img, _, _, _ = questions.single_shape(rng, "squiggle", 64, squiggle_id=TAUGHT[i])
        out.append({"prompt": common.prompt(model, "what shape is this ?", 1), "images": [img],
                    "answer": f" a {names[i]}"})
    return out


def naming_accuracy(model, rng, names, n: int) -> float:
    examples = naming_examples(model, rng, names, n)
    batch = model.prepare([e["prompt"] for e in examples], images=[e["images"][0] for e in examples])
    texts = model.generate(batch, 3).texts
    return float(np.mean([e["answer"].split()[-1] in t.split() for e, t in zip(examples, texts)]))


def task_examples(model, rng, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        item = questions.correspondence_item(rng, "squiggle", 64, squiggle_pool=TASK_POOL, prefix="")
        item["prompt"] = common.prompt(model, questions.correspondence_question(), 2, questions.MC_PREFIX)
        item["answer"] = item["label"]
        out.append(item)
    return out


def main() -> None:
    args = common.arguments(__doc__, "needs_words", lambda p: (
        p.add_argument("--items", type=int, default=64, help="items per family"),
        p.add_argument("--spair", help="a local SPair-71k folder: run the probes on its test pairs"),
        p.add_argument("--spair-part-names", help="JSON {category: {keypoint id: name or null}}: splits SPair "
                       "items into nameable / unnameable parts"),
        p.add_argument("--lr", type=float, default=3e-4, help="finetuning learning rate (the paper: 1e-5 on "
                       "2-14B models; the toy needs more)"),
        p.add_argument("--steps", type=int, default=60, help="teaching-names finetuning steps (batch 16)")))
    if args.smoke:
        args.items, args.steps = 6, 3
    model, rng, results = common.start_study(args, items_per_family=args.items)
    out = args.out
    tables: dict = {}

    with common.stage(results, "items"):
        if args.spair:
            part_names = None
            if args.spair_part_names:
                with open(args.spair_part_names) as f:
                    part_names = json.load(f)
            families = {}
            for item in spair_items(model, args.spair, rng, args.items, part_names):
                families.setdefault(item["family"], []).append(item)
        else:
            families = {"named": synthetic_items(model, rng, "named", args.items),
                        "squiggle": synthetic_items(model, rng, "squiggle", args.items)}

    with common.stage(results, "direct answers"):
        direct_acc, answers = {}, {}
        for name, items in families.items():
            direct_acc[name], answers[name] = direct(model, items)
        results["direct_accuracy"] = direct_acc
        results["answer_distribution"] = {n: scoring.answer_distribution(a, [it["label"] for it in families[n]])
                                          for n, a in answers.items()}
        tables["Direct answers (prefilled greedy)"] = common.md_table(
            ["family", "accuracy", "chance", "majority answer"],
            [[n, direct_acc[n], 0.25, results["answer_distribution"][n]["majority"]] for n in families])
        common.plot_bars(os.path.join(out, "answers.png"),
                         {n: results["answer_distribution"][n]["frequency"] for n in families},
                         ylabel="share of answers", title="Answer distribution (direct answers)")

    with common.stage(results, "MaxSim probe and logit-lens Jaccard"):
        maxsim, jaccard = {}, {}
        for name, items in families.items():
            maxsim[name], jaccard[name] = probe(model, items)
        results["maxsim_accuracy_per_layer"] = maxsim
        results["jaccard_per_layer"] = jaccard
        n_layers = len(next(iter(maxsim.values())))
        tables["MaxSim representation probe (accuracy per layer; 0 = projector output)"] = common.md_table(
            ["layer", *families], [[layer, *(maxsim[n][layer] for n in families)] for layer in range(n_layers)])
        tables["Best MaxSim layer vs direct answer"] = common.md_table(
            ["family", "best layer", "probe accuracy there", "direct answer"],
            [[n, int(np.argmax(maxsim[n])), float(np.max(maxsim[n])), direct_acc[n]] for n in families])
        tables["Logit-lens Jaccard of the candidates' top-1 tokens (lower = more distinct)"] = common.md_table(
            ["layer", *families], [[layer, *(jaccard[n][layer] for n in families)] for layer in range(n_layers)])
        common.plot_curves(os.path.join(out, "maxsim_per_layer.png"), maxsim, xlabel="LLM layer (0 = projector)",
                           ylabel="MaxSim probe accuracy", title="Representation probe vs direct answers",
                           hlines={f"{n} direct": direct_acc[n] for n in families})
        common.plot_curves(os.path.join(out, "jaccard_per_layer.png"), jaccard, xlabel="LLM layer (0 = projector)",
                           ylabel="mean pairwise Jaccard", title="Distinctness of decoded candidate tokens")
        first = next(iter(families.values()))[0]
        batch = model.prepare([first["prompt"]], images=first["images"])
        plot_patch_lens(patch_lens(model, batch, image=1), os.path.join(out, "lens_grid.png"),
                        title="logit lens on the options image (top-1 token per patch)")

    if args.spair:
        common.write_results(out, results, tables, "Study A (needs_words) on SPair-71k")
        return

    with common.stage(results, "teaching names"):
        taught_items = synthetic_items(model, np.random.default_rng(args.seed + 1), "squiggle", args.items, TAUGHT)
        before, _ = direct(model, taught_items)
        before_probe, _ = probe(model, taught_items)
        teach: dict = {"before": {"accuracy": before, "best_probe": float(np.max(before_probe))}}
        for condition, names in TEACHING_NAMES.items():
            examples = naming_examples(model, np.random.default_rng(args.seed + 2), names, 16 * args.steps)
            trainer = common.finetune(model, examples, os.path.join(out, "runs", condition), steps=args.steps,
                                      lr=args.lr, seed=args.seed)
            taught = common.trained_model(model, trainer)
            acc, _ = direct(taught, taught_items)
            probe_acc, _ = probe(taught, taught_items)
            teach[condition] = {"accuracy": acc, "best_probe": float(np.max(probe_acc)),
                                "naming_accuracy": naming_accuracy(taught, np.random.default_rng(7), names, 32)}
        results["teaching_names"] = teach
        tables["Teaching names to 10 squiggles (correspondence accuracy on those squiggles)"] = common.md_table(
            ["condition", "direct accuracy", "best MaxSim layer accuracy", "names learned"],
            [[c, v["accuracy"], v["best_probe"], v.get("naming_accuracy", "-")] for c, v in teach.items()])
        common.plot_bars(os.path.join(out, "teaching_names.png"),
                         {c: {"direct": v["accuracy"], "best probe": v["best_probe"]} for c, v in teach.items()},
                         ylabel="accuracy on taught squiggles", title="Teaching names")

    with common.stage(results, "task finetuning"):
        examples = task_examples(model, np.random.default_rng(args.seed + 3), 4 * max(8, args.items))
        steps = 4 * len(examples) // 8  # 4 epochs, batch 8
        trainer = common.finetune(model, examples, os.path.join(out, "runs", "task"), steps=steps, batch_size=8,
                                  lr=args.lr, seed=args.seed)
        tuned = common.trained_model(model, trainer)
        task = {}
        for name, items in families.items():
            acc, _ = direct(tuned, items)
            probe_acc, _ = probe(tuned, items)
            task[name] = {"before": direct_acc[name], "after": acc, "probe_after": probe_acc,
                          "best_probe_after": float(np.max(probe_acc)), "best_probe_before": float(np.max(maxsim[name]))}
        results["task_finetuning"] = task
        tables["Task finetuning on squiggle correspondence (held-out squiggles and named shapes)"] = common.md_table(
            ["family", "direct before", "direct after", "best probe before", "best probe after"],
            [[n, v["before"], v["after"], v["best_probe_before"], v["best_probe_after"]] for n, v in task.items()])
        common.plot_curves(os.path.join(out, "maxsim_after_task_finetuning.png"),
                           {**{f"{n} before": maxsim[n] for n in families},
                            **{f"{n} after": task[n]["probe_after"] for n in families}},
                           xlabel="LLM layer (0 = projector)", ylabel="MaxSim probe accuracy",
                           title="Representation probe before / after task finetuning")
    common.write_results(out, results, tables, "Study A: VLMs need words (toy)")


if __name__ == "__main__":
    main()
