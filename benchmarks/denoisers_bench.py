"""Examples/s of ul2's 7-denoiser pipeline next to T5's own span corruption.

    .venv/bin/python benchmarks/denoisers_bench.py            # both, interleaved
    .venv/bin/python benchmarks/denoisers_bench.py --baseline=none

Both sides get the same tokens: the bundled corpus tokenised with the bundled
vocabulary, one document per paragraph (line) as in the corpus, or with
`--doc_tokens=N` cut into documents of N tokens. Both join the documents into one
stream and cut it into windows (T5's `reduce_concat_tokens` and `split_tokens`;
ul2's `merge_documents`), so they do the same work per example. Both read them from
the same in-memory `repeat()` source, with seqio's map seed set, and are drained the
same way (`skip` inside tf.data), so neither pays Python, or a sink, per example.

* ul2: `ul2.denoisers.mixture_of_denoisers` with the UL2 mixture (R1, R2, X1-X4, S) at
  inputs 512 / targets 512: joining, windows of each drawn denoiser's budget, spans,
  sentinels, mode token and EOS.
* T5: `t5.data.preprocessors.span_corruption` (select_random_chunk,
  reduce_concat_tokens, split_tokens, noise mask, sentinels) at inputs 512 / targets
  114, T5's own setting for 512-token inputs. It runs in a separate venv because
  t5==0.9.4 pulls seqio-nightly, which conflicts with seqio:

      python3.11 -m venv .venv-t5 && .venv-t5/bin/pip install t5==0.9.4

Each side runs `--repeats` times, alternating, and the script prints one JSON line
per run, then a summary line with the medians and their ratio. The machine has 2
cores shared with other work; run it under `flock /tmp/ul2-heavy.lock` and compare
numbers from the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = REPO / "ul2" / "assets" / "ul2_8k.model"
CORPUS = REPO / "ul2" / "assets" / "train.txt"
T5_PYTHON = REPO / ".venv-t5" / "bin" / "python"


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _measure(ds, num_examples: int, warmup: int) -> dict:
  """Examples/s and CPU time of draining `ds`; mean feature lengths from a warm-up run.

  The timed run drains `num_examples` with `skip` (in C++, no per-example function
  call), so the sink costs next to nothing for either side.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def add(state, ex):
    return (state[0] + 1, state[1] + tf.size(ex["inputs"], out_type=tf.int64),
            state[2] + tf.size(ex["targets"], out_type=tf.int64))

  ds = ds.prefetch(tf.data.AUTOTUNE)
  count, inputs, targets = ds.take(warmup).reduce((np.int64(0),) * 3, add)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  next(iter(ds.skip(num_examples - 1).take(1)))
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  return {"examples": num_examples, "seconds": round(wall, 3),
          "examples_per_second": round(num_examples / wall, 1),
          "cpu_us_per_example": round(cpu / num_examples * 1e6, 1),
          "mean_inputs_length": round(int(inputs) / int(count), 1),
          "mean_targets_length": round(int(targets) / int(count), 1)}


