"""Training-step speed of ul2.model against Hugging Face's Flax T5, and the matmul peak.

    flock /tmp/ul2-heavy.lock .venv/bin/python benchmarks/model_bench.py [--shapes tiny,small]
        [--targets 128,512] [--steps 5] [--baseline_python .venv-hfflax/bin/python]

Prints JSON lines: one `matmul_peak` line (a 4096x4096 float32 matmul in JAX, the
attainable FLOP/s here), then per (shape, targets length) the same peak timed in the
rounds of that shape's steps (`fraction_of_matmul_peak` uses the higher of the two),
one line for `ul2`, one
for `hf_flax` (benchmarks/hf_flax_t5_bench.py, run as a subprocess in its own venv:
transformers 4.57.6 with jax 0.9.2, since transformers 5 dropped Flax; see
benchmarks/setup_hf_flax_venv.sh), on CPU one for `hf_flax_with_ul2_xla_options` (HF's
model compiled with the XLA options ul2 sets, `ul2.compiler`, to separate their effect
from the model's), and one `ratio` line.

Both sides do the same work: batch 8, inputs 512, float32 params and activations,
no dropout, mean token cross-entropy (ul2: its trainer's objective,
`ul2.trainer.summed_loss`, with z-loss 0), optax AdamW, median wall time of a jitted
forward + backward + update step (compiles and one warm-up step excluded). The
sides' steps are interleaved, one step each per round (the baselines stay compiled
in their own processes, `BaselineStepper`), so a slow drift of a shared machine
hits every side alike instead of whichever ran last. `tokens_per_second` counts
input + target positions (batch * (inputs + targets) / step); GFLOP/s use
`ul2.model.flops_per_token` (matmuls and attention, 3x forward) for both.
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


def ul2_step(cfg: model_lib.ModelConfig, targets: int) -> "Stepper":
  model = model_lib.Transformer(cfg)
  data = {k: jnp.asarray(v) for k, v in batch(cfg.vocab_size, targets).items()}
  init = lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                            data["encoder_input_tokens"], data["decoder_input_tokens"])
  params = jax.jit(lambda: nn.unbox(init()["params"]))()
  opt = optax.adamw(1e-4)

  data["decoder_loss_weights"] = jnp.ones_like(data["decoder_target_tokens"])
  loss = trainer.LossConfig(z_loss=0.0)  # The trainer's objective; impl "auto".

  def loss_fn(p):
    total, _ = trainer.summed_loss(p, data, apply_fn=model.apply, loss=loss, num_denoisers=1)
    return total / data["decoder_target_tokens"].size

  def train_step(state):
    p, o = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  train_step = jax.jit(train_step, donate_argnums=0, compiler_options=compiler.compiler_options())
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


class BaselineStepper:
  """The HF Flax T5 step in its own venv (hf_flax_t5_bench.py in "serve" mode):
  compiled at construction, then one step per `step()`."""

  def __init__(self, cfg: model_lib.ModelConfig, targets: int, python: str,
               compiler_options: dict | None = None):
    spec = dict(config=export.hf_config_dict(cfg), batch=BATCH, inputs=INPUTS,
                targets=targets, serve=True, compiler_options=compiler_options)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    self._proc = subprocess.Popen(
        [python, str(ROOT / "benchmarks" / "hf_flax_t5_bench.py"), json.dumps(spec)],
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
  """The 4096^2 float32 matmul, timed in the same rounds as the steps: its median
  gives each shape's attainable FLOP/s under the same machine state."""

  def __init__(self, n: int = 4096):
    self.flops = 2 * n ** 3
    self._a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    self._b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self._f = jax.jit(lambda a, b: a @ b)
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,small")
  parser.add_argument("--targets", default="128,512")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--baseline_python", default=str(ROOT / ".venv-hfflax" / "bin" / "python"))
  args = parser.parse_args(argv)

  peak_stepper = PeakStepper()
  peak = peak_stepper.flops / statistics.median(
      [peak_stepper.step() for _ in range(3)]) / 1e9
  print(json.dumps(dict(bench="matmul_peak", n=4096, dtype="float32",
                        gflops_per_second=round(peak, 1), jax=jax.__version__)), flush=True)
  for shape in args.shapes.split(","):
    cfg = model_config(shape)
    for targets in map(int, args.targets.split(",")):
      steppers = {"ul2": ul2_step(cfg, targets)}
      if not pathlib.Path(args.baseline_python).exists():
        print(json.dumps(dict(bench="hf_flax", shape=shape, targets=targets,
                              error=f"{args.baseline_python} missing: run "
                                    "benchmarks/setup_hf_flax_venv.sh")), flush=True)
      else:
        try:
          steppers["hf_flax"] = BaselineStepper(cfg, targets, args.baseline_python)
          # The same model with the XLA options ul2 sets on this backend: how much of
          # the ratio is the options rather than the model.
          if compiler.compiler_options():
            steppers["hf_flax_with_ul2_xla_options"] = BaselineStepper(
                cfg, targets, args.baseline_python, compiler.compiler_options())
        except RuntimeError as e:
          print(json.dumps(dict(bench="hf_flax", shape=shape, targets=targets, error=str(e))),
                flush=True)
      steppers["matmul_peak"] = peak_stepper
      times = interleaved_times(steppers, args.steps)
      for stepper in steppers.values():
        stepper.close()
      peak_seconds = times.pop("matmul_peak")
      interleaved_peak = peak_stepper.flops / statistics.median(peak_seconds) / 1e9
      print(json.dumps(dict(bench="matmul_peak", shape=shape, targets=targets, n=4096,
                            dtype="float32", gflops_per_second=round(interleaved_peak, 1),
                            interleaved=True)), flush=True)
      # Fractions against the higher of the two peaks: the conservative one.
      results = {name: summary(name, cfg, shape, targets, t, max(peak, interleaved_peak))
                 for name, t in times.items()}
      for result in results.values():
        print(json.dumps(result), flush=True)
      if "hf_flax" in results:
        ours = results["ul2"]["step_seconds"]
        ratio = dict(bench="ratio", shape=shape, targets=targets,
                     ul2_over_hf_flax=round(results["hf_flax"]["step_seconds"] / ours, 3))
        if "hf_flax_with_ul2_xla_options" in results:
          ratio["ul2_over_hf_flax_with_ul2_xla_options"] = round(
              results["hf_flax_with_ul2_xla_options"]["step_seconds"] / ours, 3)
        print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
  sys.exit(main())
