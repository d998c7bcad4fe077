"""Training-step speed of ul2.model against Hugging Face's T5 in PyTorch and Flax.

    flock /tmp/ul2_heavy.lock env PYTHONPATH=. .venv/bin/python benchmarks/model_bench.py \
        [--shapes tiny,small] [--targets 128,512] [--steps 5] [--sides ul2,torch_compile,...]
        [--baseline_python .venv-hfflax/bin/python]

Sides (`SIDES`), each a jitted or compiled forward + backward + update step:

  ul2, ul2_bf16            ul2.model in float32; with bfloat16 activations and dots
                           (float32 params, optimiser and logits), as pretrain_ul2.gin
  ul2_packed, ul2_bf16_packed  the same on real rows of the bundled corpus's
                           local_ul2 pipeline, packed, with the segment ids and
                           positions `ul2 train` feeds (`packed_batch`)
  hf_flax, hf_flax_bf16    transformers' FlaxT5ForConditionalGeneration
                           (benchmarks/hf_flax_t5_bench.py, its own venv:
                           transformers 4.57.6 with jax 0.9.2, since transformers 5
                           dropped Flax; benchmarks/setup_hf_flax_venv.sh)
  torch_eager, torch_compile, torch_bf16   transformers' PyTorch
                           T5ForConditionalGeneration: eager float32, `torch.compile`
                           float32, eager under bfloat16 autocast
                           (benchmarks/torch_t5_bench.py)

Every baseline runs in its own process ("serve" mode: compiled once, then one step
per request), so the sides' steps interleave, one step each per round with the order
rotating: a slow drift of a shared machine hits every side alike instead of
whichever ran last. Two matmul peaks run in the same rounds: a 4096^2 matmul in
float32 and in bfloat16 (float32 accumulation), each under the XLA options ul2 sets
for that dtype (`ul2.compiler`); `fraction_of_matmul_peak` divides a side's FLOP/s
by the peak of its dtype (the higher of the start-up and interleaved medians).

Same work on every side: batch 8, inputs 512, dropout off, mean token
cross-entropy (ul2: its trainer's objective, `ul2.trainer.summed_loss`, z-loss 0),
AdamW at 1e-4, median wall time of a step after the compile and one warm-up step.
`tokens_per_second` counts input + target positions (batch * (inputs + targets) /
step); GFLOP/s use `ul2.model.flops_per_token` (matmuls and attention, 3x forward)
for every side. The `ratio` line gives each side's speed over ul2 float32's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from ul2 import compiler, export, model as model_lib, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCH, INPUTS = 8, 512


def model_config(shape: str) -> model_lib.ModelConfig:
  gin.clear_config()
  gin.parse_config_file(str(ROOT / "gin" / "models" / f"{shape}.gin"))
  cfg = gin.get_configurable(model_lib.ModelConfig)()
  gin.clear_config()
  return dataclasses.replace(cfg, dtype="float32", dropout_rate=0.0)


def batch(vocab: int, targets: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  target_tokens = rng.integers(3, min(vocab, 32000), (BATCH, targets)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), target_tokens[:, :-1]], 1)
  return dict(encoder_input_tokens=rng.integers(3, min(vocab, 32000), (BATCH, INPUTS)).astype(
      np.int32), decoder_input_tokens=decoder_inputs, decoder_target_tokens=target_tokens)


def packed_batch(targets: int) -> dict:
  """Batch 8 of real rows from the bundled corpus's `local_ul2` pipeline, packed at
  512/`targets`, with the segment ids and positions `ul2 train` feeds."""
  from ul2 import data  # pylint: disable=import-outside-toplevel  (TensorFlow)
  ds = data.get_dataset("local_ul2", {"inputs": INPUTS, "targets": targets}, "train",
                        batch_size=BATCH, shuffle=False, seed=0, pack=True)
  return next(data.as_numpy(ds))


def ul2_step(cfg: model_lib.ModelConfig, targets: int, packed: dict | None = None
             ) -> "Stepper":
  model = model_lib.Transformer(cfg)
  if packed is None:
    data = {k: jnp.asarray(v) for k, v in batch(cfg.vocab_size, targets).items()}
    data["decoder_loss_weights"] = jnp.ones_like(data["decoder_target_tokens"])
  else:
    data = {k: jnp.asarray(v) for k, v in packed.items()}
  init = lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                            data["encoder_input_tokens"], data["decoder_input_tokens"])
  params = jax.jit(lambda: nn.unbox(init()["params"]))()
  opt = optax.adamw(1e-4)
  loss = trainer.LossConfig(z_loss=0.0)  # The trainer's objective; impl "auto".

  def loss_fn(p):
    total, _ = trainer.summed_loss(p, data, apply_fn=model.apply, loss=loss, num_denoisers=1)
    return total / jnp.sum(data["decoder_loss_weights"])

  def train_step(state):
    p, o = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  train_step = jax.jit(train_step, donate_argnums=0,
                       compiler_options=compiler.compiler_options(dtype=cfg.dtype))
  return Stepper(train_step, (params, opt.init(params)))


class Stepper:
  """Our jitted step and its state: `step()` runs one step and returns its seconds."""

  def __init__(self, step, state):
    self._step, self._state = step, step(state)  # Compile, and one warm-up step.
    jax.block_until_ready(self._state)

  def step(self) -> float:
    start = time.perf_counter()
    self._state = self._step(self._state)
    jax.block_until_ready(self._state)
    return time.perf_counter() - start

  def close(self) -> None:
    pass


class ProcessStepper:
  """A baseline's step in its own process (a script's "serve" mode): compiled at
  construction, then one step per `step()`."""

  def __init__(self, python: str, script: str, spec: dict):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    self._proc = subprocess.Popen(
        [python, str(ROOT / "benchmarks" / script), json.dumps(dict(spec, serve=True))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    self._read()  # {"ready": true} after the compile.
    self.step()  # Warm-up.

  def _read(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      err = self._proc.stderr.read().strip().splitlines()
      raise RuntimeError(err[-1] if err else "baseline process ended")
    return json.loads(line)

  def step(self) -> float:
    self._proc.stdin.write("step\n")
    self._proc.stdin.flush()
    return self._read()["step_seconds"]

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait()


class PeakStepper:
  """The 4096^2 matmul in `dtype` (float32 accumulation), timed in the same rounds
  as the steps: its median gives each shape's attainable FLOP/s under the same
  machine state. Compiled with the options ul2 sets for that dtype."""

  def __init__(self, n: int = 4096, dtype: str = "float32"):
    self.flops = 2 * n ** 3
    self._a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
    self._b = jax.random.normal(jax.random.key(1), (n, n)).astype(dtype)
    self._f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                      compiler_options=compiler.compiler_options(dtype=dtype))
    self._f(self._a, self._b).block_until_ready()

  def step(self) -> float:
    times = []
    for _ in range(3):
      start = time.perf_counter()
      self._f(self._a, self._b).block_until_ready()
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  def close(self) -> None:
    pass


def interleaved_times(steppers: dict, steps: int) -> dict[str, list[float]]:
  """`steps` rounds, each one step of every stepper in turn (the order rotating),
  so slow drifts of the machine hit all sides alike."""
  times = {name: [] for name in steppers}
  names = list(steppers)
  for r in range(steps):
    for name in names[r % len(names):] + names[:r % len(names)]:
      times[name].append(steppers[name].step())
  return times


def summary(name: str, cfg, shape: str, targets: int, times: list[float], peak: float) -> dict:
  step = statistics.median(times)
  flops = model_lib.flops_per_token(cfg, INPUTS, targets) * BATCH * targets
  return dict(bench=name, shape=shape, batch=BATCH, inputs=INPUTS, targets=targets,
              step_seconds=round(step, 4),
              tokens_per_second=round(BATCH * (INPUTS + targets) / step, 1),
              target_tokens_per_second=round(BATCH * targets / step, 1),
              gflops_per_second=round(flops / step / 1e9, 1),
              fraction_of_matmul_peak=round(flops / step / 1e9 / peak, 3),
              params=model_lib.param_count(cfg), steps=len(times))


SIDES = ("ul2", "ul2_bf16", "ul2_packed", "ul2_bf16_packed", "hf_flax", "hf_flax_bf16",
         "torch_eager", "torch_compile", "torch_bf16")


def make_stepper(side: str, cfg: model_lib.ModelConfig, targets: int, args) -> object:
  """One side of the comparison, compiled and warmed up."""
  bf16 = "bf16" in side
  if side.startswith("ul2"):
    packed = packed_batch(targets) if side.endswith("packed") else None
    return ul2_step(dataclasses.replace(cfg, dtype="bfloat16" if bf16 else "float32"),
                    targets, packed)
  spec = dict(config=export.hf_config_dict(cfg), batch=BATCH, inputs=INPUTS, targets=targets)
  if side.startswith("hf_flax"):
    if not pathlib.Path(args.baseline_python).exists():
      raise RuntimeError(f"{args.baseline_python} missing: run benchmarks/setup_hf_flax_venv.sh")
    return ProcessStepper(args.baseline_python, "hf_flax_t5_bench.py",
                          dict(spec, dtype="bfloat16" if bf16 else "float32"))
  mode = side.removeprefix("torch_")
  return ProcessStepper(sys.executable, "torch_t5_bench.py",
                        dict(spec, mode=mode, threads=len(os.sched_getaffinity(0))))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,small")
  parser.add_argument("--targets", default="128,512")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--sides", default=",".join(SIDES),
                      help=f"comma-separated, of {', '.join(SIDES)}")
  parser.add_argument("--baseline_python", default=str(ROOT / ".venv-hfflax" / "bin" / "python"))
  args = parser.parse_args(argv)
  sides = args.sides.split(",")
  unknown = sorted(set(sides) - set(SIDES))
  if unknown:
    parser.error(f"unknown sides {unknown}; expected some of {SIDES}")

  peaks = {dtype: PeakStepper(dtype=dtype) for dtype in ("float32", "bfloat16")}
  base_peak = {}
  for dtype, stepper in peaks.items():
    base_peak[dtype] = stepper.flops / statistics.median([stepper.step() for _ in range(3)]) / 1e9
    print(json.dumps(dict(bench="matmul_peak", n=4096, dtype=dtype,
                          gflops_per_second=round(base_peak[dtype], 1),
                          jax=jax.__version__)), flush=True)
  for shape in args.shapes.split(","):
    cfg = model_config(shape)
    for targets in map(int, args.targets.split(",")):
      steppers = {}
      for side in sides:
        try:
          steppers[side] = make_stepper(side, cfg, targets, args)
        except RuntimeError as e:
          print(json.dumps(dict(bench=side, shape=shape, targets=targets, error=str(e))),
                flush=True)
      for dtype, stepper in peaks.items():
        steppers[f"matmul_peak_{dtype}"] = stepper
      times = interleaved_times(steppers, args.steps)
      for stepper in steppers.values():
        stepper.close()
      peak = {}
      for dtype, stepper in peaks.items():
        interleaved = stepper.flops / statistics.median(times.pop(f"matmul_peak_{dtype}")) / 1e9
        print(json.dumps(dict(bench="matmul_peak", shape=shape, targets=targets, n=4096,
                              dtype=dtype, gflops_per_second=round(interleaved, 1),
                              interleaved=True)), flush=True)
        # Fractions against the higher of the two peaks: the conservative one.
        peak[dtype] = max(base_peak[dtype], interleaved)
      results = {name: summary(name, cfg, shape, targets, t,
                               peak["bfloat16" if "bf16" in name else "float32"])
                 for name, t in times.items()}
      for result in results.values():
        print(json.dumps(result), flush=True)
      if "ul2" in results:
        ours = results["ul2"]["step_seconds"]
        print(json.dumps(dict(
            bench="ratio", shape=shape, targets=targets,
            **{f"{name}_over_ul2": round(ours / r["step_seconds"], 3)
               for name, r in results.items() if name != "ul2"})), flush=True)


if __name__ == "__main__":
  sys.exit(main())
