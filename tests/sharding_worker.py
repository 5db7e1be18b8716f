"""Run in a subprocess with 8 host CPU devices by tests/test_sharding.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py WORKDIR

Compares every sharded workload with the unsharded one on a tiny random LLaVA and writes
WORKDIR/report.json (max abs differences, shard shapes, compile counts).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import vlm_jax as vj  # noqa: E402
from vlm_jax import sharding as S  # noqa: E402
from vlm_jax.models.params import flatten  # noqa: E402
from vlm_jax.probe.features import extract_features  # noqa: E402
from vlm_jax.random_model import build_tokenizer, make_random_llava, tiny_hf_config  # noqa: E402
from vlm_jax.train import LoraConfig, TrainConfig, Trainer  # noqa: E402


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def expected_shard_shape(shape, spec, mesh) -> tuple:
    out = []
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if part is None else ((part,) if isinstance(part, str) else part)
        out.append(dim // math.prod(mesh.shape[a] for a in axes))
    return tuple(out)


def shard_report(params, plan, config) -> dict:
    """Per parameter: does every device hold exactly its rule's shard shape?"""
    specs = flatten(plan.param_specs(config))
    bad, split = [], 0
    for path, array in flatten(params).items():
        want = expected_shard_shape(array.shape, specs[path], plan.mesh)
        got = {tuple(s.data.shape) for s in array.addressable_shards}
        if got != {want}:
            bad.append(f"{'.'.join(path)}: {got} != {want}")
        split += want != tuple(array.shape)
    return {"bad": bad, "split": split, "total": len(specs)}


def bad_input_report(plan) -> dict:
    """The messages of the mistakes that need several devices to make."""
    import warnings

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharding = plan.batch_sharding((3, 5))  # 3 rows over data x fsdp = 4
    out["indivisible_batch_warning"] = [str(w.message) for w in caught]
    out["indivisible_batch_spec"] = str(sharding.spec)
    for name, make in {"wrong_product": lambda: S.make_mesh(data=3, fsdp=2, tensor=2),
                       "fsdp_not_dividing": lambda: S.make_mesh(fsdp=3),
                       "mesh_without_axes": lambda: S.as_plan(jax.make_mesh((8,), ("batch",)))}.items():
        try:
            make()
            out[name] = None
        except ValueError as error:
            out[name] = str(error)
    return out


def examples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["what shape is this", "what colour is it", "where is the shape", "how many shapes"]
    return [{"prompt": f"<image> {words[i % 4]}", "images": [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)],
             "answer": ["red", "blue", "circle"][i % 3]} for i in range(n)]


def train_pair(folder, plan, workdir, name, **extra) -> dict:
    """Three optimizer steps unsharded and sharded from the same start: the losses, the state
    after the first step, how the optimizer state is split, and how often the step compiled."""
    data = examples(16, seed=3)
    out = {}
    for tag, sharding in (("single", None), ("sharded", plan)):
        model = vj.load(folder, progress=False, sharding=sharding)
        cfg = TrainConfig(model=folder, train_data=data, output_dir=os.path.join(workdir, f"{name}-{tag}"),
                          batch_size=8, max_steps=3, learning_rate=1e-4, warmup_ratio=0.0, save_checkpoints=False,
                          progress=False, seed=0, **extra)
        trainer = Trainer(cfg, model=model)
        state = trainer.initial_state()
        losses, after_one = [], None
        for step in range(3):
            with model.mesh_context():
                state, metrics = trainer._step(state, trainer.frozen, trainer._place(trainer.batch(step)))
            losses.append(float(metrics["loss"]))
            if step == 0:
                after_one = jax.tree.map(np.asarray, state)
        out[tag] = (losses, after_one, state, trainer)
    (l1, s1, _, _), (l2, s2, last, t2) = out["single"], out["sharded"]
    moments = [x for x in jax.tree.leaves(last["opt_state"]) if getattr(x, "ndim", 0) >= 2]
    return {
        "loss_single": l1, "loss_sharded": l2,
        "param_diff": max_diff(s1["trainable"], s2["trainable"]),
        "opt_diff": max_diff(s1["opt_state"], s2["opt_state"]),
        "moments_split": sum(len({tuple(s.data.shape) for s in m.addressable_shards} - {tuple(m.shape)}) > 0
                             for m in moments),
        "params_split": sum(len({tuple(s.data.shape) for s in p.addressable_shards} - {tuple(p.shape)}) > 0
                            for p in jax.tree.leaves(last["trainable"])),
        "moments": len(moments),
        "step_compiles": t2._step._cache_size(),
    }


