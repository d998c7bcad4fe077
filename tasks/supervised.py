"""Supervised seqio tasks: (inputs, targets) text pairs, a mode token, metrics.

    register_supervised_task(
        "my_task",
        text_glob={"train": "/data/train-*.jsonl", "validation": "/data/dev.tsv"},
        mode_token="[NLU]", metrics=("accuracy",))
    register_mixture("my_mixture", {"my_task": 1.0, "other_task": 3.0})

Sources:

* JSONL files (`.jsonl`, `.json`): one JSON object per line, with string fields
  `inputs_key` and `targets_key` (other fields are ignored).
* TSV files (`.tsv`): a header line naming the columns (it must name `inputs_key`
  and `targets_key`), then one record per line, fields separated by tabs (no
  quoting: a field holds no tab or newline).
* TFDS: `tfds_name` (and `tfds_data_dir`); the features `inputs_key` and
  `targets_key` are taken as the inputs and targets.

`text_glob` is a glob (or list of globs) for the "train" split, or a mapping
split -> glob(s), as in `register_ul2_task`. A file line without the fields is a
ValueError naming the file and line: `check_split(task, split)` reads a split's
files up front (ul2.data.check calls it before building a pipeline), and reading
raises the same error.

The preprocessors, in order: tokenise (keeping `inputs_pretokenized` and
`targets_pretokenized` for evaluation), prepend the task's mode token to the inputs
(UL2's mode switching: `[NLU]` for understanding, `[S2S]` for generation, `[NLG]`
for open-ended text; None for none), trim to the feature lengths and append EOS
(seqio's `append_eos_after_trim`, so the mode token and EOS are always kept). The
metrics are named by strings from `tasks.metrics.METRICS`.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from tasks import metrics as metrics_lib
from ul2 import assets
from ul2 import denoisers as denoisers_lib
from ul2 import jsonl

MODE_TOKENS = (None, denoisers_lib.NLU, denoisers_lib.S2S, denoisers_lib.NLG)
JSON_SUFFIXES = (".jsonl", ".json")
TSV_SUFFIXES = (".tsv",)

Globs = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def split_globs(text_glob: Globs) -> dict[str, list[str]]:
  """A glob, a list of globs (both: the "train" split) or split -> glob(s)."""
  def patterns(globs):
    return ([os.fspath(globs)] if isinstance(globs, (str, os.PathLike)) else
            [os.fspath(g) for g in globs])
  if isinstance(text_glob, Mapping):
    return {split: patterns(globs) for split, globs in text_glob.items()}
  return {"train": patterns(text_glob)}


def read_records(path: str, inputs_key: str = "inputs", targets_key: str = "targets"
                 ) -> Iterator[tuple[str, str]]:
  """(inputs, targets) of each record of a JSONL or TSV file; blank lines are skipped.

  Raises:
    ValueError: naming the file and line, for a line that is not a record with
      string fields `inputs_key` and `targets_key`.
  """
  if path.endswith(TSV_SUFFIXES):
    yield from _tsv_records(path, inputs_key, targets_key)
    return
  with tf.io.gfile.GFile(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      line = raw.decode("utf-8", errors="replace").strip()
      if not line:
        continue
      where = f"{path}:{n}"
      record = jsonl.parse_object(line, where)
      for key in (inputs_key, targets_key):
        if key not in record:
          raise ValueError(f"{where}: no {key!r} field (it has {sorted(record)})")
        if not isinstance(record[key], str):
          raise ValueError(f"{where}: {key!r} is not a string")
      yield record[inputs_key], record[targets_key]


def _tsv_records(path: str, inputs_key: str, targets_key: str) -> Iterator[tuple[str, str]]:
  with tf.io.gfile.GFile(path, "rb") as f:
    lines = (raw.decode("utf-8", errors="replace").rstrip("\r\n") for raw in f)
    header = next(lines, None)
    if header is None:
      return
    columns = next(csv.reader([header], delimiter="\t", quoting=csv.QUOTE_NONE))
    missing = [k for k in (inputs_key, targets_key) if k not in columns]
    if missing:
      raise ValueError(f"{path}:1: the header names no {missing[0]!r} column (it has "
                       f"{columns}); a TSV file starts with a header line")
    i, t = columns.index(inputs_key), columns.index(targets_key)
    for n, line in enumerate(lines, 2):
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) != len(columns):
        raise ValueError(f"{path}:{n}: {len(fields)} tab-separated fields, the header has "
                         f"{len(columns)}")
      yield fields[i], fields[t]


@tf.autograph.experimental.do_not_convert  # A Python generator: nothing to convert.
def _records_dataset(path: tf.Tensor, inputs_key: str, targets_key: str) -> tf.data.Dataset:
  def generate(path: bytes):
    yield from read_records(path.decode(), inputs_key, targets_key)
  return tf.data.Dataset.from_generator(
      generate, args=(path,),
      output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string))
  ).map(lambda inputs, targets: {"inputs": inputs, "targets": targets})


class RecordFileSource(seqio.FileDataSource):
  """JSONL or TSV files of (inputs, targets) records: {"inputs", "targets"} strings."""

  def __init__(self, globs: Mapping[str, Sequence[str]], inputs_key: str, targets_key: str):
    for pattern in (p for ps in globs.values() for p in ps):
      if not pattern.endswith(JSON_SUFFIXES + TSV_SUFFIXES):
        raise ValueError(f"supervised files {pattern!r}: use .jsonl (or .json) or .tsv files")
    self.inputs_key, self.targets_key = inputs_key, targets_key
    super().__init__(
        read_file_fn=functools.partial(_records_dataset, inputs_key=inputs_key,
                                       targets_key=targets_key),
        split_to_filepattern={split: list(ps) for split, ps in globs.items()},
        cycle_length=1, block_length=1)

  def check(self, split: str) -> int:
    """Reads every record of the split's files; returns how many there are."""
    files = self.list_shards(split)
    if not files:
      raise FileNotFoundError(f"no files match {', '.join(self._split_to_filepattern[split])}")  # pylint: disable=protected-access
    return sum(1 for f in files for _ in read_records(f, self.inputs_key, self.targets_key))