def _documents(path: str):
  """The documents written by `write_tokens`, as a repeated dataset of int32 [n]."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  saved = np.load(path)
  documents = tf.RaggedTensor.from_row_splits(saved["stream"], saved["splits"])
  # Plain int32 [n] elements, as a Task's tokenizer yields them, made once and cached.
  ds = tf.data.Dataset.from_tensor_slices({"targets": documents})
  return ds.map(lambda features: {"targets": tf.identity(features["targets"])}).cache().repeat()


def run_t5(tokens_path: str, num_examples: int, warmup: int, seed: int) -> dict:
  """T5's span corruption (run inside the t5 venv)."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from t5.data import preprocessors  # pylint: disable=import-outside-toplevel

  vocab = seqio.SentencePieceVocabulary(str(VOCAB), extra_ids=100)
  features = {"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)}
  with seqio.map_seed_manager(seed):
    ds = preprocessors.span_corruption(
        _documents(tokens_path), sequence_length={"inputs": 512, "targets": 114}, output_features=features)
  return {"impl": "t5.data.preprocessors.span_corruption", "lengths": "512/114",
          **_measure(ds, num_examples, warmup)}


def run_ul2(tokens_path: str, num_examples: int, warmup: int, seed: int) -> dict:
  """ul2's mixture of denoisers."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from ul2 import denoisers  # pylint: disable=import-outside-toplevel

  vocab = seqio.SentencePieceVocabulary(str(VOCAB), extra_ids=100)
  features = {"inputs": seqio.Feature(vocab, add_eos=False),
              "targets": seqio.Feature(vocab, add_eos=False)}
  with seqio.map_seed_manager(seed):
    ds = denoisers.mixture_of_denoisers(_documents(tokens_path), features,
                                        {"inputs": 512, "targets": 512})
  return {"impl": "ul2.denoisers.mixture_of_denoisers", "lengths": "512/512",
          "denoisers": [d.name for d in denoisers.UL2_DENOISERS],
          **_measure(ds, num_examples, warmup)}


def write_tokens(path: str, doc_tokens: int | None) -> dict:
  """Tokenises the bundled corpus into documents (its paragraphs, or `doc_tokens` each);
  returns facts about them."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import seqio  # pylint: disable=import-outside-toplevel

  vocab = seqio.SentencePieceVocabulary(str(VOCAB), extra_ids=100)
  lines = CORPUS.read_text(encoding="utf-8").splitlines()
  paragraphs = [np.asarray(ids, np.int32) for ids in vocab.tokenizer.encode(lines) if ids]
  stream = np.concatenate(paragraphs)
  if doc_tokens is None:
    lengths = np.array([len(p) for p in paragraphs])
  else:
    lengths = np.full(len(stream) // doc_tokens, doc_tokens)
  splits = np.concatenate([[0], np.cumsum(lengths)])
  np.savez(path, stream=stream, splits=splits)
  return {"documents": int(len(lengths)), "median_doc_tokens": float(np.median(lengths)),
          "corpus_tokens": int(len(stream))}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_examples", type=int, default=50000, help="per ul2 run")
  parser.add_argument("--t5_num_examples", type=int, default=10000, help="per T5 run")
  parser.add_argument("--warmup", type=int, default=2000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--doc_tokens", type=int, default=None,
                      help="tokens per document (default: the corpus's paragraphs)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--baseline", choices=["t5", "none"], default="t5")
  parser.add_argument("--t5_python", default=str(T5_PYTHON),
                      help="python of a venv with t5==0.9.4")
  parser.add_argument("--worker", choices=["t5", "ul2"], help=argparse.SUPPRESS)
  parser.add_argument("--tokens", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.worker:  # One measurement in this process, printed as JSON.
    run = run_t5 if args.worker == "t5" else run_ul2
    n = args.t5_num_examples if args.worker == "t5" else args.num_examples
    print(json.dumps(run(args.tokens, n, args.warmup, args.seed)), flush=True)
    return 0

  if args.baseline == "t5" and not pathlib.Path(args.t5_python).exists():
    print(json.dumps({"error": f"no T5 venv at {args.t5_python}; create it with: python3.11 "
                               "-m venv .venv-t5 && .venv-t5/bin/pip install t5==0.9.4, or "
                               "pass --baseline=none"}))
    return 2
  results: dict[str, list[float]] = {"ul2": [], "t5": []}
  with tempfile.TemporaryDirectory() as tmp:
    tokens = os.path.join(tmp, "tokens.npz")
    print(json.dumps({"setup": write_tokens(tokens, args.doc_tokens)}), flush=True)
    common = ["--tokens", tokens, "--warmup", str(args.warmup), "--seed", str(args.seed),
              "--num_examples", str(args.num_examples),
              "--t5_num_examples", str(args.t5_num_examples)]
    sides = [("ul2", sys.executable)]
    if args.baseline == "t5":
      sides.append(("t5", args.t5_python))
    for repeat in range(args.repeats):
      for name, python in sides:
        out = subprocess.run([python, __file__, "--worker", name, *common], check=True,
                             capture_output=True, text=True, cwd=REPO).stdout
        line = json.loads(out.strip().splitlines()[-1])
        line["repeat"] = repeat
        results[name].append(line["examples_per_second"])
        print(json.dumps(line), flush=True)
  summary = {"summary": True, "ul2_examples_per_second": statistics.median(results["ul2"])}
  if results["t5"]:
    summary["t5_examples_per_second"] = statistics.median(results["t5"])
    summary["ratio"] = round(summary["ul2_examples_per_second"] /
                             summary["t5_examples_per_second"], 2)
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
