"""Baseline for model_bench.py: Hugging Face's FlaxT5ForConditionalGeneration train step.

Runs in its own venv (transformers 4.57.6, jax/jaxlib 0.9.2, flax 0.12.6, optax;
benchmarks/setup_hf_flax_venv.sh) and imports nothing from ul2:

    .venv-hfflax/bin/python benchmarks/hf_flax_t5_bench.py '{"config": {...}, "batch": 8,
        "inputs": 512, "targets": 128, "steps": 5}'

The config is ul2.export.hf_config_dict of the same model. Same work as ours:
float32 (or "dtype": "bfloat16" activations), dropout off, mean token cross-entropy, optax AdamW, median of jitted
forward + backward + update steps after one compile and one warm-up step. Prints
one JSON line with the step times. With "serve": true in the spec it instead times
one step per "step" line on stdin (see `serve`), which model_bench.py uses to
interleave the baseline's steps with its own.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from transformers import FlaxT5ForConditionalGeneration, T5Config


def main(spec: dict) -> None:
  config = T5Config(**{k: v for k, v in spec["config"].items() if k != "architectures"})
  config.dropout_rate = 0.0
  # "dtype": the computation dtype (bfloat16: activations and matmul inputs;
  # parameters stay float32, as HF Flax keeps them).
  model = FlaxT5ForConditionalGeneration(config, seed=0,
                                         dtype=jnp.dtype(spec.get("dtype", "float32")))
  params = model.params
  b, li, lt = spec["batch"], spec["inputs"], spec["targets"]
  rng = np.random.default_rng(0)
  vocab = min(config.vocab_size, 32000)
  targets = jnp.asarray(rng.integers(3, vocab, (b, lt)), jnp.int32)
  decoder_inputs = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), targets[:, :-1]], axis=1)
  inputs = jnp.asarray(rng.integers(3, vocab, (b, li)), jnp.int32)
  opt = optax.adamw(1e-4)

  def loss_fn(p):
    logits = model(input_ids=inputs, attention_mask=jnp.ones_like(inputs),
                   decoder_input_ids=decoder_inputs, params=p, train=False).logits
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  def train_step(state):
    p, o = state
    grads = jax.grad(loss_fn)(p)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  # Optional: the XLA options ul2 uses on this backend, to separate their effect
  # from the model's (model_bench.py prints both).
  step = jax.jit(train_step, donate_argnums=0,
                 compiler_options=spec.get("compiler_options") or None)
  state = step((params, opt.init(params)))
  jax.block_until_ready(state)
  if spec.get("serve"):
    serve(step, state)
    return
  times = []
  for _ in range(spec["steps"] + 1):
    start = time.perf_counter()
    state = step(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  print(json.dumps(dict(step_seconds=times[1:], median=statistics.median(times[1:]),
                        transformers=transformers.__version__, jax=jax.__version__)))


def serve(step, state) -> None:
  """Interleaved mode (model_bench.py): after the compile, one timed step per "step"
  line on stdin, each answered with {"step_seconds": t}; ends at EOF. The caller
  alternates these steps with its own, so both sides see the same machine state."""
  print(json.dumps(dict(ready=True, transformers=transformers.__version__,
                        jax=jax.__version__)), flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    start = time.perf_counter()
    state = step(state)
    jax.block_until_ready(state)
    print(json.dumps(dict(step_seconds=time.perf_counter() - start)), flush=True)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
