"""Answer scoring: multiple choice by prefilled greedy generation or by option likelihood,
blind baselines (image removed or blanked), and answer-distribution reports.

Prefilled generation (study A): the assistant turn starts with a prefix such as
"The correct option is (" and the letter generated next is the answer. Option likelihood
sums (or averages) the log-probabilities of each option's tokens after the prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.inputs import answer_token_count

LETTERS = ("A", "B", "C", "D")
PREFIX = "The correct option is ("


def prefill(prompt: str, prefix: str = PREFIX) -> str:
    """The prompt with the assistant's answer begun by `prefix`."""
    return prompt if not prefix else (prompt.rstrip() + " " + prefix)


def parse_letter(text: str, letters: Sequence[str] = LETTERS) -> str | None:
    """The option letter a generated answer names: the first letter at the start (after
    spaces or an opening bracket), else the first standalone option letter, else None."""
    alternatives = "|".join(re.escape(x) for x in letters)
    m = re.match(rf"\s*[\(\[]?\s*({alternatives})(?![A-Za-z])", text)
    if m is None:
        m = re.search(rf"(?<![A-Za-z])({alternatives})(?![A-Za-z])", text)
    return m.group(1) if m else None


@dataclass
class ChoiceResult:
    answers: list[str | None]  # parsed letter per prompt (None: no letter generated)
    texts: list[str]  # generated continuations


def choose_by_generation(model, prompts: Sequence[str], images=None, *, letters: Sequence[str] = LETTERS,
                         prefix: str = PREFIX, max_new_tokens: int = 5) -> ChoiceResult:
    """Multiple choice by prefilled greedy generation (prompts already hold the question)."""
    batch = model.prepare([prefill(p, prefix) for p in prompts], images=images)
    texts = model.generate(batch, max_new_tokens).texts
    return ChoiceResult([parse_letter(t, letters) for t in texts], texts)


def _option_rows(model, prompts, images, options, images_per_prompt):
    """Token rows prompt+option for every (prompt, option), and each row's option length."""
    tok = model.processor.tokenizer
    rows, lengths, row_images = [], [], []
    for i, (prompt, opts) in enumerate(zip(prompts, options)):
        imgs = [] if images is None else images[sum(images_per_prompt[:i]): sum(images_per_prompt[:i + 1])]
        for option in opts:
            rows.append(prompt + option)
            lengths.append(answer_token_count(tok, prompt, option))
            row_images.extend(imgs)
    return rows, lengths, (row_images or None)


def _option_logprobs(params, config, arrays, targets, positions, valid):
    from vlm_jax.models.llava import forward

    out = forward(params, config, arrays, logit_positions=positions)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=-1)


_option_logprobs_jit = jax.jit(_option_logprobs, static_argnames=("config",))


def option_loglikelihood(model, prompts: Sequence[str], options: Sequence[Sequence[str]] | Sequence[str], images=None,
                         *, images_per_prompt: Sequence[int] | None = None, normalize: str = "sum") -> np.ndarray:
    """[B, n_options] log-likelihood of each option continuing each prompt.

    options: one list per prompt, or one list shared by all; each option is appended to the
    prompt as given (include its leading space, e.g. " A" or " a red circle").
    normalize: "sum" (total log-probability) or "mean" (per option token).
    """
    if options and isinstance(options[0], str):
        options = [list(options)] * len(prompts)
    counts = [len(o) for o in options]
    if images_per_prompt is None:
        images_per_prompt = [prompt.count("<image>") for prompt in prompts]
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    rows, lengths, row_images = _option_rows(model, prompts, images, options, images_per_prompt)
    batch = model.prepare(rows, images=row_images, padding_side="left")
    t = batch.input_ids.shape[1]
    width = max(lengths)
    # left padding: the option is the last n tokens; position t predicts token t + 1
    positions = np.zeros((len(rows), width), np.int32)
    targets = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for r, n in enumerate(lengths):
        positions[r, :n] = np.arange(t - n - 1, t - 1)
        targets[r, :n] = batch.input_ids[r, t - n:]
        valid[r, :n] = True
    arrays = model._arrays(batch)
    scores = np.asarray(_option_logprobs_jit(model.params, model.config, arrays, targets, positions, valid))
    if normalize == "mean":
        scores = scores / np.asarray(lengths)
    elif normalize != "sum":
        raise ValueError(f"normalize must be 'sum' or 'mean', not {normalize!r}")
    out, start = [], 0
    for n in counts:
        out.append(scores[start:start + n])
        start += n
    return np.array(out) if len(set(counts)) == 1 else out


