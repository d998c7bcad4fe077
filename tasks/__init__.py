"""seqio tasks for UL2. Importing this package registers five of them:

* `c4_ul2`: TFDS `c4/en:3.1.0` (the real run's task, 512/512).
* `local_ul2`: text or JSONL files; by default the bundled corpus (train:
  ul2/assets/train.txt, validation: ul2/assets/validation.txt).
* `local_title`: a supervised task from the bundled corpus: name the Python help
  topic a paragraph of the Python documentation comes from (`[NLU]`, accuracy);
  built by ul2/assets/build_title_task.py.
* `local_word`: a supervised task from the bundled corpus: restore the word removed
  from a passage (`[NLU]`, accuracy); built by ul2/assets/build_word_task.py.
* `local_continue`: a supervised task from the bundled corpus: continue a passage
  with its next 12 words (`[S2S]`, ROUGE); built by
  ul2/assets/build_continue_task.py, the default of gin/runs/finetune.gin.
  Supervised tasks and mixtures of them
  are registered by `register_supervised_task` and `register_mixture` (see
  tasks/supervised.py).

The two UL2 tasks run source -> clean text -> tokenise -> `ul2.denoisers.mixture_of_denoisers`
with the UL2 mixture, which joins the documents into one stream and cuts it into
full windows (`merge_documents=False` keeps each document on its own). `register_ul2_task` registers more, or replaces one of these,
with other files, TFDS directory, vocabulary or denoisers; from gin:

    from __gin__ import dynamic_registration
    import tasks
    MIXTURE_OR_TASK_NAME = @tasks.register_ul2_task()
    tasks.register_ul2_task:
      name = "my_ul2"
      text_glob = {"train": "/data/train-*.jsonl", "validation": "/data/valid.jsonl"}

(see gin/experiments/custom_mixture.gin for a mixture of one's own denoisers).

Mode tokens are data: `mode_tokens="paper"` keeps each denoiser's own (UL2's
`[NLU]`/`[NLG]`/`[S2S]`), `"none"` puts none (Flan-UL2's continued pre-training;
the length budgets then reserve no room for one), and a mapping
{denoiser name: token or None} names each denoiser's token.

Text files hold one document per line; JSONL files (`.jsonl`, `.json`) one JSON
object per line with the document in `text_key`. Stray bad bytes never crash a run:
invalid UTF-8 becomes U+FFFD, empty and whitespace-only documents are dropped, and
JSONL lines that are not objects with a string `text_key` are skipped (counted in
one warning per file). Files that cannot be a corpus are one-line errors before
training starts (`check_files`): a directory, a binary file (NUL bytes or mostly
invalid UTF-8), a JSONL file without one usable line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from tasks.supervised import first_span, register_mixture, register_supervised_task  # pylint: disable=unused-import  (re-exported)
from ul2 import assets
from ul2 import denoisers as denoisers_lib

C4_TFDS_NAME = "c4/en:3.1.0"
LOCAL_SPLITS = {"train": str(assets.TRAIN_TEXT), "validation": str(assets.VALIDATION_TEXT)}
JSON_SUFFIXES = (".jsonl", ".json")


def clean_text(dataset: tf.data.Dataset, key: str = "targets") -> tf.data.Dataset:
  """seqio preprocessor: valid UTF-8 (bad bytes -> U+FFFD), blank documents dropped."""
  def fix(features):
    text = tf.strings.unicode_transcode(features[key], "UTF-8", "UTF-8", errors="replace")
    return {**features, key: text}
  dataset = dataset.map(fix, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.filter(lambda features: tf.strings.length(tf.strings.strip(features[key])) > 0)


def _json_text(line: bytes, text_key: str) -> str | None:
  """The `text_key` string of a JSON object line; None for a blank or unusable line."""
  line = line.decode("utf-8", errors="replace").strip()
  if not line:
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  text = record.get(text_key) if isinstance(record, dict) else None
  return text if isinstance(text, str) else None


_WARNED: set[str] = set()  # Files whose skipped lines were reported (once a process).


def _jsonl_texts(path: bytes, text_key: bytes):
  """Yields the `text_key` string of each JSON object line of `path`."""
  path, text_key = path.decode(), text_key.decode()
  skipped = 0
  with tf.io.gfile.GFile(path, "rb") as f:
    for line in f:
      text = _json_text(line, text_key)
      if text is None:
        skipped += bool(line.strip())
        continue
      yield text
  if skipped and path not in _WARNED:
    _WARNED.add(path)
    print(f"warning: {path}: skipped {skipped} lines that are not JSON objects with a "
          f"string {text_key!r}", file=sys.stderr, flush=True)


_HEAD = 1 << 16  # Bytes of each file `check_files` reads to tell text from binary.


@functools.lru_cache(maxsize=4096)
def _file_problem(path: str, size: int, mtime: int, text_key: str | None) -> str | None:
  """Why `path` cannot be a corpus file, or None (cached by size and mtime)."""
  del size, mtime  # The cache key only.
  with tf.io.gfile.GFile(path, "rb") as f:
    head = f.read(_HEAD)
  text = head.decode("utf-8", errors="replace")
  if b"\0" in head or text.count("\ufffd") > 0.1 * max(len(text), 1):
    return ("is a binary file, not text (NUL bytes or mostly invalid UTF-8); remove it "
            "from the task's files")
  if text_key is not None:
    with tf.io.gfile.GFile(path, "rb") as f:
      if not any(_json_text(line, text_key) is not None for line in f):
        return f"has no line that is a JSON object with a string {text_key!r}"
  return None


class TextFiles(seqio.FileDataSource):
  """A seqio file source of documents: text files (a line each) or JSONL (`text_key`)."""

  def __init__(self, split_globs: Mapping[str, str | Sequence[str]], text_key: str):
    patterns = [p for globs in split_globs.values() for p in _patterns(globs)]
    is_json = [p.endswith(JSON_SUFFIXES) for p in patterns]
    if any(is_json) and not all(is_json):
      raise ValueError(f"files {patterns}: use either JSONL (.jsonl/.json) or text files")
    self.text_key = text_key if all(is_json) else None
    if self.text_key is not None:
      def read(path):
        return tf.data.Dataset.from_generator(
            _jsonl_texts, args=(path, text_key),
            output_signature=tf.TensorSpec([], tf.string)).map(lambda text: {"text": text})
    else:
      def read(path):
        return tf.data.TextLineDataset(path).map(lambda text: {"text": text})
    super().__init__(read, split_to_filepattern=dict(split_globs), cycle_length=1,
                     block_length=1)

  def check_files(self, files: Sequence[str]) -> None:
    """One-line ValueError for the first file that cannot be part of a corpus."""
    for path in files:
      if tf.io.gfile.isdir(path):
        raise ValueError(f"{path} matches the task's files but is a directory")
      stat = tf.io.gfile.stat(path)
      problem = _file_problem(path, stat.length, stat.mtime_nsec, self.text_key)
      if problem:
        raise ValueError(f"{path} {problem}")


def _patterns(globs: str | Sequence[str]) -> list[str]:
  return [os.fspath(globs)] if isinstance(globs, (str, os.PathLike)) else [
      os.fspath(g) for g in globs]


def list_files(globs: str | Sequence[str]) -> list[str]:
  """Sorted files matching a glob (or a list of globs); FileNotFoundError if none."""
  patterns = _patterns(globs)
  files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
  if not files:
    raise FileNotFoundError(f"no files match {', '.join(patterns)}")
  return files


def with_mode_tokens(denoisers: Sequence[denoisers_lib.Denoiser],
                     mode_tokens: str | Mapping[str, str | None]
                     ) -> tuple[denoisers_lib.Denoiser, ...]:
  """The denoisers with the mode-token policy applied: "paper" (their own), "none",
  or {denoiser name: token or None} naming every denoiser of the mixture."""
  denoisers = tuple(denoisers)
  if isinstance(mode_tokens, Mapping):
    names = [d.name for d in denoisers]
    unknown = [n for n in mode_tokens if n not in names]
    if unknown:
      raise ValueError(f"mode_tokens names denoiser {unknown[0]!r}, which is not in the "
                       f"mixture ({', '.join(names)})")
    missing = [n for n in names if n not in mode_tokens]
    if missing:
      raise ValueError(f"mode_tokens gives no token for {', '.join(missing)}: name every "
                       "denoiser of the mixture (None for no token)")
    bad = [(n, t) for n, t in mode_tokens.items() if t is not None and not (
        isinstance(t, str) and t.strip())]
    if bad:
      raise ValueError(f"mode_tokens[{bad[0][0]!r}] must be a non-empty string or None, "
                       f"got {bad[0][1]!r}")
    return tuple(dataclasses.replace(d, mode_token=mode_tokens[d.name]) for d in denoisers)
  if mode_tokens == "paper":
    return denoisers
  if mode_tokens == "none":
    return tuple(dataclasses.replace(d, mode_token=None) for d in denoisers)
  raise ValueError(f"mode_tokens must be 'paper', 'none' or a mapping {{denoiser name: "
                   f"token}}, got {mode_tokens!r}")


def register_ul2_task(
    name: str,
    *,
    text_glob: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    tfds_name: str | None = None,
    tfds_data_dir: str | None = None,
    text_key: str = "text",
    denoisers: Sequence[denoisers_lib.Denoiser] = denoisers_lib.UL2_DENOISERS,
    vocab_path: str | os.PathLike = assets.VOCAB_PATH,
    extra_ids: int = assets.EXTRA_IDS,
    shuffle_buffer_size: int = 1000,
    merge_documents: bool = True,
    document_separator: int | None = None,
    mode_tokens: str | Mapping[str, str | None] = "paper",
) -> str:
  """Registers (or replaces) a UL2 seqio Task and returns its name.

  Args:
    name: the task name.
    text_glob: local files: a glob (or list of globs) for the "train" split, or a
      mapping split -> glob(s). Default (and no `tfds_name`): the bundled corpus.
    tfds_name: a TFDS dataset, e.g. "c4/en:3.1.0", instead of local files.
    tfds_data_dir: where TFDS finds it (default: TFDS's own, e.g. $TFDS_DATA_DIR).
    text_key: the feature (TFDS) or JSON field (JSONL) holding the document.
    denoisers: the mixture; `ul2.data.task_denoisers(name)` returns it, in order.
    vocab_path: SentencePiece model; `extra_ids` sentinels are added on top.
    shuffle_buffer_size: examples in seqio's shuffle buffer (seqio's default, 1000).
    merge_documents: join the documents of a batch into one stream before cutting
      windows, as UL2's and T5's span corruption (full windows; spans keep their
      mean length on short documents); False: each document makes its own examples,
      for corpora whose boundaries matter.
    document_separator: with `merge_documents`, a token id put after each document
      (e.g. 1, EOS); default none, as T5's `reduce_concat_tokens`.
    mode_tokens: "paper" (each denoiser's own), "none" (no mode token, as Flan-UL2's
      continued pre-training) or {denoiser name: token or None}.
  """
  denoisers = with_mode_tokens(denoisers_lib.validate_mixture(denoisers), mode_tokens)
  if text_glob is not None and tfds_name is not None:
    raise ValueError(f"task {name}: give text_glob or tfds_name, not both")
  if tfds_name is not None:
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)
  else:
    if text_glob is None:
      split_globs = dict(LOCAL_SPLITS)
    elif isinstance(text_glob, Mapping):
      split_globs = dict(text_glob)
    else:
      split_globs = {"train": text_glob}
    source = TextFiles(split_globs, text_key)
    text_key = "text"
  vocabulary = seqio.SentencePieceVocabulary(os.fspath(vocab_path), extra_ids=extra_ids)
  # The denoiser preprocessor appends EOS itself (its length budgets count it).
  output_features = {"inputs": seqio.Feature(vocabulary, add_eos=False),
                     "targets": seqio.Feature(vocabulary, add_eos=False)}
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
          clean_text,
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          functools.partial(denoisers_lib.mixture_of_denoisers, denoisers=denoisers,
                            merge_documents=merge_documents,
                            document_separator=document_separator),
      ],
      output_features=output_features,
      shuffle_buffer_size=shuffle_buffer_size,
  )
  return name


register_ul2_task("c4_ul2", tfds_name=C4_TFDS_NAME)
register_ul2_task("local_ul2")
register_supervised_task(
    "local_title",
    text_glob={"train": str(assets.TITLE_TRAIN), "validation": str(assets.TITLE_VALIDATION)},
    mode_token=denoisers_lib.NLU, metrics=("accuracy",))
register_supervised_task(
    "local_word",
    text_glob={"train": str(assets.WORD_TRAIN), "validation": str(assets.WORD_VALIDATION)},
    mode_token=denoisers_lib.NLU, metrics=("accuracy",))
register_supervised_task(
    "local_continue",
    text_glob={"train": str(assets.CONTINUE_TRAIN),
               "validation": str(assets.CONTINUE_VALIDATION)},
    mode_token=denoisers_lib.S2S, metrics=("rouge",))
