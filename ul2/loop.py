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
import json
import os
import signal
import threading
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from ul2 import checkpoint as checkpoint_lib
from ul2 import compiler
from ul2 import distributed
from ul2 import features
from ul2 import metrics as metrics_lib
from ul2 import model as model_lib
from ul2 import model_settings
from ul2 import optimizers
from ul2 import quiet
from ul2 import run_lock
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
    init_from: start from these parameters instead of random ones [INIT_FROM]: an
      ul2 model_dir (its newest good step, or `DIR@STEP`) or a Hugging Face T5
      directory (`ul2.warm_start`). Parameters only: step 0, a fresh optimiser
      state and data stream; ignored once the run has a checkpoint of its own.
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
  init_from: str | None = None

  def __post_init__(self):
    if not isinstance(self.model_dir, str) or not self.model_dir:
      raise ValueError("model_dir is required: pass --model_dir=DIR "
                       "(or --gin.MODEL_DIR=\"'DIR'\")")
    for name in ("train_steps", "batch_size", "checkpoint_period", "log_period",
                 "num_microbatches", "eval_steps", "eval_period", "random_seed"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
      may_be_zero = name in ("eval_period", "random_seed")
      if value < 0 or (value == 0 and not may_be_zero):
        raise ValueError(f"{name} must be {'non-negative' if may_be_zero else 'positive'}, "
                         f"got {value}")
    if self.init_from is not None and (not isinstance(self.init_from, str)
                                       or not self.init_from):
      raise ValueError(f"init_from must be a path, got {self.init_from!r}")
    if self.keep_checkpoints is not None and (
        not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1):
      raise ValueError(f"keep_checkpoints must be a positive integer or None, got "
                       f"{self.keep_checkpoints!r}")
    if self.data_shards is not None and (
        not isinstance(self.data_shards, int) or self.data_shards <= 0 or self.batch_size % self.data_shards):
      raise ValueError(f"data_shards={self.data_shards} must be positive and divide "
                       f"the batch size {self.batch_size}")
    if not isinstance(self.task_feature_lengths, Mapping) or set(
        self.task_feature_lengths) != {"inputs", "targets"} or not all(
            isinstance(v, int) and v > 0 for v in self.task_feature_lengths.values()):
      raise ValueError("task_feature_lengths must map 'inputs' and 'targets' to positive "
                       f"integers, got {self.task_feature_lengths!r}")


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `build` derives from a config: the mesh, shardings and jitted functions."""
  config: TrainConfig  # The config with its implementation choices resolved for `mesh`.
  mesh: jax.sharding.Mesh
  model: nn.Module
  state_shardings: trainer.TrainState
  abstract_state: trainer.TrainState
  init: Any            # rng -> TrainState (jitted, sharded)
  train_step: Any      # (state, batch, rng) -> (state, metrics) (jitted, donates state)
  eval_step: Any       # (params, batch) -> sums (jitted)
  batch_sharding: NamedSharding


def build(config: TrainConfig, num_denoisers: int,
          mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Mesh, sharded abstract state and the jitted init / train / eval functions.

  The implementation choices are made here, once, from the config and the mesh:
  "auto" attention and loss (`ModelConfig.resolved`, `LossConfig.resolved`) and the
  compiler options (`ul2.compiler`, per platform and dtype). `Setup.config` is the
  resolved config the functions run."""
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  sharding.check_batch_size(config.batch_size, mesh, config.num_microbatches)
  platform, batch_shards = sharding.platform(mesh), sharding.data_parallel_size(mesh)
  config = dataclasses.replace(config, model=config.model.resolved(platform, batch_shards),
                               loss=config.loss.resolved(platform, batch_shards))
  model = model_lib.Transformer(config.model)
  optimizer = optimizers.make_optimizer(config.optimizer)
  schedule = optimizers.make_schedule(config.optimizer)
  abstract_params, param_shardings = model_lib.abstract_params_and_shardings(
      config.model, mesh)
  init_inputs = features.dummy_model_inputs(batch_shards, {"inputs": 1, "targets": 1})

  def init_state(rng):
    params = nn.meta.unbox(model.init({"params": rng, "dropout": rng}, **init_inputs)["params"])
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params))

  abstract_state = trainer.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=jax.eval_shape(optimizer.init, abstract_params))
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
  options = compiler.compiler_options(platform, config.model.dtype)
  return Setup(
      config=config,
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


def prepare_model_dir(model_dir: str) -> epath.Path:
  """`model_dir` as an `etils.epath` path (local, or an object store: `gs://...`),
  made and checked to be writable."""
  path = epath.Path(model_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: several processes may share the directory.
    probe = path / f".write_test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"model_dir {model_dir!r} is not writable: "
                     f"{e.strerror or quiet.root_cause(e)}") from e
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

  def batches(self, skip: int = 0):
    """A `data.Stream` of this process's shards, after `skip` batches (replayed)."""
    c = self._config
    shard_ids = distributed.process_data_shards(self.num_shards, jax.process_index(),
                                                jax.process_count())
    datasets = {}
    for shard_id in shard_ids:
      ds = self._data.get_dataset(
          c.mixture_or_task_name, dict(c.task_feature_lengths), split=self._split,
          batch_size=c.batch_size // self.num_shards, shuffle=self._shuffle,
          seed=c.random_seed, pack=c.pack, shard_id=shard_id,
          num_shards=self.num_shards, repeat=True)
      datasets[shard_id] = ds.skip(skip) if skip else ds
    return self._data.Stream(datasets)


class _DataPositions:
  """The input pipeline's position at each checkpoint: `<model_dir>/data_state/<step>/`,
  one directory per data shard (written by the process that reads it), so a resume
  restores the position in O(1) instead of replaying the stream.

  The position is written just before the step's checkpoint, with the data settings
  that decide the stream (task, seed, batch size, lengths, packing, data shards:
  `settings.json`), and is only used for a checkpoint of the same step and settings;
  the stream is a deterministic function of those, so a position left by an earlier
  run of the same settings is still right. Otherwise, or if it cannot be read, the
  resume replays the stream (`dataset.skip`): exact too, only slower. Sources that
  tf.data cannot checkpoint (Python generators: JSONL files) fall back to replay.
  """

  def __init__(self, model_dir: epath.Path):
    self.root = model_dir / "data_state"
    self._enabled = True

  def save(self, stream: Any, step: int, settings: Mapping[str, Any], keep: list[int]
           ) -> None:
    if not self._enabled:
      return
    directory = self.root / str(step)
    unsupported = stream.save(directory)
    if unsupported:
      self._enabled = False
      metrics_lib.warn(f"warning: the input pipeline's position cannot be saved ({unsupported}); "
                       "a resume will replay the data stream instead")
      return
    if jax.process_index() == 0:
      _atomic_write(directory / "settings.json", json.dumps(settings, sort_keys=True))
    if jax.process_index() == 0:  # Drop the positions of rotated-out steps.
      for path in self.root.iterdir():
        if path.name.isdigit() and int(path.name) not in keep and int(path.name) != step:
          try:
            path.rmtree()
          except OSError:
            pass  # Left for the next save to drop.

  def restore(self, data: _Data, step: int, settings: Mapping[str, Any]):
    """A stream at `step`'s saved position, or None if there is no usable one."""
    directory = self.root / str(step)
    try:
      saved = json.loads((directory / "settings.json").read_text())
    except (OSError, ValueError):
      return None
    stream = data.batches()
    if saved != json.loads(json.dumps(settings, sort_keys=True)) or not stream.has_state(
        directory):
      return None
    try:
      stream.restore(directory)
    except Exception as e:  # pylint: disable=broad-except  (corrupt state)
      metrics_lib.warn(f"warning: the data position saved with step {step} is unreadable "
                       f"({type(e).__name__}); replaying the data stream instead")
      return None
    return stream


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
  """The console line of an eval: loss, the unigram baseline when there is one, and
  the metrics of supervised tasks (`eval/<task>/<metric>`)."""
  line = f"eval step {step}: loss {metrics['eval/loss']:.3f}"
  supervised = {k: v for k, v in metrics.items() if k.count("/") == 2
                and not k.startswith("eval/loss/")}
  if supervised:
    line += " | " + ", ".join(f"{k[len('eval/'):]} {v:.1f}" for k, v in sorted(supervised.items()))
  if "eval/unigram_cross_entropy" in metrics:
    unigram, cross_entropy = metrics["eval/unigram_cross_entropy"], metrics["eval/cross_entropy"]
    line += (f" | cross-entropy {cross_entropy:.3f}, a unigram model of the targets "
             f"{unigram:.3f} ({unigram - cross_entropy:.3f} nats better)")
  return line


def _meta(config: TrainConfig, step: int, data_shards: int) -> dict[str, Any]:
  return {"batches_consumed": int(step), "mixture_or_task_name": config.mixture_or_task_name,
          "random_seed": config.random_seed, "batch_size": config.batch_size,
          "task_feature_lengths": dict(config.task_feature_lengths), "pack": config.pack,
          "process_count": jax.process_count(), "data_shards": data_shards}


_DATA_KEYS = ("mixture_or_task_name", "random_seed", "batch_size", "task_feature_lengths",
              "pack", "data_shards")


def _data_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
  """What decides the input pipeline's stream, from a checkpoint's meta."""
  return {key: meta.get(key) for key in _DATA_KEYS}


def _abstract_state(setup: Setup) -> trainer.TrainState:
  return checkpoint_lib.abstract_with_shardings(setup.abstract_state, setup.state_shardings)


def _state_at(setup: Setup, step: int, params: Any, opt_state: Any) -> trainer.TrainState:
  return trainer.TrainState(step=jax.device_put(jnp.int32(step), setup.state_shardings.step),
                            params=params, opt_state=opt_state)


def restore_or_init(setup: Setup, ckpt: checkpoint_lib.Checkpointer, config: TrainConfig,
                    step: int | None = None, set_aside: bool = False,
                    init_params: Any | None = None
                    ) -> tuple[trainer.TrainState, dict[str, Any]]:
  """The state at `step`, or at the newest checkpoint that verifies, or a fresh one
  (with `init_params`, a warm start's, instead of random ones).

  A newest checkpoint that fails to restore or verify is skipped with a warning
  (and, with `set_aside`, moved to `checkpoints.unreadable/` so that the run can
  save that step again). A `step` asked for by number is not skipped: it restores
  or raises `checkpoint.Unreadable`.
  """
  abstract = _abstract_state(setup)
  if step is not None:
    params, opt_state, meta = ckpt.restore(step, abstract.params, abstract.opt_state)
  else:
    newest = max(ckpt.all_steps(), default=None)
    found = ckpt.restore_newest_good(abstract.params, abstract.opt_state,
                                     warn=metrics_lib.warn)
    if found is None:
      state = setup.init(jax.random.key(config.random_seed))
      if init_params is not None:
        state = state.replace(params=init_params)
        metrics_lib.log(f"warm start: the parameters of {config.init_from} (step 0, a fresh "
                        "optimiser state and data stream)")
      return state, {"batches_consumed": 0}
    step, params, opt_state, meta = found
    if set_aside and step != newest:
      if jax.process_index() == 0:
        for bad in (s for s in ckpt.all_steps() if s > step):
          metrics_lib.log(f"moved unreadable checkpoint step {bad} to {ckpt.set_aside(bad)}")
      multihost_utils.sync_global_devices("ul2: unreadable checkpoints set aside")
      ckpt.reload()
  for key in ("mixture_or_task_name", "random_seed", "batch_size"):
    if meta.get(key) != getattr(config, key):
      metrics_lib.warn(f"warning: resuming step {step} with {key}={getattr(config, key)!r}"
                      f" (checkpoint has {meta.get(key)!r}): the data order differs from "
                      "an uninterrupted run")
  saved_shards = meta.get("data_shards", meta.get("process_count"))
  if config.data_shards and saved_shards and config.data_shards != saved_shards:
    metrics_lib.warn(f"warning: resuming step {step} with data_shards={config.data_shards} "
                    f"(checkpoint has {saved_shards}): the data order differs from an "
                    "uninterrupted run")
  return _state_at(setup, step, params, opt_state), meta


def _warm_start(setup: Setup, config: TrainConfig, ckpt: checkpoint_lib.Checkpointer
                ) -> Any | None:
  """`config.init_from`'s parameters on the state's shardings, if the run has no
  checkpoint of its own yet (a resume never warm-starts again); else None."""
  if not config.init_from or ckpt.all_steps():
    return None
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  from ul2 import warm_start  # pylint: disable=import-outside-toplevel
  warm_start.check_matches(
      config.init_from, config.model,
      vocabulary_size=data.task_vocabulary(config.mixture_or_task_name).vocab_size)
  params, _ = warm_start.load_params(config.init_from, config.model,
                                     setup.state_shardings.params)
  return params


class Diverged(RuntimeError):
  """The loss or the gradient norm stopped being finite; the run stops without saving."""


def _finite(out: Mapping[str, Any]) -> jax.Array:
  """Whether a train step's loss and gradient norm are finite (on device)."""
  return jnp.isfinite(out["sums"]["loss"]) & jnp.isfinite(out["grad_norm"])


def itstime(step: int, period: int, last_step: int) -> bool:
  """Whether a periodic action (log, save, eval) is due after `step`: every
  `period` steps (never if 0) and at the run's last step."""
  return step == last_step or (period > 0 and step % period == 0)


class _Preemption:
  """Whether the run has been asked to stop (SIGTERM, as SLURM, Kubernetes and TPU
  maintenance send): then it saves the step it is at and ends.

  One process: a SIGTERM handler sets a flag. Several: JAX's preemption service
  (started by `jax.distributed.initialize`) catches the signal on whichever process
  gets it and makes every process agree on one step to stop at
  (`reached_preemption_sync_point`, called at every step).
  """

  def __init__(self):
    self._shared = jax.process_count() > 1
    self._requested = False
    self._previous = None
    if not self._shared and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._request)

  def _request(self, signum, frame):  # pylint: disable=unused-argument
    self._requested = True

  def reached(self, step: int) -> bool:
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass(frozen=True)
class _Evaluators:
  """What an eval adds to the loss: a unigram baseline (pre-training tasks) and the
  metrics of decoded predictions (supervised tasks, `ul2.supervised_eval`)."""
  unigram: np.ndarray | None
  supervised: Any


