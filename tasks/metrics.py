"""Metric functions for supervised tasks, named by strings (seqio's `metric_fns`).

    fns = metric_fns(("accuracy", "rouge"))   # [accuracy, rouge]
    accuracy(targets=["a", "b"], predictions=["a", "c"])  # {"accuracy": 50.0}

Each takes postprocessed target and prediction strings and returns a dict of
floats on T5's 0-100 scale, as `t5.evaluation.metrics` does:

* "accuracy": predictions equal to their target (T5's `accuracy`, a string ==).
* "exact_match": the same after SQuAD's answer normalisation (lower case, no
  punctuation, no articles, single spaces), as the "em" of T5's `squad`.
* "rouge": rouge1, rouge2 and rougeLsum F-measures through `rouge-score`, sentences
  put on lines for rougeLsum as T5 does. The mean over examples (T5 reports the
  mid of a bootstrap of the same mean, which is random; the mean is reproducible).
* "bleu": corpus BLEU through `sacrebleu` with T5's settings (the "intl"
  tokenizer, "exp" smoothing, case-sensitive).

The libraries are imported when a metric is computed, so registering a task needs
neither.
"""

from __future__ import annotations

import re
import string
from typing import Callable, Sequence

import numpy as np

MetricFn = Callable[[Sequence[str], Sequence[str]], dict[str, float]]
ROUGE_KEYS = ("rouge1", "rouge2", "rougeLsum")


def _check(targets: Sequence[str], predictions: Sequence[str]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions equal to their target."""
  _check(targets, predictions)
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))
          if targets else 0.0}


def normalize_answer(text: str) -> str:
  """SQuAD's normalisation: lower case, no punctuation, no a/an/the, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions equal to their target after `normalize_answer`."""
  _check(targets, predictions)
  same = [normalize_answer(t) == normalize_answer(p) for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(same)) if same else 0.0}


def _sentences_on_lines(text: str) -> str:
  # T5's `_prepare_summary`: rougeLsum splits summaries into sentences at newlines.
  return text.replace(" . ", " .\n")


def rouge(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Mean rouge1 / rouge2 / rougeLsum F-measure (x100) through `rouge-score`."""
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  _check(targets, predictions)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS))
  scores = {key: [] for key in ROUGE_KEYS}
  for target, prediction in zip(targets, predictions):
    result = scorer.score(target=_sentences_on_lines(target),
                          prediction=_sentences_on_lines(prediction))
    for key in ROUGE_KEYS:
      scores[key].append(result[key].fmeasure)
  return {key: 100.0 * float(np.mean(values)) if values else 0.0
          for key, values in scores.items()}


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU through `sacrebleu`, with T5's settings."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  _check(targets, predictions)
  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method="exp",
                                smooth_value=0.0, force=False, lowercase=False,
                                tokenize="intl", use_effective_order=False)
  return {"bleu": float(score.score)}


METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "bleu": bleu,
    "exact_match": exact_match,
    "rouge": rouge,
}


def metric_fns(names: Sequence[str]) -> list[MetricFn]:
  """The metric functions of `names`; a ValueError listing the known names if one is not."""
  if isinstance(names, str):
    names = (names,)
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(sorted(METRICS))}")
  if len(set(names)) != len(names):
    raise ValueError(f"metrics {list(names)} name one metric twice")
  return [METRICS[n] for n in names]
