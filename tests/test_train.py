"""Finetuning: learning, frozen parameters, LoRA, soft prompts, checkpoints, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import train_task
import vlm_jax as vj
from vlm_jax.cli import main as cli_main
from vlm_jax.errors import CheckpointMismatchError
from vlm_jax.models import params as P
from vlm_jax.train import LoraConfig, TrainConfig, Trainer, TrainingDivergedError, lora_parameter_count
from vlm_jax.train.data import DataError
from vlm_jax.train.lora import UnknownParametersError

TESTS = os.path.dirname(__file__)


def config(model, out, **overrides):
    base = dict(model=model, train_data=train_task.examples(48, 0), eval_data=train_task.examples(24, 1),
                output_dir=str(out), param_dtype="float32", learning_rate=3e-3, batch_size=8, max_steps=12,
                checkpoint_every=100, remat=False, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def bitwise_equal(a: dict, b: dict, paths=None) -> bool:
    fa, fb = P.flatten(a), P.flatten(b)
    paths = paths or fa.keys()
    return all(np.asarray(fa[p]).tobytes() == np.asarray(fb[p]).tobytes() for p in paths)


@pytest.fixture(scope="module")
def model(random_llava):
    return vj.load(random_llava, dtype="float32", progress=False)


def test_finetuning_lowers_loss_and_raises_held_out_accuracy(model, random_llava, tmp_path):
    trainer = Trainer(config(random_llava, tmp_path, max_steps=24, eval_every=4), model=model)
    before = trainer.evaluate(trainer.initial_state())
    result = trainer.run()
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    after = result.eval[24]
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] >= before["eval_accuracy"] + 0.5
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(lines[0]) and any("eval_accuracy" in x for x in lines)


def test_component_training_leaves_frozen_parameters_bitwise_unchanged(model, random_llava, tmp_path):
    trainer = Trainer(config(random_llava, tmp_path, trainable="projector", max_steps=4), model=model)
    trainer.run()
    trained = trainer.params(trainer.state)
    frozen = [p for p in P.flatten(model.params) if p[0] != "multi_modal_projector"]
    assert bitwise_equal(model.params, trained, frozen)
    assert not bitwise_equal(model.params, trained, [("multi_modal_projector", "linear_1", "kernel")])
    assert set(trainer.state["trainable"]) == {"/".join(p) for p in P.flatten(model.params)
                                               if p[0] == "multi_modal_projector"}
    # frozen parameters carry no optimizer state: AdamW keeps two moments of the trainable ones only
    moments = sum(int(x.size) for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0)
    assert moments == 2 * sum(int(x.size) for x in trainer.state["trainable"].values())
    assert len(trainer.frozen) == len(frozen)


def test_lora_has_exactly_the_expected_trainable_parameters(model, random_llava, tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "fc1"), towers=("text", "vision"))
    trainer = Trainer(config(random_llava, tmp_path, lora=lora, max_steps=6, learning_rate=1e-2), model=model)
    t, v = model.config.text, model.config.vision
    expected = (t.num_layers * 4 * ((t.hidden_size + t.num_heads * t.head_dim) + (t.hidden_size + t.num_kv_heads * t.head_dim))
                + v.num_layers * 4 * (2 * (v.hidden_size + v.hidden_size) + (v.hidden_size + v.intermediate_size)))
    n_trainable = sum(int(x.size) for x in trainer.initial_trainable.values())
    assert n_trainable == expected == lora_parameter_count(model.params, lora)
    trainer.run()
    # the base weights never change; the merged export matches the adapted forward pass
    assert bitwise_equal(model.params, trainer.params(trainer.state), list(P.flatten(model.params)))
    out = trainer.export(str(tmp_path / "merged"))
    batch = model.prepare(train_task.PROMPT + " red", images=train_task.examples(1, 3)[0]["images"])
    adapted = vj.Model(trainer.params(trainer.state), model.config).run(batch).logits
    from transformers import LlavaForConditionalGeneration
    import torch

    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}).logits.numpy()
    assert np.abs(np.asarray(adapted) - ref).max() / np.abs(ref).max() <= 1e-5


def test_soft_prompt_training_changes_only_the_prefix(model, random_llava, tmp_path):
    trainer = Trainer(config(random_llava, tmp_path, soft_prompt_tokens=3, max_steps=8, learning_rate=5e-2),
                      model=model)
    start = np.asarray(trainer.initial_trainable["soft_prompt/embedding"]).copy()
    result = trainer.run()
    params = trainer.params(trainer.state)
    assert bitwise_equal(model.params, params, list(P.flatten(model.params)))
    assert params["soft_prompt"]["embedding"].shape == (3, model.config.text.hidden_size)
    assert not np.array_equal(np.asarray(params["soft_prompt"]["embedding"]), start)
    assert result.losses[8] < result.losses[1]
    exported = trainer.export(str(tmp_path / "exported"))  # the prefix is saved beside the HF folder
    np.testing.assert_array_equal(np.load(os.path.join(exported, "soft_prompt.npy")),
                                  np.asarray(params["soft_prompt"]["embedding"], np.float32))


def test_grad_accumulation_matches_one_big_batch(model, random_llava, tmp_path):
    one = Trainer(config(random_llava, tmp_path / "a", max_steps=3), model=model).run()
    two = Trainer(config(random_llava, tmp_path / "b", max_steps=3, grad_accum=2), model=model).run()
    np.testing.assert_allclose([one.losses[s] for s in (1, 2, 3)], [two.losses[s] for s in (1, 2, 3)], rtol=1e-4)


def test_fused_attention_training_matches_the_explicit_path(model, random_llava, tmp_path):
    # On CPU the default is the explicit path; the fused kernel (jax.nn.dot_product_attention,
    # cuDNN flash attention on GPU) must train the same model: same losses, same parameters.
    explicit = Trainer(config(random_llava, tmp_path / "a", max_steps=3, fused_attention=False), model=model)
    fused = Trainer(config(random_llava, tmp_path / "b", max_steps=3, fused_attention=True), model=model)
    runs = [trainer.run() for trainer in (explicit, fused)]
    np.testing.assert_allclose([runs[0].losses[s] for s in (1, 2, 3)], [runs[1].losses[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    a, b = (P.flatten(trainer.params(trainer.state)) for trainer in (explicit, fused))
    # AdamW divides each gradient by its own running scale, so an element with a near-zero
    # gradient still moves by up to ~lr (3e-3) per step: there the two paths' rounding shows
    # (seen: 7e-6 on 2 of 24576 elements), hence an absolute tolerance well below one step.
    for path in a:
        np.testing.assert_allclose(np.asarray(a[path]), np.asarray(b[path]), rtol=1e-4, atol=5e-5, err_msg=str(path))
    # the flag reaches the forward: the two steps are different programs
    programs = [str(jax.make_jaxpr(t._step)(t.initial_state(), t.frozen, t.batch(0))) for t in (explicit, fused)]
    assert programs[0] != programs[1]


def test_prefetched_batches_train_exactly_as_batches_collated_in_the_loop(model, random_llava, tmp_path):
    """The next step's batch is collated on a background thread (vlm_jax.prefetch) while the step
    runs, and evaluations collate on the loop's thread meanwhile: same losses, evaluations and
    parameters, bit for bit, as collating each batch when its step comes."""
    runs = {}
    for depth in (0, 1, 2):
        trainer = Trainer(config(random_llava, tmp_path / str(depth), max_steps=4, eval_every=2,
                                 prefetch_batches=depth), model=model)
        assert trainer.prefetch_depth() == depth
        runs[depth] = (trainer.run(), trainer)
    for depth in (1, 2):
        assert runs[depth][0].losses == runs[0][0].losses and runs[depth][0].eval == runs[0][0].eval
        assert bitwise_equal(*(r[1].params(r[1].state) for r in (runs[0], runs[depth])))


def test_prefetch_makes_each_step_once_and_raises_a_bad_batch_at_its_step(model, random_llava, tmp_path):
    data = train_task.examples(8, 0)
    calls = []

    def batch_fn(step):
        calls.append((step, threading.current_thread() is threading.main_thread()))
        if step == 2:
            return data[:3]  # the wrong size: an error at step 3, after steps 1 and 2 ran
        return data

    with pytest.raises(DataError, match="step 2 has 3 examples; batch_size is 8"):
        Trainer(config(random_llava, tmp_path, train_data=None, eval_data=None, batch_fn=batch_fn, max_steps=4,
                       prefetch_batches=1), model=model).run()
    assert [step for step, _ in calls] == [0, 1, 2] or [step for step, _ in calls] == [0, 1, 2, 3]
    assert not any(on_main for _, on_main in calls)  # collated on the prefetch thread
    assert _steps_logged(tmp_path) == [1, 2]
    calls.clear()
    Trainer(config(random_llava, tmp_path / "ok", train_data=None, eval_data=None, batch_fn=lambda s: batch_fn(0),
                   max_steps=3, prefetch_batches=1), model=model).run()
    assert [step for step, _ in calls] == [0, 0, 0]  # three steps, none made past the last
    # None resolves per backend: the CPU step's threads already use every core
    assert Trainer(config(random_llava, tmp_path / "d", max_steps=1), model=model).prefetch_depth() == (
        0 if jax.default_backend() == "cpu" else 1)
    with pytest.raises(ValueError, match=r"TrainConfig.prefetch_batches is how many batches to prepare ahead"):
        Trainer(config(random_llava, tmp_path / "e", prefetch_batches=-1), model=model)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(model, random_llava, tmp_path):
    trainer = Trainer(config(random_llava, tmp_path, learning_rate=1e6, max_grad_norm=None, max_steps=30,
                             checkpoint_every=1, weight_decay=0.0), model=model)
    with pytest.raises(TrainingDivergedError, match=r"(the loss is|the gradient norm is|the parameters overflowed).* "
                                                    r"at step (\d+); training stopped"):
        trainer.run()
    saved = trainer._manager().latest_step()
    assert saved is not None
    state = trainer._restore(trainer._manager())
    assert int(state["step"]) == saved
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["trainable"]))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_step_flags_a_non_finite_parameter_that_the_loss_does_not_see(model, random_llava, tmp_path, bad):
    """A parameter the batch never reads (the embedding row of an absent token) goes non-finite:
    the loss and the gradient norm stay finite, and the step's flag still says so."""
    trainer = Trainer(config(random_llava, tmp_path, max_steps=1), model=model)
    batch = trainer._place(trainer.batch(0))
    state = trainer.initial_state()
    assert bool(trainer._step(state, trainer.frozen, batch)[1]["finite"])
    state = trainer.initial_state()
    name = "language_model/embed_tokens/embedding"
    embed = state["trainable"][name]
    absent = sorted(set(range(embed.shape[0])) - set(np.asarray(batch["input_ids"]).ravel().tolist()))[-1]
    state["trainable"][name] = embed.at[absent, 3].set(bad)
    _, metrics = trainer._step(state, trainer.frozen, batch)
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])