def prepend_mode_token(dataset: tf.data.Dataset,
                       output_features: Mapping[str, seqio.Feature], *,
                       mode_token: str | None) -> tf.data.Dataset:
  """seqio preprocessor: the mode token's ids (ul2.denoisers.mode_token_ids) before
  the tokenised inputs."""
  ids = denoisers_lib.mode_token_ids(output_features["inputs"].vocabulary, mode_token)
  if not ids:
    return dataset
  prefix = tf.constant(ids, tf.int32)

  @tf.autograph.experimental.do_not_convert
  def prepend(features):
    return {**features,
            "inputs": tf.concat([prefix, tf.cast(features["inputs"], tf.int32)], axis=0)}

  return dataset.map(prepend, num_parallel_calls=tf.data.AUTOTUNE)


_SENTINEL = re.compile(r"<extra_id_\d+>")


def first_span(text: str, example: Any = None, is_target: bool = False) -> str:
  """seqio postprocessor of span-corruption targets: the text after the first sentinel
  (`<extra_id_N>`) up to the next one, stripped ("<extra_id_0> island" -> "island");
  text without a sentinel is only stripped."""
  del example, is_target
  parts = _SENTINEL.split(text)
  return (parts[1] if len(parts) > 1 else parts[0]).strip()


def check_mode_token(mode_token: str | None, where: str) -> None:
  if mode_token not in MODE_TOKENS:
    raise ValueError(f"{where}: mode_token must be one of "
                     f"{', '.join(repr(t) for t in MODE_TOKENS)}, got {mode_token!r}")