def _evaluators(config: TrainConfig, denoiser_names: list[str]) -> _Evaluators:
  from ul2 import supervised_eval  # pylint: disable=import-outside-toplevel
  supervised = supervised_eval.SupervisedEvaluator(
      config.mixture_or_task_name, config.task_feature_lengths,
      batch_size=config.batch_size, split=config.eval_split)
  return _Evaluators(unigram=unigram_log_probs(config) if denoiser_names else None,
                     supervised=supervised if supervised.tasks else None)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How `train` ended: at `step`, with the last logged `metrics`; `preempted` if it
  stopped early on SIGTERM (after saving `step`)."""
  step: int
  metrics: dict[str, float]
  preempted: bool = False


def _check_resume(model_dir: epath.Path, ckpt: checkpoint_lib.Checkpointer,
                  config: TrainConfig) -> None:
  """A resume under a different architecture is one line, not a shape error."""
  if not ckpt.all_steps() or not (model_dir / model_settings.FILENAME).is_file():
    return
  saved = model_settings.read(model_dir).model
  differences = model_settings.architecture_differences(saved, config.model)
  if differences:
    raise ValueError(f"{model_dir} holds checkpoints of another model: "
                     + "; ".join(differences) + ". Use another --model_dir, or the "
                     "checkpoint's model settings")


def _write_records(model_dir: epath.Path, config: TrainConfig, operative_config: str | None
                   ) -> None:
  """config.gin (the human-readable record) and model_config.json (the data readers
  use), written only once the config is valid and the restore has succeeded."""
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  if operative_config is not None:
    _atomic_write(model_dir / "config.gin", operative_config)
  vocab = data.task_vocabulary(config.mixture_or_task_name)
  vocab_path = str(vocab.sentencepiece_model_file)
  if "://" not in vocab_path:
    vocab_path = os.path.abspath(vocab_path)
  run = {"batch_size": config.batch_size, "random_seed": config.random_seed,
         "eval_steps": config.eval_steps, "eval_split": config.eval_split,
         "pack": config.pack, "loss": dataclasses.asdict(config.loss)}
  model_settings.write(model_dir, model_settings.ModelSettings(
      model=config.model, vocab_path=vocab_path, extra_ids=vocab.extra_ids,
      task_feature_lengths=dict(config.task_feature_lengths),
      mixture_or_task_name=config.mixture_or_task_name, run=run))


def _atomic_write(path: epath.Path, text: str) -> None:
  if "://" in os.fspath(path):  # An object is written whole or not at all.
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def train(config: TrainConfig, mesh: jax.sharding.Mesh | None = None,
          operative_config: str | None = None) -> Outcome:
  """Runs (or resumes) training to `config.train_steps`, holding the model_dir's lock.

  `operative_config` (the gin text) is saved as `config.gin` once the run has
  restored; raises `Diverged` if the loss stops being finite, `run_lock.LockHeld` if
  another run holds the model_dir.
  """
  model_dir = prepare_model_dir(config.model_dir)
  with run_lock.hold(model_dir, warn=metrics_lib.warn, enabled=jax.process_index() == 0):
    return _train(config, model_dir, mesh, operative_config)


def _train(config: TrainConfig, model_dir: epath.Path, mesh: jax.sharding.Mesh | None,
           operative_config: str | None) -> Outcome:
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  # Bad data, vocabulary or lengths fail here, before anything is built or written.
  denoiser_names = [d.name for d in data.task_denoisers(config.mixture_or_task_name)]
  data.check_vocabulary(config.mixture_or_task_name, config.model.vocab_size)
  for split in ("train", config.eval_split) if config.eval_period else ("train",):
    data.check(config.mixture_or_task_name, config.task_feature_lengths, split)
  setup = build(config, max(len(denoiser_names), 1), mesh)
  is_chief = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpointer(model_dir, keep=config.keep_checkpoints,
                                     async_save=config.async_checkpointing)
  writer = None
  preemption = _Preemption()
  try:
    _check_resume(model_dir, ckpt, config)
    init_params = _warm_start(setup, config, ckpt)  # Outside the mesh context.
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
      state, meta = restore_or_init(setup, ckpt, config, set_aside=True,
                                    init_params=init_params)
      if is_chief:
        _write_records(model_dir, config, operative_config)
      writer = metrics_lib.MetricsWriter(model_dir, enabled=is_chief)
      step = int(state.step)
      if step >= config.train_steps:
        metrics_lib.log(f"step {step} >= train_steps {config.train_steps}: nothing to do")
        return Outcome(step, {})
      # Resuming keeps the checkpoint's data sharding unless the config sets one,
      # so the data order is the same on any number of processes.
      data_shards = config.data_shards or meta.get("data_shards") or jax.process_count()
      train_data = _Data(config, "train", shuffle=True, num_shards=data_shards)
      positions = _DataPositions(model_dir)
      settings = _data_settings(_meta(config, step, data_shards))
      batches = None
      if step and _data_settings(meta) == settings:
        batches = positions.restore(train_data, step, settings)
      if step:
        metrics_lib.log(f"resumed from step {step} in {ckpt.directory} ("
                        + ("its data position restored" if batches is not None else
                           f"replaying {int(meta['batches_consumed'])} batches of data")
                        + ")")
      if batches is None:  # From the start, or replayed to the checkpoint's position.
        batches = train_data.batches(skip=int(meta["batches_consumed"]))
      return _loop(config, setup, ckpt, writer, preemption, state, batches, positions,
                   data_shards, denoiser_names)
  finally:
    preemption.close()
    ckpt.close()
    if writer is not None:
      writer.close()


def _loop(config: TrainConfig, setup: Setup, ckpt: checkpoint_lib.Checkpointer,
          writer: metrics_lib.MetricsWriter, preemption: _Preemption,
          state: trainer.TrainState, batches: Any, positions: _DataPositions,
          data_shards: int, denoiser_names: list[str]) -> Outcome:
  """Steps from `state.step` to `config.train_steps`: log, save and eval when it is
  time. Ctrl-C saves the step it is at (unless diverged), then stops."""
  is_chief = jax.process_index() == 0
  lengths = config.task_feature_lengths
  tokens_per_step = config.batch_size * (lengths["inputs"] + lengths["targets"])
  flops_per_step = (model_lib.flops_per_token(config.model, lengths["inputs"],
                                              lengths["targets"])
                    * config.batch_size * lengths["targets"])
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, config.peak_flops_per_device)
  dropout_key = jax.random.key(config.random_seed + 1)
  last: dict[str, float] = {}
  sums, steps_in_period, finite = None, 0, jnp.bool_(True)
  evaluators = None  # Made at the first eval.
  stopwatch = metrics_lib.Stopwatch()
  step = consumed = int(state.step)  # Steps done; batches taken from the stream.
  train_step = None  # Compiled at the first batch, once it is known to fit.
  try:
    while step < config.train_steps:
      batch = global_batch(next(batches), setup.batch_sharding)
      consumed += 1
      if train_step is None:
        train_step = compiler.compile_fitting(setup.train_step, state, batch, dropout_key)
      state, out = train_step(state, batch, dropout_key)
      step += 1
      steps_in_period += 1
      finite = _finite(out) & finite
      sums = out["sums"] if sums is None else jax.tree.map(jnp.add, sums, out["sums"])
      preempted = preemption.reached(step)
      log_now = itstime(step, config.log_period, config.train_steps)
      save_now = itstime(step, config.checkpoint_period, config.train_steps) or preempted
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
        meta = _meta(config, step, data_shards)
        positions.save(batches, step, _data_settings(meta), keep=ckpt.all_steps())
        ckpt.save(step, state.params, state.opt_state, meta)
      if preempted:
        ckpt.wait()
        metrics_lib.log(f"preempted (SIGTERM): saved step {step} in {ckpt.directory}; "
                        "run the same command to resume")
        return Outcome(step, last, preempted=True)
      if config.eval_period and itstime(step, config.eval_period, config.train_steps):
        if evaluators is None:
          evaluators = _evaluators(config, denoiser_names)
        eval_metrics = evaluate(setup, state.params, config, denoiser_names,
                                evaluators.unigram)
        if evaluators.supervised is not None:
          eval_metrics.update(evaluators.supervised(state.params, config.model, setup.mesh,
                                                    step=step, model_dir=config.model_dir))
        writer.write(step, eval_metrics, kind="eval")
        if is_chief:
          metrics_lib.log(eval_line(step, eval_metrics))
        last.update(eval_metrics)
        stopwatch.lap()  # Eval time is not training time.
  except KeyboardInterrupt:
    if (not state.step.is_deleted() and int(state.step) not in ckpt.all_steps()
        and bool(jax.device_get(finite))):
      metrics_lib.log(f"interrupted: saving step {int(state.step)}")
      meta = _meta(config, int(state.step), data_shards)
      if consumed == int(state.step):  # Else the resume replays to the step.
        positions.save(batches, int(state.step), _data_settings(meta), keep=ckpt.all_steps())
      ckpt.save(int(state.step), state.params, state.opt_state, meta)
    raise
  return Outcome(step, last)


def eval_config(model_dir: str, settings: model_settings.ModelSettings,
                eval_steps: int | None = None, split: str | None = None) -> TrainConfig:
  """The TrainConfig `ul2 eval` runs: the training run's settings, read as data."""
  run = settings.run
  return TrainConfig(
      model_dir=str(model_dir), mixture_or_task_name=settings.mixture_or_task_name,
      task_feature_lengths=dict(settings.task_feature_lengths), train_steps=1,
      batch_size=int(run.get("batch_size", 16)), model=settings.model,
      loss=trainer.LossConfig(**run.get("loss", {})),
      random_seed=int(run.get("random_seed", 0)), pack=bool(run.get("pack", True)),
      eval_steps=eval_steps or int(run.get("eval_steps", 20)),
      eval_split=split or str(run.get("eval_split", "validation")))


