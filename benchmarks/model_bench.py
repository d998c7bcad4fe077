"""Training-step speed of ul2.model against Hugging Face's Flax T5, and the matmul peak.

    flock /tmp/ul2-heavy.lock .venv/bin/python benchmarks/model_bench.py [--shapes tiny,small]
        [--targets 128,512] [--steps 5] [--baseline_python .venv-hfflax/bin/python]

Prints JSON lines: one `matmul_peak` line (a 4096x4096 float32 matmul in JAX, the
attainable FLOP/s here), then per (shape, targets length) one line for `ul2`, one
for `hf_flax` (benchmarks/hf_flax_t5_bench.py, run as a subprocess in its own venv:
transformers 4.57.6 with jax 0.9.2, since transformers 5 dropped Flax; see
benchmarks/setup_hf_flax_venv.sh), on CPU one for `hf_flax_with_ul2_xla_options` (HF's
model compiled with the XLA options ul2 sets, `ul2.compiler`, to separate their effect
from the model's), and one `ratio` line.

Both sides do the same work: batch 8, inputs 512, float32 params and activations,
no dropout, mean token cross-entropy, optax AdamW, median wall time of a jitted
forward + backward + update step (compiles excluded). `tokens_per_second` counts
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

from ul2 import compiler, export, model as model_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCH, INPUTS = 8, 512


def model_config(shape: str) -> model_lib.ModelConfig:
  gin.clear_config()
  gin.parse_config_file(str(ROOT / "gin" / "models" / f"{shape}.gin"))
  cfg = gin.get_configurable(model_lib.ModelConfig)()
  gin.clear_config()
  return dataclasses.replace(cfg, dtype="float32", dropout_rate=0.0)


def timed_steps(step, state, steps: int) -> list[float]:
  state = step(state)  # Compile.
  jax.block_until_ready(state)
  times = []
  for _ in range(steps + 1):  # One more warm-up step, not timed.
    start = time.perf_counter()
    state = step(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return times[1:]


def matmul_peak(n: int = 4096, steps: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def batch(vocab: int, targets: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  target_tokens = rng.integers(3, min(vocab, 32000), (BATCH, targets)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), target_tokens[:, :-1]], 1)
  return dict(encoder_input_tokens=rng.integers(3, min(vocab, 32000), (BATCH, INPUTS)).astype(
      np.int32), decoder_input_tokens=decoder_inputs, decoder_target_tokens=target_tokens)


def ul2_step_times(cfg: model_lib.ModelConfig, targets: int, steps: int) -> list[float]:
  model = model_lib.Transformer(cfg)
  data = {k: jnp.asarray(v) for k, v in batch(cfg.vocab_size, targets).items()}
  init = lambda: model.init({"params": jax.random.key(0, impl="rbg")},
                            data["encoder_input_tokens"], data["decoder_input_tokens"])
  params = jax.jit(lambda: nn.unbox(init()["params"]))()
  opt = optax.adamw(1e-4)

  def loss_fn(p):
    logits = model.apply({"params": p}, data["encoder_input_tokens"], data["decoder_input_tokens"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, data["decoder_target_tokens"]).mean()

  def train_step(state):
    p, o = state
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  train_step = jax.jit(train_step, donate_argnums=0, compiler_options=compiler.compiler_options())
  return timed_steps(train_step, (params, opt.init(params)), steps)


def hf_flax_step_times(cfg: model_lib.ModelConfig, targets: int, steps: int,
                       python: str, compiler_options: dict | None = None) -> list[float] | str:
  spec = dict(config=export.hf_config_dict(cfg), batch=BATCH, inputs=INPUTS, targets=targets,
              steps=steps, compiler_options=compiler_options)
  cmd = [python, str(ROOT / "benchmarks" / "hf_flax_t5_bench.py"), json.dumps(spec)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if result.returncode != 0:
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
  return json.loads(result.stdout.strip().splitlines()[-1])["step_seconds"]


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

  peak = matmul_peak()
  print(json.dumps(dict(bench="matmul_peak", n=4096, dtype="float32",
                        gflops_per_second=round(peak, 1), jax=jax.__version__)), flush=True)
  for shape in args.shapes.split(","):
    cfg = model_config(shape)
    for targets in map(int, args.targets.split(",")):
      ours = summary("ul2", cfg, shape, targets, ul2_step_times(cfg, targets, args.steps), peak)
      print(json.dumps(ours), flush=True)
      if not pathlib.Path(args.baseline_python).exists():
        print(json.dumps(dict(bench="hf_flax", shape=shape, targets=targets,
                              error=f"{args.baseline_python} missing: run "
                                    "benchmarks/setup_hf_flax_venv.sh")), flush=True)
        continue
      theirs = hf_flax_step_times(cfg, targets, args.steps, args.baseline_python)
      if isinstance(theirs, str):
        print(json.dumps(dict(bench="hf_flax", shape=shape, targets=targets, error=theirs)),
              flush=True)
        continue
      theirs = summary("hf_flax", cfg, shape, targets, theirs, peak)
      print(json.dumps(theirs), flush=True)
      ratio = dict(bench="ratio", shape=shape, targets=targets,
                   ul2_over_hf_flax=round(theirs["step_seconds"] / ours["step_seconds"], 3))
      # The same model with the XLA options ul2 sets on this backend: how much of
      # the ratio is the options rather than the model.
      options = compiler.compiler_options()
      if options:
        same = hf_flax_step_times(cfg, targets, args.steps, args.baseline_python, options)
        if not isinstance(same, str):
          same = summary("hf_flax_with_ul2_xla_options", cfg, shape, targets, same, peak)
          print(json.dumps(same), flush=True)
          ratio["ul2_over_hf_flax_with_ul2_xla_options"] = round(
              same["step_seconds"] / ours["step_seconds"], 3)
      print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
  sys.exit(main())
