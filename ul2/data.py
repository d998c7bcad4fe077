"""Batches for the model: seqio tasks -> encoder-decoder features, packed, per host.

`get_dataset` runs a registered task or mixture (see `tasks/`) through seqio's
`EncDecFeatureConverter` (T5X's features, packing on by default) and batches it. The
batch keys are the model's keyword arguments, plus `decoder_denoiser_ids` for the
per-denoiser loss. One packed row, inputs length 10 and targets length 8, of two
examples (R1 as denoiser 0, S as denoiser 6; [NLU] = 3, [S2S] = 5, EOS = 1,
<extra_id_0> = 8099):

  encoder_input_tokens   [3, 17, 8099, 23, 1,  5, 40, 41, 1,  0]
  encoder_segment_ids    [1,  1,    1,  1, 1,  2,  2,  2, 2,  0]
  encoder_positions      [0,  1,    2,  3, 4,  0,  1,  2, 3,  0]
  decoder_target_tokens  [8099, 18, 1,  42, 43, 1,  0, 0]
  decoder_input_tokens   [0, 8099, 18,   0, 42, 43, 0, 0]
  decoder_loss_weights   [1,    1,  1,   1,  1,  1, 0, 0]
  decoder_segment_ids    [1,    1,  1,   2,  2,  2, 0, 0]
  decoder_positions      [0,    1,  2,   0,  1,  2, 0, 0]
  decoder_denoiser_ids   [0,    0,  0,   6,  6,  6, 0, 0]

`decoder_denoiser_ids` indexes `task_denoisers(name)`; at padding its value means
nothing (the loss weight is 0 there).

Determinism: with the same seed, shard and lengths, `get_dataset` yields the same
batches in the same order (seqio seeds every random step from `seed`, and tf.data
keeps order). The trainer resumes at batch n with `get_dataset(...).skip(n)`, which
replays the pipeline up to there. Each of `num_shards` processes reads shard
`shard_id`, a disjoint part of the data (files when there are enough, else examples).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import os
import tempfile
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from ul2 import denoisers as denoisers_lib


def _registry() -> None:
  import tasks  # pylint: disable=import-outside-toplevel,unused-import  # Registers tasks.


class UL2FeatureConverter(seqio.EncDecFeatureConverter):
  """`EncDecFeatureConverter` that also carries each target token's denoiser.

  The scalar `denoiser` of an example is spread over its targets before packing and
  packed with them, so it comes out as `decoder_denoiser_ids` [targets_length].
  It is packed as `denoiser + 1`: seqio's packing takes an example's length to be
  its number of non-zero values, so a feature of zeros (denoiser 0) would pack as
  empty and shift every later example's ids.
  """

  MODEL_FEATURES = {
      **seqio.EncDecFeatureConverter.MODEL_FEATURES,
      "decoder_denoiser_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
  }

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    @tf.autograph.experimental.do_not_convert
    def spread(features):
      denoiser = features.get("denoiser", tf.constant(0, tf.int32))
      return {"inputs": features["inputs"], "targets": features["targets"],
              "targets_denoiser": tf.fill(tf.shape(features["targets"]), denoiser + 1)}

    ds = ds.map(spread, num_parallel_calls=tf.data.AUTOTUNE)
    lengths = {**task_feature_lengths, "targets_denoiser": task_feature_lengths["targets"]}
    ds = self._pack_or_pad(ds, lengths)

    @tf.autograph.experimental.do_not_convert
    def convert(features):
      return {**self._convert_example(features),
              "decoder_denoiser_ids": tf.maximum(features["targets_denoiser"] - 1, 0)}

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    return {**super().get_model_feature_lengths(task_feature_lengths),
            "decoder_denoiser_ids": task_feature_lengths["targets"]}


def provider(name: str) -> seqio.Task | seqio.Mixture:
  """The registered task or mixture; a ValueError naming the nearest names if none."""
  _registry()
  names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(f"unknown task or mixture {name!r}; {hint}registered: {', '.join(names)}")
  return seqio.get_mixture_or_task(name)


def _tasks(p: seqio.Task | seqio.Mixture) -> list[seqio.Task]:
  return list(p.tasks) if isinstance(p, seqio.Mixture) else [p]


def task_denoisers(name: str) -> tuple[denoisers_lib.Denoiser, ...]:
  """The denoisers of a registered task (or mixture of such tasks), in id order;
  () for supervised tasks (`tasks.register_supervised_task`) and mixtures of them."""
  found = {denoisers_lib.denoisers_of(t.preprocessors) for t in _tasks(provider(name))}
  if found == {None} and all(_is_supervised(t) for t in _tasks(provider(name))):
    return ()
  if None in found:
    raise ValueError(f"{name!r} has a task without a ul2.denoisers.mixture_of_denoisers step")
  if len(found) != 1:
    raise ValueError(f"mixture {name!r} mixes tasks with different denoisers")
  return found.pop()


def _is_supervised(task: seqio.Task) -> bool:
  from tasks import supervised  # pylint: disable=import-outside-toplevel
  return supervised.is_supervised(task)


def _check_records(task: seqio.Task, split: str) -> None:
  from tasks import supervised  # pylint: disable=import-outside-toplevel
  supervised.check_split(task, split)  # A line without the fields: its file and line.


def _vocabulary(task: seqio.Task) -> seqio.Vocabulary:
  return task.output_features["targets"].vocabulary


def task_vocabulary(name: str) -> seqio.Vocabulary:
  """The targets vocabulary of a task (or of a mixture's first task)."""
  return _vocabulary(_tasks(provider(name))[0])


def check_vocabulary(name: str, model_vocab_size: int) -> None:
  """One-line errors for a vocabulary the model cannot train with: not SentencePiece,
  larger than the model's `vocab_size`, or unable to spell a denoiser's mode token."""
  for task in _tasks(provider(name)):
    vocabulary = _vocabulary(task)
    path = getattr(vocabulary, "sentencepiece_model_file", "the vocabulary")
    try:
      size = vocabulary.vocab_size
    except Exception as e:  # pylint: disable=broad-except  (protobuf, OSError, ...)
      raise ValueError(f"task {task.name}: vocabulary {path} is not a SentencePiece model "
                       f"({type(e).__name__}: {' '.join(str(e).split())})") from e
    if size > model_vocab_size:
      raise ValueError(f"task {task.name}: vocabulary {path} has {size} ids (extra ids "
                       f"included), more than the model's vocab_size {model_vocab_size}")
    tokenizer = getattr(vocabulary, "tokenizer", None)
    for d in task_denoisers(name):
      ids = denoisers_lib.mode_token_ids(vocabulary, d.mode_token)
      if tokenizer is not None and tokenizer.unk_id() in ids:
        raise ValueError(f"task {task.name}: vocabulary {path} ({tokenizer.get_piece_size()} "
                         f"pieces) cannot spell denoiser {d.name}'s mode token "
                         f"{d.mode_token!r}: it encodes to unknown pieces")


def _check_tfds(task: seqio.Task) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  loader = task.source.tfds_dataset
  where = loader.data_dir or "the default TFDS data dir ($TFDS_DATA_DIR)"
  try:
    prepared = tfds.builder(loader.name, data_dir=loader.data_dir).is_prepared()
  except (ValueError, OSError, tfds.core.registered.DatasetNotFoundError) as e:
    raise FileNotFoundError(f"task {task.name}: cannot open TFDS dataset {loader.name} in "
                            f"{where}: {e}") from e
  if not prepared:
    raise FileNotFoundError(f"task {task.name}: TFDS dataset {loader.name} is not prepared in "
                            f"{where}; set tasks.register_ul2_task.tfds_data_dir")


def check(name: str, task_feature_lengths: Mapping[str, int], split: str) -> None:
  """Raises a one-line error if the task cannot run: unknown name, bad split or
  lengths, missing vocabulary or data files, a supervised file line without its
  fields. Builds no graph."""
  if set(task_feature_lengths) != {"inputs", "targets"}:
    raise ValueError(f"task_feature_lengths needs exactly 'inputs' and 'targets', got "
                     f"{dict(task_feature_lengths)}")
  denoisers = task_denoisers(name)
  for task in _tasks(provider(name)):
    vocabulary = _vocabulary(task)
    path = getattr(vocabulary, "sentencepiece_model_file", None)
    if path and not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"task {task.name}: vocabulary {path} does not exist")
    if denoisers:
      denoisers_lib.make_plan(denoisers, task_feature_lengths, vocabulary)
    if isinstance(task.source, seqio.TfdsDataSource):
      _check_tfds(task)
    if split not in task.source.splits:
      raise ValueError(f"task {task.name} has no split {split!r}; it has "
                       f"{', '.join(task.source.splits)}")
    if isinstance(task.source, seqio.FileDataSource):
      files = task.source.list_shards(split)
      if not files:
        raise FileNotFoundError(f"task {task.name}: no files match "
                                f"{task.source._split_to_filepattern[split]} (split {split})")  # pylint: disable=protected-access
      check_files = getattr(task.source, "check_files", None)
      if check_files is not None:
        check_files(files)
      if not _has_text(files):
        raise ValueError(f"task {task.name}: the {split} files ({', '.join(files[:3])}"
                         f"{', ...' if len(files) > 3 else ''}) hold no text")
    if _is_supervised(task):
      _check_records(task, split)