def test_bad_training_inputs(model, random_llava, tmp_path):
    with pytest.raises(UnknownParametersError, match="no parameters match 'vision_towr'.*vision_tower"):
        Trainer(config(random_llava, tmp_path, trainable="vision_towr"), model=model)
    with pytest.raises(UnknownParametersError, match=r"LoRA target\(s\) \['qq_proj'\] do not exist"):
        Trainer(config(random_llava, tmp_path, lora=LoraConfig(targets=("qq_proj",))), model=model)
    Trainer(config(random_llava, tmp_path / "run", max_steps=2, checkpoint_every=1), model=model).run()
    other = vj.Model(vj.init_params(vj.from_hf_config(dict(
        json.load(open(os.path.join(random_llava, "config.json"))), text_config={
            **json.load(open(os.path.join(random_llava, "config.json")))["text_config"], "num_hidden_layers": 3})),
        jax.random.key(0)), vj.from_hf_config({**json.load(open(os.path.join(random_llava, "config.json"))),
                                               "text_config": {**json.load(open(os.path.join(random_llava, "config.json")))[
                                                   "text_config"], "num_hidden_layers": 3}}),
        processor=model.processor)
    with pytest.raises(CheckpointMismatchError, match="belongs to another model"):
        Trainer(config(random_llava, tmp_path / "run", max_steps=4), model=other).run()


