"""One trainer for full finetuning, one component, LoRA adapters or a soft prompt.

    config = TrainConfig(model="checkpoints/toy", train_data=examples, trainable="projector")
    result = Trainer(config).run()

* Parameters: the frozen part stays in the load dtype (bf16 by default) and is never
  written; the trainable part is a float32 master copy with float32 AdamW state, cast to the
  compute dtype for each forward pass. Frozen parameters carry no optimizer state.
* Step: loss on the answer tokens only (data.Collator), gradient accumulation over
  `grad_accum` micro-batches inside the compiled step, global-norm clipping, AdamW with linear
  warmup and cosine decay, rematerialised layers (remat: 'full' by default, 'dots' or none),
  donated state buffers.
* Checkpoints: orbax, every `checkpoint_every` steps and at the end, keeping the last
  `keep_checkpoints`; written atomically (a kill mid-write leaves the previous one usable).
  `resume=True` continues from the latest: data order and losses are those of an
  uninterrupted run.
* Input: the next step's batch is collated on a background thread while the step runs
  (`prefetch_batches`; by default on accelerators only), with the same batches in the same order.
* Logs: metrics.jsonl (one JSON object per line: step, loss, grad_norm, lr, tokens,
  tokens_per_s; eval lines with eval_loss, eval_accuracy), a progress bar with loss and
  tokens/s. A NaN or infinite loss, gradient or parameter stops the run with
  TrainingDivergedError, before anything is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.errors import CheckpointMismatchError, VlmJaxError
from vlm_jax.models import llava
from vlm_jax.models.layers import remat_policy
from vlm_jax.multihost import is_writer, to_host
from vlm_jax.nn.attention import resolve_fused
from vlm_jax.prefetch import Prefetcher, check_depth
from vlm_jax.train import subsets
from vlm_jax.train.data import Collator, DataError, batch_indices
from vlm_jax.train.lora import LoraConfig, add_lora, merge_lora


class TrainingDivergedError(VlmJaxError, FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    model: str  # hub id, transformers folder or vlm_jax checkpoint
    train_data: Any  # a sequence of examples (see data.py), or a callable returning one
    # optional: batch_fn(step) -> the examples of that step (deterministic in step), instead of
    # seeded epochs over train_data; e.g. to keep every batch's image count equal
    batch_fn: Callable[[int], Sequence[dict]] | None = None
    eval_data: Any = None
    output_dir: str = "checkpoints/finetune"
    trainable: str | tuple = "all"  # all | vision_tower | projector | text_decoder | dotted prefixes
    lora: LoraConfig | None = None  # set: train LoRA adapters only
    soft_prompt_tokens: int = 0  # > 0: train that many prefix embeddings only
    param_dtype: str = "bfloat16"
    learning_rate: float = 1e-5
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    batch_size: int = 8  # examples per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    max_grad_norm: float | None = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end (when eval_data is given)
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # what each layer keeps for the backward pass: True/'full' (its input only; least memory),
    # 'dots' (its weight products' and attention's outputs), False/'none' (everything) - layers.remat_policy
    remat: bool | str = True
    # None: the fused attention kernel (jax.nn.dot_product_attention; on GPU its forward is cuDNN's
    # and its gradient XLA's, see nn.attention.fused_forward_kernel) on accelerators, the explicit
    # path on CPU; True/False to choose
    fused_attention: bool | None = None
    token_bucket: int = 64
    # batches collated ahead on a background thread while the device runs the current step
    # (vlm_jax.prefetch; batch_fn then runs on that thread); 0: each batch when its step comes.
    # None: 1 on accelerators, whose host waits during a step; 0 on CPU, where the step's threads
    # already use every core (benchmarks/input_pipeline.py: level there; the toy model's loop
    # 1.21-1.25x faster with a host core free)
    prefetch_batches: int | None = None
    mesh: str | None = None  # e.g. "fsdp=4,tensor=2": load and train sharded (vlm_jax.sharding)
    append_eos: bool = True
    export_dir: str | None = None  # a transformers folder written at the end (LoRA merged)
    resume: bool = True
    save_checkpoints: bool = True  # False: keep everything in memory (short experiment runs)
    progress: bool = True
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int
    losses: dict[int, float]
    eval: dict[int, dict]
    checkpoint_dir: str
    export_dir: str | None


def _resolve(data):
    return data() if callable(data) else data


def _loss_sum(trainable, frozen, mb, *, config, dtype, remat, fused):
    """Summed NLL of the answer tokens of a micro-batch, and counts."""
    params = subsets.merge(trainable, frozen, dtype)
    prefix = params.pop("soft_prompt")["embedding"] if "soft_prompt" in params else None
    inputs = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in mb}
    out = llava.forward(params, config, inputs, logit_positions=mb["target_positions"] - 1, prefix=prefix,
                        remat=remat, fused_attention=fused)
    with jax.named_scope("loss"):
        logits = out.logits.astype(jnp.float32)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), mb["target_ids"][..., None], axis=-1)[..., 0]
        valid = mb["target_valid"]
        nll = -jnp.sum(jnp.where(valid, picked, 0.0))
        right = (jnp.argmax(logits, axis=-1) == mb["target_ids"]) | ~valid
    stats = {"count": jnp.sum(valid).astype(jnp.float32), "tokens": jnp.sum(mb["attention_mask"]).astype(jnp.float32),
             "exact": jnp.sum(jnp.all(right, axis=-1)).astype(jnp.float32),
             "rows": jnp.float32(valid.shape[0])}
    return nll, stats


def _train_step(state, frozen, batch, *, optimizer, config, dtype, remat, fused):
    """One optimizer step over batch leaves [accum, micro, ...]."""
    grad_fn = jax.value_and_grad(functools.partial(_loss_sum, config=config, dtype=dtype, remat=remat, fused=fused),
                                 has_aux=True)

    def micro(acc, mb):
        (nll, stats), grads = grad_fn(state["trainable"], frozen, mb)
        return jax.tree.map(jnp.add, acc, (grads, nll, stats)), None

    zero = (jax.tree.map(jnp.zeros_like, state["trainable"]), jnp.float32(0.0),
            {"count": jnp.float32(0.0), "tokens": jnp.float32(0.0), "exact": jnp.float32(0.0), "rows": jnp.float32(0.0)})
    (grads, nll, stats), _ = jax.lax.scan(micro, zero, batch)
    count = jnp.maximum(stats["count"], 1.0)
    with jax.named_scope("optimizer"):
        # The norm of the summed gradients, divided once (norm(g / c) = norm(g) / c): the division
        # then fuses into the optimizer's update instead of being written out for the norm to read
        # (the update of the 62M CPU model's parameters measured 157 -> 116 ms).
        grad_norm = optax.tree.norm(grads) / count
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        loss = nll / count
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in jax.tree.leaves(trainable):  # an update can overflow even from a finite loss
            # A NaN or inf parameter makes the sum of |p| non-finite (so does a sum past float32's
            # range, mean |p| > 1e31 for the largest leaf: a diverged model too). On CPU this float
            # reduction costs half of jnp.all(jnp.isfinite(leaf)), which XLA lowers to slow boolean
            # reduce-windows (full step of the 62M CPU model: ~20 ms less; benchmarks/RESULTS.md).
            # Not max |p|: XLA CPU's (YNNPACK's) max reduction drops NaNs.
            finite = finite & jnp.isfinite(jnp.sum(jnp.abs(leaf), dtype=jnp.float32))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": stats["tokens"], "finite": finite}


def _eval_step(trainable, frozen, mb, *, config, dtype, fused):
    return _loss_sum(trainable, frozen, mb, config=config, dtype=dtype, remat=False, fused=fused)


class Trainer:
    def __init__(self, config: TrainConfig, model=None):
        import vlm_jax as vj

        self.config = config
        if config.batch_size % config.grad_accum:
            raise DataError(f"batch_size {config.batch_size} is not a multiple of grad_accum {config.grad_accum}")
        remat_policy(config.remat)  # an unknown policy fails here, before any loading or compiling
        if model is None:
            from vlm_jax.sharding import parse_mesh

            sharding = parse_mesh(config.mesh) if config.mesh else None
            model = vj.load(config.model, dtype=config.param_dtype, progress=False, sharding=sharding)
        self.model = model
        self.dtype = self.model.dtype
        params = self.model.params
        if config.lora is not None:
            params, paths = add_lora(params, config.lora)
        elif config.soft_prompt_tokens > 0:
            params, paths = dict(params), [("soft_prompt", "embedding")]
            embed = params["language_model"]["embed_tokens"]["embedding"]
            ids = jax.random.randint(jax.random.key(config.seed), (config.soft_prompt_tokens,), 0, embed.shape[0])
            params["soft_prompt"] = {"embedding": jnp.take(embed, ids, axis=0)}  # start from real token embeddings
        else:
            paths = subsets.select(params, config.trainable)
        self.trainable_paths = paths
        trainable, self.frozen = subsets.split(params, paths)
        self.plan = self.model.sharding
        if self.plan is not None:  # new leaves (LoRA factors, soft prompt) join the mesh too
            trainable = self.plan.shard_params(trainable, self.model.config)
            self.frozen = self.plan.shard_params(self.frozen, self.model.config)
        self.initial_trainable = trainable
        self.train_data = _resolve(config.train_data) if config.batch_fn is None else None
        self.eval_data = _resolve(config.eval_data) if config.eval_data is not None else None
        if config.batch_fn is not None:
            if not config.max_steps:
                raise DataError("with batch_fn, set max_steps (there are no epochs to count)")
            self.total_steps = config.max_steps
        else:
            n = len(self.train_data)
            per_epoch = n // config.batch_size
            if per_epoch == 0:
                raise DataError(f"{n} training examples cannot fill one batch of {config.batch_size}")
            self.total_steps = config.max_steps or max(1, int(math.floor(config.epochs * per_epoch)))
        warmup = int(round(config.warmup_ratio * self.total_steps))
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(self.total_steps, warmup + 1),
                                                      end_value=0.0)
        self.schedule = schedule
        decay_mask = jax.tree.map(lambda x: x.ndim >= 2, trainable)
        chain = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
        chain.append(optax.adamw(schedule, b1=config.betas[0], b2=config.betas[1], weight_decay=config.weight_decay,
                                 mask=decay_mask))
        self.optimizer = optax.chain(*chain)
        self.collate = Collator(self.model, config.token_bucket, config.append_eos)
        # the prefetch thread and evaluate() both collate: one at a time through the processor
        self._collate_lock = threading.Lock()
        self.state_shardings = self._state_shardings(trainable) if self.plan is not None else None
        # Sharded: the state keeps the same shards step after step (one compilation, and the
        # donated buffers are reused in place).
        pinned = {} if self.plan is None else {"out_shardings": (self.state_shardings, self.plan.replicated)}
        fused = resolve_fused(config.fused_attention)
        self._step = jax.jit(functools.partial(_train_step, optimizer=self.optimizer, config=self.model.config,
                                               dtype=self.dtype, remat=config.remat, fused=fused),
                             donate_argnums=0, **pinned)
        self._eval = jax.jit(functools.partial(_eval_step, config=self.model.config, dtype=self.dtype, fused=fused))
        self.checkpoint_dir = os.path.abspath(os.path.join(config.output_dir, "checkpoints"))
        self.prefetch_depth()  # a bad prefetch_batches fails here, before a run

    # -- state ---------------------------------------------------------------------------------
    def initial_state(self) -> dict:
        """A fresh state (its own buffers: the step donates them)."""
        trainable = jax.tree.map(jnp.copy, self.initial_trainable)
        if self.plan is None:
            return {"step": jnp.int32(0), "trainable": trainable, "opt_state": self.optimizer.init(trainable)}
        shardings = self.state_shardings
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings["opt_state"])(trainable)
        return {"step": jax.device_put(jnp.int32(0), shardings["step"]), "trainable": trainable,
                "opt_state": opt_state}

    def _state_shardings(self, trainable: dict) -> dict:
        """Shardings of the training state: optimizer moments sit with their parameter."""
        by_key = {k: v.sharding for k, v in trainable.items()}
        replicated = self.plan.replicated

        def moment(path, leaf):
            for entry in reversed(path):
                key = getattr(entry, "key", None)
                if isinstance(key, str) and key in trainable and trainable[key].shape == leaf.shape:
                    return by_key[key]
            return replicated

        opt_abstract = jax.eval_shape(self.optimizer.init, trainable)
        return {"step": replicated, "trainable": by_key,
                "opt_state": jax.tree_util.tree_map_with_path(moment, opt_abstract)}

    def signature(self) -> dict:
        """What a checkpoint must match to be resumed by this trainer."""
        return {
            "config": json.loads(json.dumps(dataclasses.asdict(self.model.config), default=str)),
            "trainable": {k: list(v.shape) for k, v in self.initial_trainable.items()},
        }

    def params(self, state: dict) -> dict:
        """The full parameter tree of a state (LoRA kept separate; see merged_params)."""
        return subsets.merge(state["trainable"], self.frozen, self.dtype)

    def merged_params(self, state: dict) -> dict:
        params = self.params(state)
        params.pop("soft_prompt", None)
        return merge_lora(params)

    # -- checkpoints ---------------------------------------------------------------------------
    def _manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=False)
        return ocp.CheckpointManager(self.checkpoint_dir, options=options)

    def _save(self, manager, state) -> None:
        import orbax.checkpoint as ocp

        step = int(state["step"])
        meta = {"step": step, "signature": self.signature(), "total_steps": self.total_steps}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)
        manager.wait_until_finished()

    def _restore(self, manager):
        import orbax.checkpoint as ocp

        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta["signature"] != self.signature():
            raise CheckpointMismatchError(
                f"the checkpoint at {self.checkpoint_dir} (step {step}) belongs to another model or parameter "
                "subset than this run (its config or trainable shapes differ). Fix: use another output_dir, "
                "or set resume=False to start over there.")
        # restore every leaf straight into the shards a fresh state would have
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.initial_state())
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract)))
        return restored["state"]

    # -- data ----------------------------------------------------------------------------------
    def batch(self, step: int) -> dict:
        """Arrays [grad_accum, micro, ...] for global step `step`."""
        cfg = self.config
        if cfg.batch_fn is not None:
            examples = list(cfg.batch_fn(step))
        else:
            examples = [self.train_data[int(i)] for i in batch_indices(len(self.train_data), step, cfg.batch_size,
                                                                       cfg.seed)]
        if len(examples) != cfg.batch_size:
            raise DataError(f"step {step} has {len(examples)} examples; batch_size is {cfg.batch_size}")
        micro = cfg.batch_size // cfg.grad_accum
        with self._collate_lock:
            parts = [self.collate(examples[k * micro:(k + 1) * micro]) for k in range(cfg.grad_accum)]
        width = max(p["input_ids"].shape[1] for p in parts)
        answers = max(p["target_positions"].shape[1] for p in parts)
        parts = [_pad_micro(p, width, answers, self.model.config.text.pad_token_id or 0) for p in parts]
        if len({p.get("pixel_values", np.empty(0)).shape for p in parts}) > 1:
            raise DataError("with grad_accum > 1 every micro-batch must hold the same number of images")
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def _place(self, batch: dict) -> dict:
        """Step arrays [accum, micro, ...]: the micro-batch axis is split over data x fsdp."""
        return batch if self.plan is None else self.plan.place_batch(batch, batch_axis=1)

    def evaluate(self, state: dict) -> dict:
        """Held-out loss and exact-match accuracy (every answer token is the model's top token)."""
        data = self.eval_data
        totals = {"nll": 0.0, "count": 0.0, "exact": 0.0, "rows": 0.0}
        size = self.config.eval_batch_size
        for start in range(0, len(data), size):
            with self._collate_lock:
                mb = self.collate([data[i] for i in range(start, min(start + size, len(data)))])
            with self.model.mesh_context():
                nll, stats = self._eval(state["trainable"], self.frozen, self.model.place(mb))
            totals["nll"] += float(nll)
            for key in ("count", "exact", "rows"):
                totals[key] += float(stats[key])
        return {"eval_loss": totals["nll"] / max(totals["count"], 1.0),
                "eval_accuracy": totals["exact"] / max(totals["rows"], 1.0)}

    # -- the loop ------------------------------------------------------------------------------
    def prefetch_depth(self) -> int:
        """How many batches run() collates ahead (TrainConfig.prefetch_batches, None resolved)."""
        depth = self.config.prefetch_batches
        if depth is None:
            return 0 if jax.default_backend() == "cpu" else 1
        return check_depth(depth, "TrainConfig.prefetch_batches")

    def run(self) -> TrainResult:
        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        manager = self._manager() if cfg.save_checkpoints else None
        state = self._restore(manager) if (cfg.resume and manager is not None) else None
        if state is None:
            state = self.initial_state()
        start = int(state["step"])
        log_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        losses: dict[int, float] = {}
        evals: dict[int, dict] = {}
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start, desc="finetuning", unit="step")
        last_saved = start if (manager is not None and manager.latest_step() is not None) else None
        # several hosts: process 0 logs. The next step's batch is collated while this one runs.
        with (open(log_path if is_writer() else os.devnull, "a") as log,
              Prefetcher(self.batch, range(start, self.total_steps), self.prefetch_depth()) as batches):
            for step, batch in batches:
                began = time.perf_counter()
                with self.model.mesh_context():
                    state, metrics = self._step(state, self.frozen, self._place(batch))
                loss = float(metrics["loss"])  # waits for the step
                seconds = time.perf_counter() - began
                if not bool(metrics["finite"]):
                    where = f"step {last_saved} in {self.checkpoint_dir}" if last_saved is not None else "none saved yet"
                    what = (f"the loss is {loss}" if not math.isfinite(loss) else
                            f"the gradient norm is {float(metrics['grad_norm'])}" if not math.isfinite(
                                float(metrics["grad_norm"])) else "the parameters overflowed")
                    raise TrainingDivergedError(
                        f"{what} at step {step + 1}; training stopped without saving. The last good "
                        f"checkpoint: {where}. Fix: lower the learning rate, keep gradient clipping on "
                        "(max_grad_norm), or check the data for empty answers / broken images.")
                losses[step + 1] = loss
                record = {"step": step + 1, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                          "lr": float(self.schedule(step)), "tokens": int(metrics["tokens"]),
                          "tokens_per_s": float(metrics["tokens"]) / seconds, "seconds": seconds}
                if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                done = step + 1 == self.total_steps
                if self.eval_data is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                    evals[step + 1] = self.evaluate(state)
                    log.write(json.dumps({"step": step + 1, **evals[step + 1]}) + "\n")
                    log.flush()
                if cfg.save_checkpoints and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done):
                    self._save(manager, state)
                    last_saved = step + 1
        if bar is not None:
            bar.close()
        self.state = state
        export = self.export(cfg.export_dir, state) if cfg.export_dir else None
        return TrainResult(self.total_steps, losses, evals, self.checkpoint_dir, export)

    def export(self, out_dir: str, state: dict | None = None, force: bool = True) -> str:
        """Writes the trained model as a transformers folder (LoRA merged; a soft prompt is
        saved beside it as soft_prompt.npy, since transformers has no place for it)."""
        from vlm_jax.model import Model

        state = state or self.state
        params = self.merged_params(state)
        model = Model(params, self.model.config, processor=self.model.processor, hf_config=self.model.hf_config,
                      layout=self.model.layout, source=self.model.source)
        path = model.export_hf(out_dir, force=force)
        soft_prompt = self.params(state).get("soft_prompt")
        if soft_prompt is not None:
            embedding = to_host(soft_prompt["embedding"]).astype(np.float32)  # every process: may be a gather
            if is_writer():  # several hosts: only process 0 wrote the folder
                np.save(os.path.join(path, "soft_prompt.npy"), embedding)
        return path