def register_supervised_task(
    name: str,
    *,
    text_glob: Globs | None = None,
    tfds_name: str | None = None,
    tfds_data_dir: str | None = None,
    inputs_key: str = "inputs",
    targets_key: str = "targets",
    mode_token: str | None = None,
    metrics: Sequence[str] = (),
    vocab_path: str | os.PathLike = assets.VOCAB_PATH,
    extra_ids: int = assets.EXTRA_IDS,
    shuffle_buffer_size: int = 1000,
    postprocess_fn: Callable[..., Any] | None = None,
) -> str:
  """Registers (or replaces) a supervised seqio Task and returns its name.

  Args:
    name: the task name.
    text_glob: JSONL or TSV files: a glob (or list) for "train", or split -> glob(s).
    tfds_name: a TFDS dataset instead of files, e.g. "glue/sst2:2.0.0".
    tfds_data_dir: where TFDS finds it (default: TFDS's own).
    inputs_key, targets_key: the fields (JSONL), columns (TSV) or features (TFDS)
      holding the inputs and targets text.
    mode_token: prepended to the inputs: None, "[NLU]", "[S2S]" or "[NLG]".
    metrics: names from `tasks.metrics.METRICS` ("accuracy", "bleu",
      "exact_match", "rouge"), computed on the decoded validation split.
    vocab_path: SentencePiece model; `extra_ids` sentinels are added on top.
    shuffle_buffer_size: examples in seqio's shuffle buffer (seqio's default, 1000).
    postprocess_fn: seqio's postprocessor, applied to the decoded predictions and the
      targets before the metrics, e.g. `first_span` for targets in the span
      corruption format (``<extra_id_0> answer``).

  Raises:
    ValueError: in one line, for a bad mode token, an unknown metric, or both or
      neither of text_glob and tfds_name.
  """
  where = f"task {name}"
  check_mode_token(mode_token, where)
  try:
    metric_fns = metrics_lib.metric_fns(tuple(metrics))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  if (text_glob is None) == (tfds_name is None):
    raise ValueError(f"{where}: give one of text_glob or tfds_name")
  preprocessors = []
  if tfds_name is not None:
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)
    preprocessors.append(functools.partial(
        seqio.preprocessors.rekey, key_map={"inputs": inputs_key, "targets": targets_key}))
  else:
    source = RecordFileSource(split_globs(text_glob), inputs_key, targets_key)
  vocabulary = seqio.SentencePieceVocabulary(os.fspath(vocab_path), extra_ids=extra_ids)
  output_features = {"inputs": seqio.Feature(vocabulary, add_eos=True),
                     "targets": seqio.Feature(vocabulary, add_eos=True)}
  preprocessors += [
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
      functools.partial(prepend_mode_token, mode_token=mode_token),
      seqio.preprocessors.append_eos_after_trim,
  ]
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                         output_features=output_features, metric_fns=metric_fns,
                         postprocess_fn=postprocess_fn,
                         shuffle_buffer_size=shuffle_buffer_size)
  return name


def mode_token_of(task: seqio.Task) -> str | None:
  """The mode token a task registered here prepends (None for none or other tasks)."""
  for p in task.preprocessors:
    if isinstance(p, functools.partial) and p.func is prepend_mode_token:
      return p.keywords["mode_token"]
  return None


def is_supervised(task: seqio.Task) -> bool:
  """Whether `task` was registered by `register_supervised_task`."""
  return any(isinstance(p, functools.partial) and p.func is prepend_mode_token
             for p in task.preprocessors)


def check_split(task: seqio.Task, split: str) -> None:
  """Reads a file-backed supervised task's split up front: a bad line is one
  ValueError naming the file and line. Other sources are not read."""
  if isinstance(task.source, RecordFileSource) and split in task.source.splits:
    task.source.check(split)


def register_mixture(name: str, rates: Mapping[str, float]) -> str:
  """Registers (or replaces) a seqio Mixture of registered tasks with these rates."""
  if not rates:
    raise ValueError(f"mixture {name}: give at least one task")
  unknown = [t for t in rates if t not in seqio.TaskRegistry.names()]
  if unknown:
    raise ValueError(f"mixture {name}: unknown task {unknown[0]!r}")
  for task, rate in rates.items():
    if not rate > 0:
      raise ValueError(f"mixture {name}: task {task} has rate {rate}; rates must be positive")
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(task, float(rate)) for task, rate in rates.items()])
  return name