def evaluate_checkpoint(config: TrainConfig, denoiser_names: list[str],
                        step: int | None = None) -> tuple[dict[str, float], int]:
  """`evaluate` on a checkpoint's parameters: `step`, or the newest that verifies."""
  setup = build(config, max(len(denoiser_names), 1))
  ckpt = checkpoint_lib.Checkpointer(config.model_dir, read_only=True)
  try:
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
      step, params = ckpt.restore_params(_abstract_state(setup).params, step,
                                         warn=metrics_lib.warn)
      return evaluate(setup, params, config, denoiser_names,
                      unigram_log_probs(config)), step
  finally:
    ckpt.close()


def load_params(model_dir: str, config: model_lib.ModelConfig, step: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> tuple[Any, int]:
  """The parameters of a checkpoint in `model_dir`: `step`, or the newest one that
  restores and verifies (skipping bad ones with a warning)."""
  mesh = sharding.make_mesh(sharding.MeshConfig()) if mesh is None else mesh
  abstract, shardings = model_lib.abstract_params_and_shardings(config, mesh)
  ckpt = checkpoint_lib.Checkpointer(model_dir, read_only=True)
  try:
    with jax.set_mesh(mesh):
      step, params = ckpt.restore_params(
          checkpoint_lib.abstract_with_shardings(abstract, shardings), step,
          warn=metrics_lib.warn)
  finally:
    ckpt.close()
  return params, step