def tensor_parallel_report(folder, base) -> dict:
    """Heads split over the tensor axis, two sequences per batch shard (mesh data=4, tensor=2,
    batch 8): the attention activations gathered in the compiled forward and decode programs
    (none is expected: each device computes the attention of its own heads), and whether the
    results equal the unsharded model's."""
    import re

    from vlm_jax import generate as gen
    from vlm_jax.models import llava

    plan = S.ShardingPlan(S.make_mesh(data=4, tensor=2))
    model = vj.load(folder, progress=False, sharding=plan)
    exs = examples(8)
    batch = base.prepare([ex["prompt"] for ex in exs], images=[ex["images"][0] for ex in exs])
    arrays = model.place(dict(batch))
    head_dims = {base.config.text.head_dim, base.config.vision.hidden_size // base.config.vision.num_heads}

    def attention_gathers(hlo: str) -> list[str]:
        """all-gathers of rank >= 4 ending in a head dim: q, k, v, scores or outputs of attention."""
        shapes = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)
        return [s for s in shapes if len(s.split(",")) >= 4 and int(s.split(",")[-1]) in head_dims]

    with jax.set_mesh(plan.mesh):
        forward = jax.jit(lambda p, a: llava.forward(p, model.config, a).logits).lower(model.params, arrays)
        forward_gathers = attention_gathers(forward.compile().as_text())
        ids, mask = gen.left_align(np.asarray(batch.input_ids), np.asarray(batch.attention_mask), 0)
        decode = gen.decode_program_text(model.params, model.config,
                                         *model.place({"input_ids": ids, "attention_mask": mask}).values(),
                                         arrays["pixel_values"], new_slots=8)
        decode_gathers = attention_gathers(decode)
    return {"forward_attention_gathers": forward_gathers, "decode_attention_gathers": decode_gathers,
            "logits_diff": max_diff(base.run(batch).logits, model.run(batch).logits),
            "generate_equal": bool(np.array_equal(base.generate(batch, 5).tokens, model.generate(batch, 5).tokens))}


def tpu_kernel_report(folder, base) -> dict:
    """The fused attention's TPU kernel (splash attention, through Pallas's interpreter here)
    under two meshes against the unsharded explicit path: logits and the gradient of a loss on
    them at real (unpadded) positions, and whether the program really ran the kernel per shard."""
    from vlm_jax.models import llava

    exs = examples(8)
    batch = base.prepare([ex["prompt"] for ex in exs], images=[ex["images"][0] for ex in exs])
    real = jnp.asarray(np.asarray(batch.attention_mask).astype(bool))
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((*real.shape, base.config.text.vocab_size)),
                          jnp.float32) * real[..., None]

    def logits_and_grad(model, fused):
        def loss(params, arrays):
            logits = llava.forward(params, model.config, arrays, fused_attention=fused).logits
            return jnp.sum(logits * weights), logits

        arrays = model.place(dict(batch))
        with model.mesh_context():
            program = jax.jit(jax.value_and_grad(loss, has_aux=True))
            (_, logits), grad = program(model.params, arrays)
            text = str(jax.make_jaxpr(loss)(model.params, arrays)) if fused else ""
        return np.asarray(logits), jax.tree.map(np.asarray, grad), text

    ref_logits, ref_grad, _ = logits_and_grad(base, False)
    out = {"padded_rows": int((~np.asarray(real)).any(1).sum())}
    os.environ["VLM_JAX_TPU_ATTENTION"] = "interpret"
    try:
        for name, mesh in {"data2_fsdp2_tensor2": S.make_mesh(data=2, fsdp=2, tensor=2),
                           "data4_tensor2": S.make_mesh(data=4, tensor=2)}.items():
            model = vj.load(folder, progress=False, sharding=S.ShardingPlan(mesh))
            logits, grad, text = logits_and_grad(model, True)
            out[name] = {"logits_diff": float(np.abs(logits - ref_logits)[np.asarray(real)].max()),
                         # relative to the largest entry: some entries are 0 but for rounding (the
                         # vision keys' bias: softmax ignores a shift shared by a query's scores)
                         "grad_rel_diff": max_diff(ref_grad, grad)
                                          / max_diff(ref_grad, jax.tree.map(np.zeros_like, ref_grad)),
                         "kernel_per_shard": "shard_map" in text and "pallas_call" in text}
    finally:
        del os.environ["VLM_JAX_TPU_ATTENTION"]
    return out


