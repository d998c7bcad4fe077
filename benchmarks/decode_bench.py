"""Decoding speed of `ul2 infer` against Hugging Face transformers' `generate` (PyTorch).

    flock /tmp/ul2_heavy.lock .venv/bin/python benchmarks/decode_bench.py
        [--shape small] [--batches 8,64] [--decodes greedy,beam] [--rounds 3]
        [--rounds_large 2]

Prints JSON lines: per (batch, decode) one line for `ul2`, one for `transformers`
and one `ratio` line (ul2 tokens/s over transformers' tokens/s).

Both sides decode the same model, T5 v1.1 small (gin/models/small.gin, float32,
random weights; transformers gets ul2's through `ul2.export`), on the same batch
of random inputs of 512 tokens (no padding), 128 new tokens at most: greedy, and
beam search with 4 beams and no length penalty (there the two algorithms are the
same: `ul2.decoding`). ul2 runs the jitted function `ul2 infer` runs
(`ul2.infer.decode_fn`), with one XLA:CPU device per core and the batch split
over them as `ul2 infer` runs (`devices`), compiled before timing; transformers runs `generate`
under `torch.inference_mode()` with its key/value cache on (`use_cache=True`, the
default dynamic cache), after one warm-up call. Both use every core: torch with
as many threads as the cores this process may use, the size of XLA:CPU's pool
(`threads` in each line). The sides alternate, one call each per round, so a drift of the
shared machine hits both alike; each side's median over the rounds is reported.
`same_output_rows` is the fraction of rows where both returned the same ids. Tokens counted are those
returned per row (the best beam), up to EOS inclusive; both sides stop a row at
EOS and stop early only when every row has. With random weights no row ends
early: `full_length` says every row of both sides ran all 128 steps, so both did
the same number of decoder steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

from ul2 import assets, export, infer, sharding
from ul2 import model as model_lib
from model_bench import model_config  # The same float32 shapes as the train-step benchmark.

ROOT = pathlib.Path(__file__).resolve().parent.parent
INPUTS, NEW_TOKENS, BEAMS = 512, 128, 4


def random_params(cfg: model_lib.ModelConfig) -> dict:
  """ul2's own initialisation (as `ul2 train` starts), on the host."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  model = model_lib.Transformer(cfg)
  tokens = jax.numpy.ones((1, 1), jax.numpy.int32)
  init = jax.jit(lambda: nn.unbox(
      model.init({"params": jax.random.key(0)}, tokens, tokens)["params"]))
  return jax.device_get(init())


def count_tokens(rows: np.ndarray) -> int:
  total = 0
  for row in rows:
    ends = np.flatnonzero(row == 1)
    total += ends[0] + 1 if ends.size else row.size
  return int(total)


class Ul2Side:
  def __init__(self, cfg, params, inputs, decode):
    mesh = sharding.make_mesh(sharding.MeshConfig())
    self.params = infer.place_params(params, cfg, mesh)
    # As `ul2.infer.run`: "auto" choices resolved for the mesh.
    cfg = cfg.resolved(sharding.platform(mesh), sharding.data_parallel_size(mesh))
    self.mesh = mesh
    self.options = infer.Options(decode=decode, num_beams=BEAMS, length_penalty=0.0,
                                 max_decode_length=NEW_TOKENS, batch_size=len(inputs))
    self.fn = infer.decode_fn(cfg, self.options)
    self.inputs = jax.device_put(inputs, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES)))
    self.targets = jax.numpy.zeros((len(inputs), 1), jax.numpy.int32)
    self.keys = jax.random.split(jax.random.key(0), len(inputs))
    self.run()  # Compile.

  def run(self) -> tuple[float, np.ndarray]:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
      tokens = jax.block_until_ready(
          self.fn(self.params, self.inputs, self.targets, self.keys)[0])
    return time.perf_counter() - start, np.asarray(tokens)


class TorchSide:
  def __init__(self, cfg, params, inputs, decode):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    self.torch = torch
    with tempfile.TemporaryDirectory() as tmp:  # The exported model, as users load it.
      export.save_hf(params, cfg, assets.VOCAB_PATH, tmp)
      self.model = transformers.T5ForConditionalGeneration.from_pretrained(tmp).eval()
    self.inputs = torch.tensor(inputs, dtype=torch.long)
    self.kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                       eos_token_id=1, decoder_start_token_id=0, use_cache=True)
    if decode == "beam":
      self.kwargs.update(num_beams=BEAMS, length_penalty=0.0, early_stopping=False)
    else:
      self.kwargs.update(num_beams=1)
    self.run()  # Warm-up, as ul2's compile.

  def run(self) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    with self.torch.inference_mode():
      out = self.model.generate(input_ids=self.inputs,
                                attention_mask=self.inputs != 0, **self.kwargs)
    return time.perf_counter() - start, out[:, 1:].numpy()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="small")
  parser.add_argument("--batches", default="8,64")
  parser.add_argument("--decodes", default="greedy,beam")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--rounds_large", type=int, default=2,
                      help="rounds for batch >= 64 with beam search")
  args = parser.parse_args(argv)
  infer.cpu_device_per_core()  # As `ul2 infer`: one XLA:CPU device per core.
  import torch  # pylint: disable=import-outside-toplevel
  threads = len(os.sched_getaffinity(0))  # The cores XLA:CPU's thread pool uses.
  torch.set_num_threads(threads)
  cfg = model_config(args.shape)
  params = random_params(cfg)
  for batch in [int(b) for b in args.batches.split(",")]:
    inputs = np.random.default_rng(batch).integers(3, min(cfg.vocab_size, 32000), (batch, INPUTS)).astype(np.int32)
    for decode in args.decodes.split(","):
      rounds = args.rounds_large if batch >= 64 and decode == "beam" else args.rounds
      sides = {"ul2": Ul2Side(cfg, params, inputs, decode),
               "transformers": TorchSide(cfg, params, inputs, decode)}
      times = {name: [] for name in sides}
      tokens = {}
      for _ in range(rounds):
        for name, side in sides.items():
          seconds, out = side.run()
          times[name].append(seconds)
          tokens[name] = count_tokens(out)
          if name == "ul2":
            first_ul2 = out
          else:
            same = float(np.mean([list(a[:count_tokens(a[None])]) == list(
                b[:count_tokens(b[None])]) for a, b in zip(first_ul2, out)]))
      result = {}
      for name in sides:
        median = statistics.median(times[name])
        result[name] = tokens[name] / median
        print(json.dumps(dict(bench="decode", side=name, shape=args.shape, batch=batch,
                              decode=decode, beams=BEAMS if decode == "beam" else 1,
                              inputs=INPUTS, new_tokens=NEW_TOKENS, rounds=rounds,
                              threads=threads, devices=jax.device_count() if name == "ul2"
                              else 1, tokens=tokens[name],
                              seconds_median=round(median, 3),
                              seconds=[round(t, 3) for t in times[name]],
                              tokens_per_second=round(result[name], 1))), flush=True)
      print(json.dumps(dict(bench="decode", side="ratio", shape=args.shape, batch=batch,
                            decode=decode, ratio=round(result["ul2"] / result["transformers"], 3),
                            same_output_rows=same,
                            full_length=all(t == batch * NEW_TOKENS for t in tokens.values()))),
            flush=True)
      del sides


if __name__ == "__main__":
  main()
