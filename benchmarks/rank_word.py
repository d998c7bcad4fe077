"""Rank classification of `local_word`: seqio's `rank_classification`, T5X's
`score_batch`, the way T5X/seqio evaluate a task when free generation is too hard
for a small model.

What it builds: for each validation passage of `local_word`
(ul2/assets/word_validation.jsonl), K candidate answers: the true word and K-1
distractors drawn without replacement, seeded, from the training split's answer
distribution (word_train.jsonl's targets, weighted by how often each is an answer),
never the true word itself. The true word's position among the K is drawn too.

How it scores: every (passage, candidate) pair goes through `ul2 infer --score
--mode_token=[NLU]` in-process (`ul2.main.main`), i.e. `[NLU] passage EOS` ->
`candidate EOS`, tokenised as in training; a candidate's score is the summed
log-likelihood of its tokens, EOS included (seqio's default: no length
normalisation). A passage is correct when the true word scores strictly highest.

It prints one JSON line per model (`accuracy`, in %), then `prior`, the expected
accuracy of a model that knows only answer frequencies (it picks the candidate
answered most often in training, ties broken uniformly), and `chance`, 100/K:

    python benchmarks/rank_word.py --k=4 runs/word runs/word_scratch
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import pathlib
import sys
import tempfile
from typing import Sequence

import numpy as np

from ul2 import assets

NLU = "[NLU]"


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def build_candidates(answers: Sequence[str], truths: Sequence[str], k: int,
                     seed: int = 0) -> list[tuple[list[str], int]]:
  """For each true word: (K distinct candidates, the true word's index). The K-1
  distractors are drawn without replacement from `answers`' distribution (each
  distinct answer weighted by its count), excluding the true word."""
  counts = collections.Counter(answers)
  words = sorted(counts)
  weights = np.array([counts[w] for w in words], dtype=np.float64)
  if len(words) < k:
    raise ValueError(f"K={k} needs at least {k} distinct answers, not {len(words)}")
  index = {w: i for i, w in enumerate(words)}
  rng = np.random.default_rng(seed)
  out = []
  for truth in truths:
    p = weights.copy()
    if truth in index:
      p[index[truth]] = 0.0
    picks = rng.choice(len(words), size=k - 1, replace=False, p=p / p.sum())
    candidates = [words[i] for i in picks]
    at = int(rng.integers(k))
    candidates.insert(at, truth)
    out.append((candidates, at))
  return out


def prior_accuracy(answers: Sequence[str], sets: Sequence[tuple[list[str], int]]) -> float:
  """Expected accuracy (%) of picking the candidate most often answered in training,
  ties broken uniformly."""
  counts = collections.Counter(answers)
  total = 0.0
  for candidates, at in sets:
    c = [counts[w] for w in candidates]
    best = max(c)
    if c[at] == best:
      total += 1.0 / c.count(best)
  return 100.0 * total / len(sets)


def rank_accuracy(scores: Sequence[float], sets: Sequence[tuple[list[str], int]]) -> float:
  """Accuracy (%) given each candidate's score, flattened in `sets` order."""
  if len(scores) != sum(len(c) for c, _ in sets):
    raise ValueError("one score per candidate")
  correct, i = 0, 0
  for candidates, at in sets:
    s = scores[i:i + len(candidates)]
    i += len(candidates)
    correct += all(s[at] > v for j, v in enumerate(s) if j != at)
  return 100.0 * correct / len(sets)


def score(model_dir: str, passages: Sequence[str], sets: Sequence[tuple[list[str], int]],
          work_dir: pathlib.Path, batch_size: int) -> list[float]:
  """`ul2 infer --score` of every (passage, candidate); scores in input order."""
  inp, out = work_dir / "candidates.jsonl", work_dir / "scores.jsonl"
  with inp.open("w", encoding="utf-8") as f:
    for passage, (candidates, _) in zip(passages, sets):
      for c in candidates:
        f.write(json.dumps({"inputs": passage, "targets": c}) + "\n")
  from ul2 import main  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(sys.stderr):  # stdout: our JSON lines only.
    rc = main.main(["infer", f"--model_dir={model_dir}", f"--input_file={inp}",
                    f"--output_file={out}", "--score", f"--mode_token={NLU}",
                    f"--batch_size={batch_size}"])
  if rc:
    raise SystemExit(f"rank_word: ul2 infer failed on {model_dir} (exit {rc})")
  return [r["score"] for r in read_jsonl(out)]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("model_dirs", nargs="*", help="ul2 model_dirs (latest step)")
  parser.add_argument("--k", type=int, default=4, help="candidates per passage")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args(argv)
  answers = [r["targets"] for r in read_jsonl(assets.WORD_TRAIN)]
  validation = read_jsonl(assets.WORD_VALIDATION)
  sets = build_candidates(answers, [r["targets"] for r in validation], args.k, args.seed)
  passages = [r["inputs"] for r in validation]
  common = {"k": args.k, "seed": args.seed, "passages": len(sets)}
  for model_dir in args.model_dirs:
    with tempfile.TemporaryDirectory() as tmp:
      scores = score(model_dir, passages, sets, pathlib.Path(tmp), args.batch_size)
    print(json.dumps({"model": model_dir, "accuracy": round(rank_accuracy(scores, sets), 2),
                      **common}), flush=True)
  print(json.dumps({"model": "prior (answer frequencies)",
                    "accuracy": round(prior_accuracy(answers, sets), 2), **common}))
  print(json.dumps({"model": "chance", "accuracy": round(100.0 / args.k, 2), **common}))


if __name__ == "__main__":
  main()
