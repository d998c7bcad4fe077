"""The training run: mesh, sharded state, input pipeline, loop, eval, checkpoints.

`TrainConfig` is a plain frozen dataclass; gin files build it (`gin/runs/*.gin`) and
`ul2 train` hands it to `train`. The state is never built on one device and then
resharded: its shardings are derived from `jax.eval_shape` of the initialiser and
the logical axis rules, and the initialiser is jitted with those out-shardings.

Exact resume: the checkpoint holds params, optimiser state and the number of
batches the input pipeline has produced; the pipeline is deterministic given the
seed, so `dataset.skip(n)` puts it back in place, and the dropout key of step s is
`fold_in(key(seed), s)`. A run interrupted and resumed makes the same updates as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ul2 import checkpoint as checkpoint_lib
from ul2 import compiler
from ul2 import distributed
from ul2 import metrics as metrics_lib
from ul2 import model as model_lib
from ul2 import optimizers
from ul2 import sharding
from ul2 import trainer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs. The gin macro each field is bound to in
  `gin/runs/*.gin` is given in brackets.

  Attributes:
    model_dir: where checkpoints, metrics and the operative config go [MODEL_DIR].
    mixture_or_task_name: a registered seqio task or mixture [MIXTURE_OR_TASK_NAME].
    task_feature_lengths: {"inputs": ..., "targets": ...} [TASK_FEATURE_LENGTHS].
    train_steps: total optimiser steps of the run, counted from 0 [TRAIN_STEPS].
    batch_size: global batch size, in (packed) sequences [BATCH_SIZE].
    random_seed: seeds parameters, data order, denoising and dropout [RANDOM_SEED].
    checkpoint_period: save every this many steps (and at the end)
      [CHECKPOINT_PERIOD].
    eval_period: evaluate every this many steps; 0 = never [EVAL_PERIOD].
    log_period: log metrics every this many steps [LOG_PERIOD].
    data_shards: how many shards the input pipeline is split into (each process
      reads a contiguous block of them; see `ul2.distributed`). None: one per
      process, or, when resuming, what the checkpoint was written with. The global
      batch depends on this number and not on the number of processes.
  """
  model_dir: str
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  train_steps: int
  batch_size: int
  model: model_lib.ModelConfig
  optimizer: optimizers.OptimizerConfig = optimizers.OptimizerConfig()
  mesh: sharding.MeshConfig = sharding.MeshConfig()
  loss: trainer.LossConfig = trainer.LossConfig()
  random_seed: int = 0
  checkpoint_period: int = 1000
  keep_checkpoints: int | None = 3
  async_checkpointing: bool = True
  eval_period: int = 0
  eval_steps: int = 20
  eval_split: str = "validation"
  log_period: int = 100
  num_microbatches: int = 1
  pack: bool = True
  peak_flops_per_device: float | None = None
  data_shards: int | None = None

  def __post_init__(self):
    if not isinstance(self.model_dir, str) or not self.model_dir:
      raise ValueError("model_dir is required: pass --model_dir=DIR "
                       "(or --gin.MODEL_DIR=\"'DIR'\")")
    for name in ("train_steps", "batch_size", "checkpoint_period", "log_period",
                 "num_microbatches", "eval_steps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.data_shards is not None and (
        self.data_shards <= 0 or self.batch_size % self.data_shards):
      raise ValueError(f"data_shards={self.data_shards} must be positive and divide "
                       f"the batch size {self.batch_size}")
    if set(self.task_feature_lengths) != {"inputs", "targets"}:
      raise ValueError("task_feature_lengths must have exactly the keys 'inputs' and "
                       f"'targets', got {dict(self.task_feature_lengths)}")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` derives from a config: the mesh, shardings and jitted functions."""
  mesh: jax.sharding.Mesh
  model: nn.Module
  state_shardings: trainer.TrainState
  abstract_state: trainer.TrainState
  init: Any            # rng -> TrainState (jitted, sharded)
  train_step: Any      # (state, batch, rng) -> (state, metrics) (jitted, donates state)
  eval_step: Any       # (params, batch) -> sums (jitted)
  batch_sharding: NamedSharding


def dummy_batch(batch: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
  enc = jnp.ones((batch, lengths["inputs"]), jnp.int32)
  dec = jnp.ones((batch, lengths["targets"]), jnp.int32)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
          "encoder_segment_ids": enc, "decoder_segment_ids": dec,
          "encoder_positions": enc, "decoder_positions": dec}


def build(config: TrainConfig, num_denoisers: int,
          mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Mesh, sharded abstract state and the jitted init / train / eval functions."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  sharding.check_batch_size(config.batch_size, mesh, config.num_microbatches)
  model = model_lib.Transformer(config.model)
  optimizer = optimizers.make_optimizer(config.optimizer)
  schedule = optimizers.make_schedule(config.optimizer)
  # Initialise on a (data-parallel size, 1)-token batch: the parameter shapes do
  # not depend on the lengths, and the batch must split over the data axes.
  init_batch = dummy_batch(sharding.data_parallel_size(mesh), {"inputs": 1, "targets": 1})

  def init_boxed_params(rng):
    return model.init({"params": rng, "dropout": rng}, **init_batch)["params"]

  def init_state(rng):
    params = nn.meta.unbox(init_boxed_params(rng))
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params))

  rules = list(sharding.LOGICAL_AXIS_RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed_params, jax.random.key(0))
    param_shardings = sharding.logical_to_mesh(nn.get_partition_spec(abstract_boxed), mesh)
    abstract_state = jax.eval_shape(init_state, jax.random.key(0))
  replicated = NamedSharding(mesh, P())
  state_shardings = trainer.TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=sharding.optimizer_state_shardings(
          abstract_state.opt_state, abstract_state.params, param_shardings, mesh))
  data_sharding = sharding.batch_sharding(mesh)

  step_fn = functools.partial(
      trainer.train_step, apply_fn=model.apply, optimizer=optimizer, schedule=schedule,
      loss=config.loss, num_denoisers=num_denoisers,
      num_microbatches=config.num_microbatches)
  eval_fn = functools.partial(trainer.eval_step, apply_fn=model.apply, loss=config.loss,
                              num_denoisers=num_denoisers)
  options = compiler.compiler_options(mesh.devices.flat[0].platform)
  return Setup(
      mesh=mesh,
      model=model,
      state_shardings=state_shardings,
      abstract_state=abstract_state,
      init=jax.jit(init_state, out_shardings=state_shardings),
      train_step=jax.jit(step_fn,
                         in_shardings=(state_shardings, data_sharding, replicated),
                         out_shardings=(state_shardings, replicated),
                         donate_argnums=0, compiler_options=options),
      eval_step=jax.jit(eval_fn, in_shardings=(state_shardings.params, data_sharding),
                        out_shardings=replicated, compiler_options=options),
      batch_sharding=data_sharding,
  )


def global_batch(local: Mapping[str, np.ndarray], batch_sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays split over the data axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local.items()}


def prepare_model_dir(model_dir: str) -> pathlib.Path:
  path = pathlib.Path(model_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: several processes may share the directory.
    probe = path / f".write_test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"model_dir {model_dir!r} is not writable: {e.strerror}") from e
  return path


class _Data:
  """The input pipeline of one process: its block of data shards, as numpy batches."""

  def __init__(self, config: TrainConfig, split: str, shuffle: bool,
               num_shards: int | None = None):
    from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
    self._data = data
    self._config = config
    self._split = split
    self._shuffle = shuffle
    self.num_shards = num_shards or config.data_shards or jax.process_count()
    if config.batch_size % self.num_shards:
      raise ValueError(f"batch size {config.batch_size} is not divisible by the "
                       f"{self.num_shards} data shards")

  def batches(self, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
    c = self._config
    shard_ids = distributed.process_data_shards(self.num_shards, jax.process_index(),
                                                jax.process_count())
    iterators = []
    for shard_id in shard_ids:
      ds = self._data.get_dataset(
          c.mixture_or_task_name, dict(c.task_feature_lengths), split=self._split,
          batch_size=c.batch_size // self.num_shards, shuffle=self._shuffle,
          seed=c.random_seed, pack=c.pack, shard_id=shard_id,
          num_shards=self.num_shards, repeat=True)
      if skip:
        ds = ds.skip(skip)
      iterators.append(self._data.as_numpy(ds))
    if len(iterators) == 1:
      return iterators[0]
    return ({k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            for parts in zip(*iterators))


def unigram_log_probs(config: TrainConfig) -> np.ndarray:
  """log p of each token id under a unigram model of the training targets (see
  `ul2.data.unigram_log_probs`): the baseline of `evaluate`."""
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return data.unigram_log_probs(config.mixture_or_task_name, dict(config.task_feature_lengths),
                                seed=config.random_seed)


def evaluate(setup: Setup, params: Any, config: TrainConfig, denoiser_names: list[str],
             unigram: np.ndarray | None = None) -> dict[str, float]:
  """Mean eval metrics over `eval_steps` batches of the eval split (from its start).

  With `unigram` (from `unigram_log_probs`), also `eval/unigram_cross_entropy`: the
  cross-entropy of a unigram model on the same target tokens.
  """
  batches = _Data(config, config.eval_split, shuffle=False).batches()
  total = None
  baseline = np.zeros(2)  # -sum(log p), target tokens: over this process's rows.
  for _ in range(config.eval_steps):
    local = next(batches)
    if unigram is not None:
      weights = local["decoder_loss_weights"]
      baseline += (-(unigram[local["decoder_target_tokens"]] * weights).sum(), weights.sum())
    sums = setup.eval_step(params, global_batch(local, setup.batch_sharding))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  out = metrics_lib.summarize(jax.device_get(total), denoiser_names, prefix="eval/")
  if unigram is not None:
    if jax.process_count() > 1:
      baseline = multihost_utils.process_allgather(baseline).sum(axis=0)
    out["eval/unigram_cross_entropy"] = float(baseline[0] / max(baseline[1], 1.0))
  return out


def eval_line(step: int, metrics: Mapping[str, float]) -> str:
  """The console line of an eval: loss, and the unigram baseline when there is one."""
  line = f"eval step {step}: loss {metrics['eval/loss']:.3f}"
  if "eval/unigram_cross_entropy" in metrics:
    unigram, cross_entropy = metrics["eval/unigram_cross_entropy"], metrics["eval/cross_entropy"]
    line += (f" | cross-entropy {cross_entropy:.3f}, a unigram model of the targets "
             f"{unigram:.3f} ({unigram - cross_entropy:.3f} nats better)")
  return line


def _meta(config: TrainConfig, step: int, data_shards: int | None = None
          ) -> dict[str, Any]:
  return {"batches_consumed": int(step), "mixture_or_task_name": config.mixture_or_task_name,
          "random_seed": config.random_seed, "batch_size": config.batch_size,
          "process_count": jax.process_count(),
          "data_shards": data_shards or config.data_shards or jax.process_count()}


def restore_or_init(setup: Setup, ckpt: checkpoint_lib.Checkpointer,
                    config: TrainConfig, step: int | None = None
                    ) -> tuple[trainer.TrainState, dict[str, Any]]:
  step = ckpt.latest_step() if step is None else step
  if step is None:
    return setup.init(jax.random.key(config.random_seed)), {"batches_consumed": 0}
  abstract = checkpoint_lib.abstract_with_shardings(setup.abstract_state,
                                                    setup.state_shardings)
  params, opt_state, meta = ckpt.restore(step, abstract.params, abstract.opt_state)
  state = trainer.TrainState(step=jax.device_put(jnp.int32(step),
                                                 setup.state_shardings.step),
                             params=params, opt_state=opt_state)
  for key in ("mixture_or_task_name", "random_seed", "batch_size"):
    if meta.get(key) != _meta(config, step)[key]:
      metrics_lib.log(f"warning: resuming step {step} with {key}={_meta(config, step)[key]!r}"
                      f" (checkpoint has {meta.get(key)!r}): the data order differs from "
                      "an uninterrupted run")
  saved_shards = meta.get("data_shards", meta.get("process_count"))
  if config.data_shards and saved_shards and config.data_shards != saved_shards:
    metrics_lib.log(f"warning: resuming step {step} with data_shards={config.data_shards} "
                    f"(checkpoint has {saved_shards}): the data order differs from an "
                    "uninterrupted run")
  return state, meta


class Diverged(RuntimeError):
  """The loss or the gradient norm stopped being finite; the run stops without saving."""


def _finite(out: Mapping[str, Any]) -> jax.Array:
  """Whether a train step's loss and gradient norm are finite (on device)."""
  return jnp.isfinite(out["sums"]["loss"]) & jnp.isfinite(out["grad_norm"])


def train(config: TrainConfig, denoiser_names: list[str],
          mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """Runs (or resumes) training to `config.train_steps`; returns the last metrics."""
  model_dir = prepare_model_dir(config.model_dir)
  setup = build(config, max(len(denoiser_names), 1), mesh)
  is_chief = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(model_dir, enabled=is_chief)
  ckpt = checkpoint_lib.Checkpointer(model_dir, keep=config.keep_checkpoints,
                                     async_save=config.async_checkpointing)
  lengths = config.task_feature_lengths
  tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
  flops_per_step = (model_lib.flops_per_token(config.model, lengths["inputs"],
                                              lengths["targets"])
                    * config.batch_size * lengths["targets"])
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, config.peak_flops_per_device)
  last: dict[str, float] = {}
  finite = True  # Every step so far was finite: kept on device, read when logging or
  # saving, so a diverged state is never saved.
  try:
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
      state, meta = restore_or_init(setup, ckpt, config)
      step = int(state.step)
      if step >= config.train_steps:
        metrics_lib.log(f"step {step} >= train_steps {config.train_steps}: nothing to do")
        return last
      if step:
        metrics_lib.log(f"resumed from step {step} in {ckpt.directory}")
      # Resuming keeps the checkpoint's data sharding unless the config sets one,
      # so the data order is the same on any number of processes.
      data = _Data(config, "train", shuffle=True,
                   num_shards=config.data_shards or meta.get("data_shards"))
      batches = data.batches(skip=int(meta["batches_consumed"]))
      dropout_key = jax.random.key(config.random_seed + 1)
      sums, steps_in_period = None, 0
      unigram = None  # The eval's baseline, made at the first eval.
      stopwatch = metrics_lib.Stopwatch()
      while step < config.train_steps:
        batch = global_batch(next(batches), setup.batch_sharding)
        state, out = setup.train_step(state, batch, dropout_key)
        step += 1
        steps_in_period += 1
        finite = _finite(out) & finite
        sums = out["sums"] if sums is None else jax.tree.map(jnp.add, sums, out["sums"])
        log_now = step % config.log_period == 0 or step == config.train_steps
        save_now = step % config.checkpoint_period == 0 or step == config.train_steps
        if (log_now or save_now) and not bool(jax.device_get(finite)):
          good = ckpt.latest_step()
          raise Diverged(
              f"the loss or the gradient norm is not finite by step {step} (loss "
              f"{float(jax.device_get(out['sums']['loss'])):g}, grad norm "
              f"{float(jax.device_get(out['grad_norm'])):g}); stopped without saving. "
              + (f"The last good checkpoint is step {good} in {ckpt.directory}." if good
                 is not None else "No checkpoint was written."))
        if log_now:
          host = jax.device_get({"sums": sums, "grad_norm": out["grad_norm"],
                                 "learning_rate": out["learning_rate"]})
          seconds = stopwatch.lap() / steps_in_period
          last = metrics_lib.summarize(host["sums"], denoiser_names)
          last.update(tokens_per_second=tokens_per_step / seconds,
                      steps_per_second=1.0 / seconds,
                      learning_rate=float(host["learning_rate"]),
                      grad_norm=float(host["grad_norm"]),
                      eta_seconds=seconds * (config.train_steps - step))
          if peak:
            last["mfu"] = flops_per_step / seconds / (peak * jax.device_count())
          writer.write(step, last)
          if is_chief:
            metrics_lib.log(metrics_lib.console_line(step, config.train_steps, last,
                                                     denoiser_names))
          sums, steps_in_period = None, 0
        if save_now:
          ckpt.save(step, state.params, state.opt_state,
                    _meta(config, step, data.num_shards))
        if config.eval_period and (step % config.eval_period == 0
                                   or step == config.train_steps):
          if unigram is None:
            unigram = unigram_log_probs(config)
          eval_metrics = evaluate(setup, state.params, config, denoiser_names, unigram)
          writer.write(step, eval_metrics, kind="eval")
          if is_chief:
            metrics_lib.log(eval_line(step, eval_metrics))
          last.update(eval_metrics)
          stopwatch.lap()  # Eval time is not training time.
  except KeyboardInterrupt:
    # Keep the work done: save where we are, then stop.
    if ("state" in locals() and int(state.step) != ckpt.latest_step()
        and bool(jax.device_get(finite))):
      metrics_lib.log(f"interrupted: saving step {int(state.step)}")
      ckpt.save(int(state.step), state.params, state.opt_state,
                _meta(config, int(state.step),
                      data.num_shards if "data" in locals() else None))
    raise
  finally:
    ckpt.close()
    writer.close()
  return last


def load_params(model_dir: str, config: model_lib.ModelConfig, step: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> tuple[Any, int]:
  """The parameters of a checkpoint in `model_dir` (the latest unless `step`)."""
  ckpt = checkpoint_lib.Checkpointer(model_dir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise ValueError(f"no checkpoint in {ckpt.directory}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; "
                     f"there are steps {sorted(steps)}")
  mesh = sharding.make_mesh(sharding.MeshConfig()) if mesh is None else mesh
  model = model_lib.Transformer(config)
  init_batch = dummy_batch(sharding.data_parallel_size(mesh), {"inputs": 1, "targets": 1})
  with jax.set_mesh(mesh):
    boxed = jax.eval_shape(lambda r: model.init({"params": r}, **init_batch)["params"],
                           jax.random.key(0))
    shardings = sharding.logical_to_mesh(nn.get_partition_spec(boxed), mesh)
    abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
    params, _, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return params, step
