"""Trains the embedded toy VLM from scratch and writes it to checkpoints/toy-llava.

A small LLaVA (CLIP-style tower 4 x 96 at 64 px / 8, 2-layer GELU projector, Llama-style
decoder 4 x 192) over a word-level tokenizer, trained with vlm_jax's own trainer on
synthetic shape-world questions (vlm_jax.datasets): shape names, colours, positions, counts,
captions, study A's correspondence format and study D's hierarchy, for the six named shapes
only (squiggles appear only as unnamed objects to count). Deterministic from --seed on CPU.

    python experiments/toy/train_toy.py --out checkpoints/.toy-stage1                # stage 1, ~41 min
    python experiments/toy/train_toy.py --init checkpoints/.toy-stage1 --focus \
        --steps 1500 --lr 5e-4 --out checkpoints/.toy-stage2                         # stage 2, ~14 min
    python experiments/toy/train_toy.py --init checkpoints/.toy-stage2 --binding \
        --steps 2000 --lr 5e-4 --out checkpoints/.toy-stage3                         # stage 3, ~20 min
    python experiments/toy/train_toy.py --init checkpoints/.toy-stage3 --binding \
        --steps 1500 --lr 3e-4 --out checkpoints/.toy-stage4                         # stage 4, ~16 min
    python experiments/toy/train_toy.py --init checkpoints/.toy-stage4 --binding \
        --steps 2000 --lr 3e-4                                                       # stage 5, ~24 min
    python experiments/toy/train_toy.py --evaluate checkpoints/toy-llava --eval-n 600 --eval-seed 4242

Each stage writes its card (toy_card.json, with the previous stages' cards nested in it) and
keeps its resumable orbax checkpoints in its own work folder (default: next to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from vlm_jax.datasets import depth, hierarchy, questions
from vlm_jax.random_model import build_tokenizer, make_random_llava, tiny_hf_config

IMAGE_SIZE = 64
# words the experiments need that training never shows (names taught later, study D's words)
TEACHING_NAMES = {
    "random_strings": ("blick", "dax", "wug", "fep", "zorb", "kiki", "tupa", "glorp", "snib", "vex"),
    "human_names": ("alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "iris", "jack"),
    "ordinary_words": ("apple", "chair", "river", "cloud", "lamp", "horse", "bread", "stone", "piano", "tiger"),
}
EXTRA_WORDS = ("Answer", "yes", "no", "not", "sure", "the", "this", "that", "it", "kind", "what", "which")

# (group, generator, weight): every batch is one group, so a batch's image count is fixed
SINGLE = (
    (questions.name_question, 3), (questions.color_question, 3), (questions.position_question, 2),
    (questions.count_question, 2), (questions.caption, 1),
    (lambda rng, s: hierarchy.hierarchy_training_example(rng, s, "superordinate"), 1),
    (lambda rng, s: hierarchy.hierarchy_training_example(rng, s, "attributes"), 1),
    (lambda rng, s: hierarchy.hierarchy_training_example(rng, s, "image_fine"), 0.35),
)
GROUPS = {"single": 0.7, "pair": 0.2, "text": 0.1}
# Stage 2 (--init STAGE1 --focus): after stage 1 the toy names the easy shapes and reads a lone
# shape's colour, but confuses circle / hexagon / pentagon and does not yet bind "the <shape>" to
# the right object of two; stage 2 tilts the mixture towards those questions at a lower lr.
FOCUS_SINGLE = {"name": 4.0, "color": 6.0, "caption": 2.0}
FOCUS_GROUPS = {"single": 0.85, "pair": 0.1, "text": 0.05}
# Stage 3 (--init STAGE2 --binding): the toy still answers a colour question about one of two
# shapes at ~0.53 (the colour of either object); stage 3 asks mostly about one of two shapes
# (colour, position, captions that pair each colour with its shape).
BINDING_SINGLE = {"name": 2.0, "color": 2.0, "color_of_two": 6.0, "caption": 3.0, "position": 2.0}
BINDING_GROUPS = {"single": 0.9, "pair": 0.07, "text": 0.03}
# The first steps show single images only (short sequences, every answer about the image), so
# the vision tower learns the shapes before the mixture's two-image and text-only batches.
SINGLE_ONLY_FRACTION = 0.4


def vocabulary(seed: int = 123) -> list[str]:
    rng = np.random.default_rng(seed)
    sample = questions.training_mixture(rng, 3000, IMAGE_SIZE)
    sample += [depth.depth_item(rng, IMAGE_SIZE, prefix=questions.MC_PREFIX) for _ in range(20)]
    sample += [hierarchy.hierarchy_training_example(rng, IMAGE_SIZE, "text_fine") for _ in range(200)]
    words = questions.words_in(sample) - {"<", ">", "image"}
    words |= {w for names in TEACHING_NAMES.values() for w in names} | set(EXTRA_WORDS) | {"image"}
    words |= set(questions.NUMBER_WORDS) | set(questions.LETTERS)
    return sorted(words)


def color_of_two(rng, image_size):
    return questions.color_question(rng, image_size, two_shapes=True)


def batch_fn(batch_size: int, seed: int, single_only_steps: int = 0, focus: bool = False, binding: bool = False):
    mixture = list(SINGLE) + ([(color_of_two, 0.0)] if binding else [])
    singles = [g for g, _ in mixture]
    if binding:
        stage = {questions.name_question: "name", questions.color_question: "color", color_of_two: "color_of_two",
                 questions.caption: "caption", questions.position_question: "position"}
        weights = np.array([BINDING_SINGLE[stage[g]] if g in stage else min(w, 0.5) for g, w in mixture], float)
        groups = BINDING_GROUPS
    else:
        focus_weights = {questions.name_question: FOCUS_SINGLE["name"],
                         questions.color_question: FOCUS_SINGLE["color"], questions.caption: FOCUS_SINGLE["caption"]}
        weights = np.array([focus_weights.get(g, w) if focus else w for g, w in mixture], float)
        groups = FOCUS_GROUPS if focus else GROUPS
    weights /= weights.sum()

    def batch(step: int) -> list[dict]:
        rng = np.random.default_rng([seed, step])
        group = str(rng.choice(list(groups), p=list(groups.values())))
        if step < single_only_steps:
            group = "single"
        if group == "pair":
            out = []
            for _ in range(batch_size):
                item = questions.correspondence_item(rng, "named", IMAGE_SIZE, prefix="")
                item["answer"] = f" {questions.MC_PREFIX} {item['label']} )"
                out.append(item)
            return out
        if group == "text":
            return [hierarchy.hierarchy_training_example(rng, IMAGE_SIZE, "text_fine") for _ in range(batch_size)]
        return [singles[int(rng.choice(len(singles), p=weights))](rng, IMAGE_SIZE) for _ in range(batch_size)]

    return batch


def evaluate(model, n: int = 200, seed: int = 999) -> dict:
    """Held-out greedy accuracy on name and colour questions (the answer word generated); colour
    also split into questions about a lone shape and about one of two."""
    rng = np.random.default_rng(seed)
    scores = {}
    for kind, make in (("name", questions.name_question), ("color", questions.color_question)):
        items = [make(rng, IMAGE_SIZE) for _ in range(n)]
        correct = []
        for start in range(0, n, 50):
            chunk = items[start:start + 50]
            batch = model.prepare([it["prompt"] for it in chunk], images=[im for it in chunk for im in it["images"]])
            texts = model.generate(batch, 4).texts
            correct += [it["label"] in text.split() for it, text in zip(chunk, texts)]
        correct = np.array(correct)
        scores[kind] = float(np.mean(correct))
        if kind == "color":
            lone = np.array([len(it["entities"]) == 1 for it in items])
            scores["color_lone_shape"] = float(np.mean(correct[lone]))
            scores["color_one_of_two"] = float(np.mean(correct[~lone]))
    return scores


def write_initial_model(out_dir: str, seed: int = 0) -> str:
    """The untrained toy (random weights, the toy's tokenizer and architecture): where training
    starts, and what the experiment smoke tests run on when no trained toy is present."""
    tokenizer = build_tokenizer(vocabulary())
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = -(-len(tokenizer) // 8) * 8
    config = tiny_hf_config(vocab, image_token, vision_layers=4, text_layers=4, vision_width=96, text_width=192,
                            image_size=IMAGE_SIZE, patch_size=8, text_intermediate=512)
    config["text_config"]["max_position_embeddings"] = 512
    return make_random_llava(out_dir, config, seed=seed, tokenizer=tokenizer, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="checkpoints/toy-llava")
    parser.add_argument("--workdir", help="orbax checkpoints (resumable) and the initial model; default "
                        "a hidden folder next to --out (checkpoints/.toy-llava-work for the default --out)")
    parser.add_argument("--init", help="start from this toy (stage 2) instead of random weights")
    mixture = parser.add_mutually_exclusive_group()
    mixture.add_argument("--focus", action="store_true", help="stage 2's mixture (name / colour / captions)")
    mixture.add_argument("--binding", action="store_true",
                         help="stages 3-5's mixture (questions about one of two shapes)")
    parser.add_argument("--evaluate", metavar="TOY", help="only measure this toy's held-out accuracy and print it")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out questions per kind")
    parser.add_argument("--eval-seed", type=int, default=999)
    args = parser.parse_args()
    if args.evaluate:
        import vlm_jax as vj

        print(json.dumps(evaluate(vj.load(args.evaluate, progress=False), args.eval_n, args.eval_seed), indent=2))
        return
    # one work folder per output: a stage must not resume another stage's orbax checkpoints
    out_dir, out_name = os.path.split(os.path.normpath(args.out))
    args.workdir = args.workdir or os.path.join(out_dir, "." + out_name.lstrip(".") + "-work")

    import vlm_jax as vj
    from vlm_jax.train import TrainConfig, Trainer

    if args.init:
        init_dir = os.path.join(args.workdir, "init")
        if os.path.exists(init_dir):
            shutil.rmtree(init_dir)
        shutil.copytree(args.init, init_dir)  # --init may be --out: stage 2 overwrites it at the end
    else:
        init_dir = write_initial_model(os.path.join(args.workdir, "init"), args.seed)
    previous = None
    if os.path.exists(os.path.join(init_dir, "toy_card.json")):
        with open(os.path.join(init_dir, "toy_card.json")) as f:
            previous = json.load(f)
    model = vj.load(init_dir, dtype="float32", progress=False)
    print(model)
    single_only_steps = 0 if args.init else int(SINGLE_ONLY_FRACTION * args.steps)
    batches = batch_fn(args.batch_size, args.seed, single_only_steps, focus=args.focus, binding=args.binding)
    train = TrainConfig(model=init_dir, train_data=None, batch_fn=batches,
                        output_dir=os.path.join(args.workdir, "run"), param_dtype="float32",
                        learning_rate=args.lr, betas=(0.9, 0.98), weight_decay=0.01, warmup_ratio=0.05,
                        batch_size=args.batch_size, max_steps=args.steps, checkpoint_every=250,
                        keep_checkpoints=1, remat=False, seed=args.seed, log_every=10, token_bucket=16)
    start = time.time()
    trainer = Trainer(train, model=model)
    result = trainer.run()
    minutes = (time.time() - start) / 60
    out = trainer.export(args.out + ".tmp")
    trained = vj.load(out, progress=False)
    scores = evaluate(trained)
    card = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
            "train_minutes": round(minutes, 1), "final_loss": result.losses[args.steps],
            "held_out_accuracy": scores, "parameters": trained.num_params,
            "init": "previous_stage" if args.init else "random", "focus": args.focus, "binding": args.binding,
            "command": "python " + " ".join(sys.argv),
            "script": "experiments/toy/train_toy.py", "teaching_names": TEACHING_NAMES}
    if previous is not None:
        card["previous_stage"] = previous
    with open(os.path.join(out, "toy_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(out, args.out)
    print(json.dumps(card, indent=2))
    if min(scores.values()) < 0.9:
        print("warning: held-out accuracy below 0.9", file=sys.stderr)


if __name__ == "__main__":
    main()