def _run_cli(config_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlm_jax.cli", "finetune", config_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_logged(out_dir) -> list[int]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line)["step"] for line in open(path) if line.strip() and "loss" in json.loads(line)]


def _losses(out_dir) -> dict[int, float]:
    out = {}
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # a resumed run re-logs steps after its checkpoint
    return out


def _write_config(tmp_path, name, random_llava, steps, every, extra="{}") -> tuple[str, str]:
    out = str(tmp_path / name)
    path = tmp_path / f"{name}.py"
    path.write_text(train_task.CONFIG_TEMPLATE.format(tests=TESTS, model=random_llava, out=out, steps=steps,
                                                      every=every, extra=extra))
    return str(path), out


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(random_llava, tmp_path):
    path, out = _write_config(tmp_path, "uninterrupted", random_llava, steps=9, every=3)
    assert cli_main(["finetune", path]) == 0
    reference = _losses(out)
    assert sorted(reference) == list(range(1, 10))

    path, out = _write_config(tmp_path, "killed", random_llava, steps=9, every=3)
    proc = _run_cli(path)
    deadline = time.time() + 300
    while max(_steps_logged(out), default=0) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)  # between checkpoints 3 and 6
    proc.wait()
    resumed = _run_cli(path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _losses(out) == reference  # bitwise: same data order, same state, same arithmetic


KILL_DURING_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
original = ocp.CheckpointManager.save
calls = []
def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:  # second checkpoint: die while writing it
        real = ocp.Checkpointer.save
        def dying(self_, directory, *a, **k):
            real(self_, directory, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        ocp.Checkpointer.save = dying
    return original(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
from vlm_jax.cli import main
sys.exit(main(["finetune", sys.argv[1]]))
"""


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(random_llava, tmp_path):
    path, out = _write_config(tmp_path, "reference", random_llava, steps=6, every=2)
    assert cli_main(["finetune", path]) == 0
    reference = _losses(out)
    path, out = _write_config(tmp_path, "dying", random_llava, steps=6, every=2)
    script = tmp_path / "dying_run.py"
    script.write_text(KILL_DURING_SAVE)
    proc = subprocess.run([sys.executable, str(script), path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    resumed = _run_cli(path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _losses(out) == reference


def test_bf16_parameters_with_float32_optimizer_state(random_llava, tmp_path):
    model = vj.load(random_llava, dtype="bfloat16", progress=False)
    trainer = Trainer(config(random_llava, tmp_path, param_dtype="bfloat16", max_steps=8, remat=True), model=model)
    result = trainer.run()
    assert result.losses[8] < result.losses[1]
    assert all(str(v.dtype) == "float32" for v in trainer.state["trainable"].values())  # master copy
    assert all(str(x.dtype) == "float32" for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0)
    assert all(str(v.dtype) == "bfloat16" for v in trainer.frozen.values())


def test_dots_policy_keeps_what_the_attention_backward_needs(model, capsys):
    """Under 'dots' every decoder layer keeps its attention's output and log-sum-exp, so the
    backward pass never runs the attention forward again; 'full' keeps neither. Read from JAX's
    own list of saved residuals, on unrolled layers (a scan's residuals lose their names)."""
    from vlm_jax.models import llava, text_decoder
    from vlm_jax.nn.attention import ATTENTION_RESIDUALS

    params = {**model.params, "language_model": text_decoder.unstack_layers(model.params["language_model"])}
    inputs = {"input_ids": np.full((1, 6), 3, np.int32), "attention_mask": np.ones((1, 6), np.int32)}
    saved = {}
    for remat in ("dots", "full"):
        def loss(params):
            return llava.forward(params, model.config, inputs, remat=remat).logits.sum()

        jax.ad_checkpoint.print_saved_residuals(loss, params)
        saved[remat] = capsys.readouterr().out
    for name in ATTENTION_RESIDUALS:
        assert saved["dots"].count(f"named '{name}'") == model.config.text.num_layers, saved["dots"]
        assert f"named '{name}'" not in saved["full"], saved["full"]


def test_remat_policies_keep_the_gradients_and_trade_memory(model, random_llava, tmp_path):
    """Every rematerialisation policy gives the gradients of none (the training loss on a real
    batch); the compiled gradient's temporary memory falls from 'none' to 'dots' to 'full'. A
    name that is no policy fails when the Trainer is built, naming the choices."""
    from vlm_jax.train import trainer as trainer_module

    trainer = Trainer(config(random_llava, tmp_path), model=model)
    micro = {k: v[0] for k, v in trainer.batch(0).items()}
    trainable = trainer.initial_state()["trainable"]

    def compiled_grad(remat):
        def loss(trainable):
            return trainer_module._loss_sum(trainable, trainer.frozen, micro, config=model.config, dtype=trainer.dtype,
                                            remat=remat, fused=False)[0]
        return jax.jit(jax.grad(loss)).lower(trainable).compile()

    programs = {remat: compiled_grad(remat) for remat in ("none", "dots", "full")}
    grads = {remat: program(trainable) for remat, program in programs.items()}
    for remat in ("dots", "full"):
        for path, (a, b) in zip(P.flatten(grads[remat]), zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["none"]))):
            a, b = np.asarray(a), np.asarray(b)  # recomputation reorders float32 sums: 1e-5 of the leaf's scale
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max() + 1e-9, err_msg=f"{remat} {path}")
    temp = {remat: program.memory_analysis().temp_size_in_bytes for remat, program in programs.items()}
    assert temp["none"] > temp["dots"] > temp["full"], temp
    with pytest.raises(vj.SettingError, match=r"remat='dot' is not a rematerialisation policy: use one of 'none', 'full', 'dots'"):
        Trainer(config(random_llava, tmp_path, remat="dot"), model=model)