def main(workdir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    tok = build_tokenizer()
    hf = tiny_hf_config(-(-len(tok) // 8) * 8, tok.convert_tokens_to_ids("<image>"))
    folder = make_random_llava(os.path.join(workdir, "hf"), hf, tokenizer=tok, force=True, std=0.05)
    report: dict = {}
    base = vj.load(folder, progress=False)
    plan = S.ShardingPlan(S.make_mesh(data=2, fsdp=2, tensor=2))
    model = vj.load(folder, progress=False, sharding=plan)
    report["fallbacks"] = plan.fallbacks(base.config)
    report["hf_shards"] = shard_report(model.params, plan, base.config)
    report["hf_param_diff"] = max_diff(base.params, model.params)

    converted = base.save(os.path.join(workdir, "converted"))
    from_converted = vj.load(converted, progress=False, sharding=plan)
    report["converted_shards"] = shard_report(from_converted.params, plan, base.config)
    report["converted_param_diff"] = max_diff(base.params, from_converted.params)

    batch = base.prepare([ex["prompt"] for ex in examples(4)], images=[ex["images"][0] for ex in examples(4)])
    sites = ("text.embed", "text.resid_post", "text.attn_pattern", "text.q", "text.mlp_out", "vision.resid_post",
             "projector.out")
    a, b = base.run(batch, capture=sites), model.run(batch, capture=sites)
    report["logits_diff"] = max_diff(a.logits, b.logits)
    report["capture_diff"] = {s: max_diff(a.acts[s], b.acts[s]) for s in sites}
    report["logits_spec"] = str(b.logits.sharding.spec)

    resid_a = vj.interp.stack_residuals(a.acts)
    resid_b = vj.interp.stack_residuals(b.acts)
    lens_a = vj.logit_lens(base.params, base.config, resid_a, k=5)
    lens_b = vj.logit_lens(model.params, model.config, resid_b, k=5)
    report["lens_ids_equal"] = bool(np.array_equal(np.asarray(lens_a.top_ids), np.asarray(lens_b.top_ids)))
    report["lens_prob_diff"] = max_diff(lens_a.top_probs, lens_b.top_probs)

    edits_a = [base.edits().zero("text.resid_post", layers=[i]) for i in range(2)]
    edits_b = [model.edits().zero("text.resid_post", layers=[i]) for i in range(2)]
    image = np.asarray(batch.input_ids) == base.config.image_token_id
    block = dict(layers=[1], queries=~image, keys=image)
    report["block_attention_diff"] = max_diff(base.run(batch, edits=base.edits().block_attention("text", **block)).logits,
                                              model.run(batch, edits=model.edits().block_attention("text", **block)).logits)
    swept = model.run_sweep(batch, edits_b).logits
    report["sweep_diff"] = max_diff(base.run_sweep(batch, edits_a).logits, swept)
    report["sweep_effect"] = max_diff(swept[0], a.logits)  # the edits really change the output
    report["generate_equal"] = bool(np.array_equal(base.generate(batch, 6).tokens, model.generate(batch, 6).tokens))

    exs = examples(12)
    kw = dict(sites=("text.resid_post", "vision.resid_post"), pooling=("image_mean", "last"), batch_size=4,
              progress=False)
    extract_features(base, exs, os.path.join(workdir, "feat-single"), **kw)
    extract_features(model, exs, os.path.join(workdir, "feat-sharded"), **kw)
    stored = sorted(f for f in os.listdir(os.path.join(workdir, "feat-single")) if f.endswith(".npy"))
    report["features_files"] = len(stored)
    report["features_diff"] = max(
        float(np.max(np.abs(np.load(os.path.join(workdir, "feat-single", f))
                            - np.load(os.path.join(workdir, "feat-sharded", f))))) for f in stored)

    report["tensor_parallel"] = tensor_parallel_report(folder, base)
    report["tpu_kernel"] = tpu_kernel_report(folder, base)
    report["bad_input"] = bad_input_report(plan)
    report["train_full"] = train_pair(folder, plan, workdir, "full")  # remat "full", the default
    report["train_lora"] = train_pair(folder, plan, workdir, "lora", lora=LoraConfig(rank=4), remat="dots")
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
