"""The train step's matmuls alone: XLA:CPU (with ul2's compiler options) against torch.

    flock /tmp/ul2_heavy.lock .venv/bin/python benchmarks/dot_bench.py [--rounds 5]

Prints one JSON line per (dtype, shape): GFLOP/s of `jnp.dot` (jitted with
`ul2.compiler.compiler_options("cpu", dtype)`, float32 accumulation) and of
`torch.matmul` (oneDNN, every core), median over the rounds. The shapes are the
small model's at batch 8 x 512 tokens (4096 rows): the gated MLP's wi and wo, the
attention projections, the output layer, the weight gradients (contracting over the
4096 tokens), and a 4096^2 square as the peak. It says whether the train step's gap
to PyTorch (model_bench.py) is in the dots or around them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import torch

from ul2 import compiler

ROWS, D_MODEL, D_FF, INNER, VOCAB = 4096, 512, 1024, 384, 32128
SHAPES = {  # name: (m, k, n)
    "mlp wi (gated)": (ROWS, D_MODEL, 2 * D_FF),
    "mlp wo": (ROWS, D_FF, D_MODEL),
    "attention q/k/v": (ROWS, D_MODEL, INNER),
    "attention o": (ROWS, INNER, D_MODEL),
    "logits": (ROWS, D_MODEL, VOCAB),
    "grad of wi": (D_MODEL, ROWS, D_FF),
    "grad of wo": (D_FF, ROWS, D_MODEL),
    "square (peak)": (4096, 4096, 4096),
}


def median_seconds(fn, rounds: int) -> float:
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  for dtype in ("float32", "bfloat16"):
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    for name, (m, k, n) in SHAPES.items():
      a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
      compiled = dot.lower(a, b).compile(compiler.compiler_options("cpu", dtype))
      xla = median_seconds(lambda: compiled(a, b).block_until_ready(), args.rounds)
      ta = torch.ones((m, k), dtype=getattr(torch, dtype))
      tb = torch.ones((k, n), dtype=getattr(torch, dtype))
      with torch.inference_mode():
        pt = median_seconds(lambda: torch.matmul(ta, tb), args.rounds)
      gflop = 2 * m * k * n / 1e9
      print(json.dumps({"dtype": dtype, "dot": name, "shape": [m, k, n],
                        "xla_gflops": round(gflop / xla, 1),
                        "torch_gflops": round(gflop / pt, 1),
                        "xla_over_torch": round(pt / xla, 2)}), flush=True)


if __name__ == "__main__":
  main()
