"""Baseline for model_bench.py: Hugging Face's PyTorch T5ForConditionalGeneration train step.

Runs in the project's venv (transformers and the CPU build of torch are test
dependencies) and imports nothing from ul2:

    .venv/bin/python benchmarks/torch_t5_bench.py '{"config": {...}, "batch": 8,
        "inputs": 512, "targets": 128, "mode": "eager", "steps": 5}'

mode: "eager" (float32), "compile" (float32, `torch.compile` of the model with
inductor's defaults: its forward and, through AOTAutograd, its backward) or "bf16" (eager
under `torch.autocast("cpu", torch.bfloat16)`: matmuls in bfloat16, float32
parameters and optimiser, as ul2's bfloat16 rows). The config is
ul2.export.hf_config_dict of the same model. Same work as ul2's side: dropout off,
mean token cross-entropy of the logits, AdamW (lr 1e-4), `torch.set_num_threads`
as many as the cores given (`threads`, default all). With "serve": true it times one step per
"step" line on stdin and answers {"step_seconds": t} (model_bench.py interleaves
these with its other sides); otherwise it prints one JSON line of step times.
"""

import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration


def make_step(spec: dict):
  """-> (step, ready) : `step()` runs one forward + backward + AdamW update."""
  torch.manual_seed(0)
  torch.set_num_threads(int(spec.get("threads") or os.cpu_count()))
  config = T5Config(**{k: v for k, v in spec["config"].items() if k != "architectures"})
  config.dropout_rate = 0.0
  model = T5ForConditionalGeneration(config).train()
  b, li, lt = spec["batch"], spec["inputs"], spec["targets"]
  rng = np.random.default_rng(0)
  vocab = min(config.vocab_size, 32000)
  targets = torch.tensor(rng.integers(3, vocab, (b, lt)), dtype=torch.long)
  decoder_inputs = torch.cat([torch.zeros((b, 1), dtype=torch.long), targets[:, :-1]], 1)
  inputs = torch.tensor(rng.integers(3, vocab, (b, li)), dtype=torch.long)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  mode = spec["mode"]
  forward = torch.compile(model) if mode == "compile" else model
  autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else (
      contextlib.nullcontext)

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      logits = forward(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = losses.mean()
    loss.backward()
    optimizer.step()

  return step


def timed(step) -> float:
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def main(spec: dict) -> None:
  step = make_step(spec)
  step()  # Compile (torch.compile) and warm up.
  step()
  versions = dict(transformers=transformers.__version__, torch=torch.__version__)
  if spec.get("serve"):
    print(json.dumps(dict(ready=True, **versions)), flush=True)
    for line in sys.stdin:
      if line.strip() != "step":
        break
      print(json.dumps(dict(step_seconds=timed(step))), flush=True)
    return
  times = [timed(step) for _ in range(spec.get("steps", 5))]
  print(json.dumps(dict(step_seconds=times, median=statistics.median(times), **versions)))


if __name__ == "__main__":
  with torch.inference_mode(False):
    main(json.loads(sys.argv[1]))