def _pad_micro(part: dict, width: int, answers: int, pad_id: int) -> dict:
    """Left-pads a collated micro-batch to `width` tokens and `answers` answer slots."""
    extra = width - part["input_ids"].shape[1]
    out = dict(part)
    if extra:
        out["input_ids"] = np.pad(part["input_ids"], ((0, 0), (extra, 0)), constant_values=pad_id)
        out["attention_mask"] = np.pad(part["attention_mask"], ((0, 0), (extra, 0)))
        out["target_positions"] = part["target_positions"] + extra
    more = answers - part["target_positions"].shape[1]
    if more:
        last = out["target_positions"][:, -1:]
        out["target_positions"] = np.concatenate([out["target_positions"], np.repeat(last, more, axis=1)], axis=1)
        out["target_ids"] = np.concatenate([part["target_ids"], np.repeat(part["target_ids"][:, -1:], more, 1)], 1)
        out["target_valid"] = np.pad(part["target_valid"], ((0, 0), (0, more)))
    return out


def load_config(path: str) -> TrainConfig:
    """A TrainConfig from a Python file defining `config()` (or a module-level CONFIG)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vlm_jax_user_config", path)
    if spec is None or spec.loader is None:
        raise VlmJaxError(f"cannot read {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "config"):
        cfg = module.config()
    elif hasattr(module, "CONFIG"):
        cfg = module.CONFIG
    else:
        raise VlmJaxError(f"{path} must define config() returning a vlm_jax.train.TrainConfig (or CONFIG)")
    if not isinstance(cfg, TrainConfig):
        raise VlmJaxError(f"{path}: config() returned {type(cfg).__name__}, not a vlm_jax.train.TrainConfig")
    return cfg


__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDivergedError", "load_config", "LoraConfig"]
