"""Supervised evaluation: decode a task's validation split, score it with the task's metrics.

    evaluator = SupervisedEvaluator("local_title", {"inputs": 128, "targets": 32},
                                    batch_size=32)        # once, before the loop
    metrics = evaluator(params, config, mesh, step=step, model_dir=DIR)
    # {"eval/local_title/accuracy": 41.3}; DIR/inference/local_title-<step>.jsonl

T5X's inference evaluation, through `seqio.Evaluator`: the tasks of a mixture (or the
task) that have metric functions and the split are evaluated, each example once, in
order, with its features converted by `seqio.EncDecFeatureConverter` (no packing) at
the given lengths. Predictions are greedy (`ul2.infer.run`, i.e. batched, jitted
`ul2.decoding.sample` at temperature 0, rows split over the mesh's data axes), up
to the targets length. seqio decodes them, applies the task's postprocessor and
calls its `metric_fns` on the targets (`targets_pretokenized` where the task keeps
it). The predictions go to `DIR/inference/<task>-<step>.jsonl`, one object per
example: `inputs`, `targets`, `prediction`, `prediction_ids` (EOS included).

Tasks without metrics (UL2 pre-training tasks) are skipped: an evaluator of a
pre-training mixture has no `tasks` and returns {}.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from ul2 import infer
from ul2 import model as model_lib

INFERENCE_DIR = "inference"


def _text(value: Any) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


class SupervisedEvaluator:
  """A seqio.Evaluator over a mixture or task's split, with greedy ul2 decoding."""

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *,
               batch_size: int, split: str = "validation", num_examples: int | None = None):
    """Reads and caches the split of every task with metrics (TensorFlow side).

    Args:
      mixture_or_task_name: a registered task or mixture.
      task_feature_lengths: {"inputs", "targets"}: inputs are cut to the first,
        predictions are at most the second long (EOS included).
      batch_size: examples decoded together (rounded up to the data-parallel size).
      split: the split to evaluate.
      num_examples: at most this many examples of each task (default: all).
    """
    import seqio  # pylint: disable=import-outside-toplevel  (TensorFlow)
    from ul2 import data  # pylint: disable=import-outside-toplevel
    data.provider(mixture_or_task_name)  # A ValueError naming close names if unknown.
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.lengths = {"inputs": int(task_feature_lengths["inputs"]),
                    "targets": int(task_feature_lengths["targets"])}
    self.batch_size = batch_size
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=split, sequence_length=dict(self.lengths), num_examples=num_examples,
        use_memory_cache=True, async_compute_metrics=False)

  @property
  def tasks(self) -> list[str]:
    """The names of the tasks evaluated (those with metrics and the split)."""
    return [t.name for t in self._evaluator.eval_tasks]

  def __call__(self, params: Any, config: model_lib.ModelConfig, mesh: jax.sharding.Mesh, *,
               step: int, model_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Decodes every task's split with `params` and returns `eval/<task>/<metric>`.

    Args:
      params: the model's params (on `mesh`, e.g. a train state's).
      config: their ModelConfig (dropout is off when decoding).
      mesh: the device mesh; batch rows are split over its data axes.
      step: the training step, for the predictions' file name.
      model_dir: where `inference/<task>-<step>.jsonl` go (process 0 writes them);
        None: not written.
    """
    if not self.tasks:
      return {}
    vocabularies = {t.name: t.output_features["targets"].vocabulary
                    for t in self._evaluator.eval_tasks}
    predictions: dict[str, list[dict]] = {}
    order = iter(self.tasks)  # seqio calls predict_fn once per task, in this order.

    def predict_fn(dataset, model_feature_shapes=None):
      del model_feature_shapes
      task = next(order)
      model = infer.Model(params, config, vocabularies[task], self.lengths["inputs"],
                          self.lengths["targets"], mesh, source=f"step {step}")
      indices, examples = [], []
      for index, features in dataset.as_numpy_iterator():
        row = features["encoder_input_tokens"]
        indices.append(int(index))
        examples.append(infer.Example("", tuple(int(t) for t in row[row != 0])))
      options = infer.Options(decode="greedy", max_decode_length=self.lengths["targets"],
                              batch_size=self.batch_size)
      results, _ = infer.run(model, examples, options)
      predictions[task] = results
      # Rows of one length, 0 after EOS, as T5X's predict_batch gives them (seqio
      # stacks them into one array, and its decode stops at EOS).
      width = self.lengths["targets"]
      return [(i, r["prediction_ids"] + [0] * (width - len(r["prediction_ids"])))
              for i, r in zip(indices, results)]

    all_metrics, _ = self._evaluator.evaluate(compute_metrics=True, step=step,
                                              predict_fn=predict_fn)
    out = {}
    for task, values in all_metrics.result().items():
      for metric, value in values.items():
        out[f"eval/{task}/{metric}"] = float(np.asarray(getattr(value, "value", value)))
    if model_dir is not None and jax.process_index() == 0:
      for task, results in predictions.items():
        self._write(epath.Path(model_dir), task, step, results)
    return out

  def _write(self, model_dir: epath.Path, task: str, step: int, results: list[dict]) -> None:
    examples = self._evaluator.cached_task_datasets[task].as_numpy_iterator()
    vocabulary = self._evaluator.eval_tasks[self.tasks.index(task)].output_features[
        "targets"].vocabulary
    path = model_dir / INFERENCE_DIR / f"{task}-{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
      for ex, result in zip(examples, results):
        inputs = ex.get("inputs_pretokenized", None)
        targets = ex.get("targets_pretokenized", None)
        record = {
            "inputs": _text(inputs) if inputs is not None else vocabulary.decode(
                ex["inputs"].tolist()),
            "targets": _text(targets) if targets is not None else vocabulary.decode(
                ex["targets"].tolist()),
            "prediction": result["prediction"],
            "prediction_ids": result["prediction_ids"],
        }
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def evaluate(params: Any, config: model_lib.ModelConfig, mesh: jax.sharding.Mesh,
             mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *,
             batch_size: int, step: int, model_dir: str | os.PathLike | None = None,
             split: str = "validation") -> dict[str, float]:
  """One evaluation without keeping the evaluator (see `SupervisedEvaluator`)."""
  evaluator = SupervisedEvaluator(mixture_or_task_name, task_feature_lengths,
                                  batch_size=batch_size, split=split)
  return evaluator(params, config, mesh, step=step, model_dir=model_dir)