def _has_text(files: Sequence[str], chunk: int = 1 << 16) -> bool:
  """Whether any file has a non-whitespace byte (reads only up to the first one)."""
  for path in files:
    with tf.io.gfile.GFile(path, "rb") as f:
      while block := f.read(chunk):
        if block.strip():
          return True
  return False


def get_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str,
                batch_size: int, shuffle: bool, seed: int, pack: bool = True,
                shard_id: int = 0, num_shards: int = 1, repeat: bool = True) -> tf.data.Dataset:
  """Batches of model features (int32 [batch_size, length]) from a task or mixture.

  Args:
    mixture_or_task_name: a registered name (importing `tasks` registers c4_ul2 and
      local_ul2).
    task_feature_lengths: {"inputs": ..., "targets": ...}.
    split: e.g. "train" or "validation".
    batch_size: examples (packed rows) per batch on this process; the last partial
      batch is dropped.
    shuffle: shuffle files and examples (seeded).
    seed: seeds the shuffles and the denoisers; the same seed gives the same batches.
    pack: pack several examples per row (segment ids and positions added).
    shard_id, num_shards: this process reads shard `shard_id` of `num_shards`.
    repeat: repeat the data forever (each epoch gets new denoiser draws).

  Raises:
    ValueError, FileNotFoundError: before building the pipeline, as `check`.
  """
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  check(mixture_or_task_name, task_feature_lengths, split)
  ds = seqio.get_dataset(
      provider(mixture_or_task_name),
      task_feature_lengths=dict(task_feature_lengths),
      feature_converter=UL2FeatureConverter(pack=pack),
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=None if repeat else 1,
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
      seed=seed,
      batch_size=batch_size,
      trim_output_features=True,
  )
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def pack(examples: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
  """Examples ({"inputs", "targets", "denoiser"}) -> packed model rows, as `get_dataset`."""
  return UL2FeatureConverter(pack=True)(examples, dict(task_feature_lengths))


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a dataset of batches as dicts of numpy arrays."""
  return ds.as_numpy_iterator()


class Stream:
  """Batches from one process's data shards (concatenated in shard order), whose
  position can be saved and restored in O(1): each shard's tf.data iterator is
  checkpointed (`tf.train.Checkpoint(iterator=...)`, shuffle and prefetch buffers
  included), instead of replaying every batch consumed so far.

      stream = Stream({shard_id: get_dataset(...), ...})
      batch = next(stream)
      stream.save("DIR")             # DIR/shard-00003/state.* per shard
      Stream({...same datasets...}).restore("DIR")
  """

  def __init__(self, datasets: Mapping[int, tf.data.Dataset]):
    self._iterators = {shard_id: iter(ds) for shard_id, ds in sorted(datasets.items())}

  def __iter__(self) -> "Stream":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators.values()]
    if len(parts) == 1:
      return {k: v.numpy() for k, v in parts[0].items()}
    return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}

  @staticmethod
  def shard_dir(directory: str | os.PathLike, shard_id: int) -> epath.Path:
    return epath.Path(directory) / f"shard-{shard_id:05d}"

  def save(self, directory: str | os.PathLike) -> str | None:
    """Writes each shard's position under `directory` (local, or an object store:
    `gs://...`), a shard at a time. Returns why not, writing nothing more, if the
    pipeline cannot be checkpointed (a Python generator source); write errors (a
    full disk) raise.

    A local shard directory exists only once complete (written aside, renamed). On
    an object store the state is written to a local temporary directory and its
    files are uploaded through `etils.epath`, like the rest of the model_dir; an
    upload cut short leaves a shard that fails to restore, and the resume replays.
    """
    for shard_id, iterator in self._iterators.items():
      final = self.shard_dir(directory, shard_id)
      remote = _on_object_store(final)
      with contextlib.ExitStack() as stack:
        if remote:
          tmp = epath.Path(stack.enter_context(tempfile.TemporaryDirectory(
              prefix="ul2-data-state-")))
        else:
          tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
          if tmp.exists():
            tmp.rmtree()
        try:
          tf.train.Checkpoint(iterator=iterator).write(os.fspath(tmp / "state"))
        except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError) as e:
          if not remote and tmp.exists():
            tmp.rmtree()
          return " ".join(e.message.split())[:200]
        if final.exists():
          final.rmtree()
        if remote:
          for path in tmp.iterdir():
            path.copy(final / path.name)
        else:
          tmp.rename(final)
    return None

  def has_state(self, directory: str | os.PathLike) -> bool:
    return all(self.shard_dir(directory, i).exists() for i in self._iterators)

  def restore(self, directory: str | os.PathLike) -> None:
    """Puts every shard back where `save` left it (raises if any cannot be read)."""
    for shard_id, iterator in self._iterators.items():
      with _local(self.shard_dir(directory, shard_id)) as shard:
        tf.train.Checkpoint(iterator=iterator).read(
            os.fspath(shard / "state")).assert_consumed()


def _on_object_store(path: epath.Path) -> bool:
  return "://" in os.fspath(path)


@contextlib.contextmanager
def _local(directory: epath.Path) -> Iterator[epath.Path]:
  """`directory` itself if it is local, else a local temporary copy of its files."""
  if not _on_object_store(directory):
    yield directory
    return
  with tempfile.TemporaryDirectory(prefix="ul2-data-state-") as tmp:
    local = epath.Path(tmp)
    for path in directory.iterdir():
      path.copy(local / path.name)
    yield local


EXAMPLE_FIELDS = ("denoiser", "mode_token", "inputs", "targets", "inputs_text", "targets_text")


def denoised(name: str, task_feature_lengths: Mapping[str, int], split: str, seed: int,
             shuffle: bool, repeat: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """The task's examples before packing; with `repeat`, epoch after epoch (epoch e seeded
  `seed + e`, so each has new denoiser draws), ending if an epoch yields nothing."""
  p = provider(name)
  for epoch in itertools.count() if repeat else [0]:
    ds = p.get_dataset(dict(task_feature_lengths), split=split, shuffle=shuffle,
                       seed=seed + epoch, num_epochs=1)
    empty = True
    for ex in ds.as_numpy_iterator():
      empty = False
      yield ex
    if empty:
      return


class _Reader:
  """The vocabulary facts that read examples back: mode lengths, first sentinel, plan."""

  def __init__(self, name: str, task_feature_lengths: Mapping[str, int]):
    self.denoisers = task_denoisers(name)
    self.vocabulary = _vocabulary(_tasks(provider(name))[0])
    self.first_sentinel = self.vocabulary.vocab_size - self.vocabulary.extra_ids
    self.plan = denoisers_lib.make_plan(self.denoisers, task_feature_lengths, self.vocabulary)
    self.mode_lengths = [len(ids) for ids in self.plan.mode_ids]

  def anatomy(self, ex: Mapping[str, np.ndarray]) -> denoisers_lib.Anatomy:
    return denoisers_lib.Anatomy.of(ex["inputs"].tolist(), ex["targets"].tolist(),
                                    mode_length=self.mode_lengths[int(ex["denoiser"])],
                                    first_sentinel=self.first_sentinel)


def examples(name: str, task_feature_lengths: Mapping[str, int], split: str = "train",
             num_examples: int = 10, seed: int = 0, shuffle: bool = False,
             repeat: bool = True) -> list[dict]:
  """What the denoisers make of a task, before packing (for `ul2 inspect`).

  Returns one dict per example: EXAMPLE_FIELDS (`denoiser` name, `mode_token`,
  `inputs` and `targets` id lists with EOS, `inputs_text`, `targets_text`) and
  `about`, a line on what the denoiser did. With `repeat`, the data repeats past the
  end of the split, with new draws.
  """
  check(name, task_feature_lengths, split)
  reader = _Reader(name, task_feature_lengths)
  out = []
  for ex in itertools.islice(
      denoised(name, task_feature_lengths, split, seed, shuffle, repeat), num_examples):
    d = reader.denoisers[int(ex["denoiser"])]
    inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
    out.append({"denoiser": d.name, "mode_token": d.mode_token, "inputs": inputs,
                "targets": targets, "inputs_text": reader.vocabulary.decode(inputs),
                "targets_text": reader.vocabulary.decode(targets),
                "about": denoisers_lib.KINDS[d.kind].describe(d, reader.anatomy(ex))})
  return out


def unigram_log_probs(name: str, task_feature_lengths: Mapping[str, int], split: str = "train",
                      num_examples: int = 4096, seed: int = 0) -> np.ndarray:
  """float64 [vocab_size]: log p of each id under a unigram model of the task's targets.

  The frequencies of the target ids (sentinels and EOS included) of the first
  `num_examples` examples of `split`, add-half smoothed: what a model that learnt
  only how often each token occurs would predict. Its cross-entropy on the eval
  targets is the baseline a trained model has to beat.
  """
  check(name, task_feature_lengths, split)
  vocab_size = _vocabulary(_tasks(provider(name))[0]).vocab_size
  counts = np.full(vocab_size, 0.5)
  for ex in itertools.islice(denoised(name, task_feature_lengths, split, seed, shuffle=False),
                             num_examples):
    counts += np.bincount(ex["targets"], minlength=vocab_size)[:vocab_size]
  return np.log(counts / counts.sum())


STATS_FIELDS = ("denoiser", "count", "share", "inputs_length", "targets_length", "fill",
                "corruption_rate", "spans", "mean_span", "examples_per_row",
                "inputs_padding", "targets_padding")


def examples_dataset(exs: Sequence[Mapping[str, np.ndarray]]) -> tf.data.Dataset:
  """A dataset of examples ({"inputs", "targets", "denoiser"}) held in memory."""
  return tf.data.Dataset.from_generator(lambda: iter(exs), output_signature={
      "inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32),
      "denoiser": tf.TensorSpec([], tf.int32)})


def _packing(exs: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int]
             ) -> tuple[float, float, float]:
  """(examples per packed row, padding fraction of inputs, of targets) of `exs` packed."""
  exs = [{k: ex[k] for k in ("inputs", "targets", "denoiser")} for ex in exs]
  rows = sum(1 for _ in pack(examples_dataset(exs), lengths).as_numpy_iterator())
  inputs = sum(len(ex["inputs"]) for ex in exs)
  targets = sum(len(ex["targets"]) for ex in exs)
  return (len(exs) / rows, 1 - inputs / (rows * lengths["inputs"]),
          1 - targets / (rows * lengths["targets"]))


def denoiser_stats(name: str, task_feature_lengths: Mapping[str, int], split: str = "train",
                   num_examples: int = 3000, seed: int = 0, shuffle: bool = False
                   ) -> list[dict]:
  """What each denoiser of a task makes, measured on `num_examples` examples.

  One dict per denoiser that occurs, then one for "all", with STATS_FIELDS:
  `count` and `share` of the examples; mean `inputs_length` and `targets_length`
  (ids, mode token and EOS included); `fill`, the mean share of the feature lengths
  an example fills (span corruption: the larger of inputs / inputs length and
  targets / targets length; prefix LM: inputs and targets together over a full
  window's); `corruption_rate`, the tokens moved to the targets over the window
  tokens; `spans`, sentinels per example, and `mean_span`, noise tokens per span
  (None without sentinels); and, with the examples packed by the feature converter
  at the task's lengths (each denoiser's alone, and all together as training packs
  them), `examples_per_row` and the padding fractions of inputs and targets.
  """
  check(name, task_feature_lengths, split)
  reader = _Reader(name, task_feature_lengths)
  exs = list(itertools.islice(denoised(name, task_feature_lengths, split, seed, shuffle),
                              num_examples))
  groups = [(d.name, [ex for ex in exs if int(ex["denoiser"]) == i])
            for i, d in enumerate(reader.denoisers)]
  out = []
  for group, members in [g for g in groups if g[1]] + [("all", exs)]:
    anatomy = [reader.anatomy(ex) for ex in members]
    fills = []
    for ex in members:
      i = int(ex["denoiser"])
      kind = denoisers_lib.KINDS[reader.denoisers[i].kind]
      fills.append(kind.fill(ex["inputs"], ex["targets"], reader.plan.budgets[i],
                             task_feature_lengths, reader.mode_lengths[i]))
    spans = sum(a.spans for a in anatomy)
    per_row, inputs_padding, targets_padding = _packing(members, task_feature_lengths)
    out.append({
        "denoiser": group, "count": len(members), "share": len(members) / len(exs),
        "inputs_length": float(np.mean([len(ex["inputs"]) for ex in members])),
        "targets_length": float(np.mean([len(ex["targets"]) for ex in members])),
        "fill": float(np.mean(fills)),
        "corruption_rate": sum(a.noise for a in anatomy) / sum(a.window for a in anatomy),
        "spans": spans / len(members) if spans else None,
        "mean_span": sum(a.noise for a in anatomy if a.spans) / spans if spans else None,
        "examples_per_row": per_row, "inputs_padding": inputs_padding,
        "targets_padding": targets_padding})
  return out