def choose_by_likelihood(model, prompts, options, images=None, *, letters: Sequence[str] = LETTERS,
                         normalize: str = "sum") -> list[str]:
    """The option (named by `letters`) with the highest likelihood, per prompt."""
    scores = option_loglikelihood(model, prompts, options, images, normalize=normalize)
    return [letters[int(np.argmax(s))] for s in scores]


def blind(prompts: Sequence[str], images=None, mode: str = "no_image", image_processor=None):
    """A blind version of the inputs: (prompts, images).

    mode "no_image" removes every <image> placeholder (and its newline) and the images;
    "blank" keeps the prompts and replaces each image by a uniform image of the processor's
    mean colour (all-zero pixel_values after normalisation), same size.
    """
    if mode == "no_image":
        return [re.sub(r"<image>\n?", "", p) for p in prompts], None
    if mode != "blank":
        raise ValueError(f"blind mode must be 'no_image' or 'blank', not {mode!r}")
    from PIL import Image

    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    color = tuple(int(round(255 * m)) for m in mean)
    images = images if isinstance(images, (list, tuple)) else [images]
    return list(prompts), [Image.new("RGB", img.size, color) for img in images]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(prediction: str, truth: str, max_truth_words: int = 10) -> float:
    """Token-level F1 between a generated answer and the ground truth (cut to its first
    `max_truth_words` words), on lower-cased alphanumeric words (study D's open-ended score)."""
    pred, gold = _words(prediction), _words(truth)[:max_truth_words]
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def lenient_match(prediction: str, truth: str, first_words: int = 20) -> bool:
    """Lenient exact match: the ground truth's words appear, in order and contiguous, within
    the first `first_words` words of the answer."""
    pred, gold = _words(prediction)[:first_words], _words(truth)
    if not gold:
        return False
    return any(pred[i:i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1))


def answer_distribution(answers: Sequence[str | None], correct: Sequence[str] | None = None,
                        letters: Sequence[str] = LETTERS) -> dict:
    """Counts and frequencies per letter (and 'none'), the majority answer, accuracy, chance,
    and the bias of the most frequent answer over uniform."""
    n = len(answers)
    counts = Counter(a if a in letters else "none" for a in answers)
    report = {
        "n": n,
        "counts": {k: counts.get(k, 0) for k in (*letters, "none")},
        "frequency": {k: counts.get(k, 0) / n if n else 0.0 for k in (*letters, "none")},
        "majority": max(letters, key=lambda k: counts.get(k, 0)) if n else None,
        "chance": 1.0 / len(letters),
    }
    report["majority_bias"] = report["frequency"][report["majority"]] - report["chance"] if n else 0.0
    if correct is not None:
        report["accuracy"] = float(np.mean([a == c for a, c in zip(answers, correct)])) if n else 0.0
        truth = Counter(correct)
        report["correct_counts"] = {k: truth.get(k, 0) for k in letters}
    return report


def format_distribution(report: dict) -> str:
    """A markdown table of an answer_distribution report."""
    keys = list(report["counts"])
    lines = ["| answer | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
             "| count | " + " | ".join(str(report["counts"][k]) for k in keys) + " |",
             "| share | " + " | ".join(f"{report['frequency'][k]:.2f}" for k in keys) + " |"]
    if "accuracy" in report:
        lines.append(f"\naccuracy {report['accuracy']:.3f} (chance {report['chance']:.2f}), "
                     f"majority answer {report['majority']} (+{report['majority_bias']:.2f} over uniform)")
    return "\n".join(lines)
