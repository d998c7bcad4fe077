"""`ul2 infer`: batched decoding or scoring of a model over a file or a task's split.

    model = load_model(model_dir=DIR, step=None)         # or load_model(hf_dir=DIR)
    texts = read_file("in.jsonl", input_key="inputs")     # [(inputs, targets or None)]
    examples, truncated = tokenize(texts, model, Options(...), mode_token="[NLG]")
    results, stats = run(model, examples, Options(decode="beam", num_beams=4))

One result per example, in input order: `inputs` (text), `input_ids`, `prediction`
(text), `prediction_ids` (without the start token, EOS included), `score` (their
summed log-probability; for beam search also `beam_score`, the length-penalised
score beams are ranked by), plus `targets` and `target_ids` where the input has
targets. With `Options.score` the targets are scored instead of decoding (T5X's
`score_batch`): no prediction, `score` is the targets' log-likelihood.

How it runs: examples are sorted by input length and cut into batches, each padded
to the next power of two of its longest input (a "bucket"), so a short input does
not pay for the longest one; each (bucket, mode) compiles once. The batch rows are
split over the mesh's data axes (`ul2.sharding`), the parameters placed by the
logical axis rules. A model_dir is read as data (`ul2.model_settings`), never by
executing its config.gin. Importing this module does not import TensorFlow; the
vocabulary (seqio) and task reading do, when called.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ul2 import compiler, decoding, export, jsonl, model_settings, sharding
from ul2 import model as model_lib

DECODES = ("greedy", "sample", "beam")
MIN_BUCKET = 16
JSON_SUFFIXES = (".jsonl", ".json")
# tokenizer_config.json's model_max_length when absent (or transformers' "no limit").
HF_DEFAULT_MAX_LENGTH = 512


@dataclasses.dataclass(frozen=True)
class Options:
  """How to decode. `max_decode_length` counts output tokens, EOS included."""
  decode: str = "greedy"
  num_beams: int = 4
  length_penalty: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_decode_length: int = 128
  batch_size: int = 32
  score: bool = False

  def check(self, vocab_size: int) -> None:
    if self.decode not in DECODES:
      raise ValueError(f"unknown --decode={self.decode!r}; use greedy, sample or beam")
    if self.decode == "beam" and not 1 <= self.num_beams <= vocab_size:
      raise ValueError(f"--num_beams={self.num_beams} must be between 1 and the "
                       f"vocabulary size ({vocab_size})")
    if self.length_penalty < 0:
      raise ValueError(f"--length_penalty={self.length_penalty} must be >= 0")
    if self.decode == "sample" and self.temperature <= 0:
      raise ValueError(f"--temperature={self.temperature} must be positive with "
                       "--decode=sample (greedy is --decode=greedy)")
    if not 0 <= self.top_k <= vocab_size:
      raise ValueError(f"--top_k={self.top_k} must be between 0 (off) and the vocabulary "
                       f"size ({vocab_size})")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"--top_p={self.top_p} must be in (0, 1]")
    if self.max_decode_length < 1:
      raise ValueError(f"--max_decode_length={self.max_decode_length} must be positive")
    if self.batch_size < 1:
      raise ValueError(f"--batch_size={self.batch_size} must be positive")


@dataclasses.dataclass(frozen=True)
class Example:
  inputs: str
  input_ids: tuple[int, ...]
  targets: str | None = None
  target_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Model:
  """Parameters on `mesh`, the config, and what the model takes."""
  params: Any
  config: model_lib.ModelConfig
  vocabulary: Any  # seqio.SentencePieceVocabulary
  max_inputs_length: int
  max_targets_length: int
  mesh: jax.sharding.Mesh
  source: str


def vocabulary(path: str, extra_ids: int) -> Any:
  import seqio  # pylint: disable=import-outside-toplevel  (TensorFlow)
  if "://" not in path and not os.path.isfile(path):
    raise FileNotFoundError(f"vocabulary {path} does not exist")
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def place_params(params: Any, config: model_lib.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """Host params -> arrays on `mesh`, sharded by the logical axis rules."""
  return jax.device_put(params, model_lib.abstract_params_and_shardings(config, mesh)[1])


def load_model(*, model_dir: str | None = None, step: int | None = None,
               hf_dir: str | None = None, dtype: str | None = None,
               mesh: jax.sharding.Mesh | None = None) -> Model:
  """A `ul2 train` model_dir (its model_config.json and a checkpoint) or a Hugging
  Face T5 directory. dtype: activations (default: the training run's; float32 for
  a Hugging Face directory)."""
  if (model_dir is None) == (hf_dir is None):
    raise ValueError("give one of --model_dir or --hf_dir")
  mesh = sharding.make_mesh(sharding.MeshConfig()) if mesh is None else mesh
  overrides = {"dtype": dtype} if dtype else {}
  if model_dir is not None:
    from ul2 import loop  # pylint: disable=import-outside-toplevel
    settings = model_settings.read(model_dir)
    config = dataclasses.replace(settings.model, dropout_rate=0.0, **overrides)
    params, step = loop.load_params(model_dir, config, step, mesh)
    lengths = settings.task_feature_lengths
    return Model(params, config, vocabulary(settings.vocab_path, settings.extra_ids),
                 lengths["inputs"], lengths["targets"], mesh,
                 f"{model_dir} step {step}")
  if step is not None:
    raise ValueError("--step applies to --model_dir, not --hf_dir")
  path = pathlib.Path(hf_dir)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} not found: is {hf_dir!r} a Hugging "
                            "Face T5 directory?")
  tok_config = {}
  if (path / "tokenizer_config.json").is_file():
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
  max_length = tok_config.get("model_max_length", HF_DEFAULT_MAX_LENGTH)
  if not isinstance(max_length, int) or max_length > 1 << 20:
    max_length = HF_DEFAULT_MAX_LENGTH
  params, config = export.load_hf(path, **{"dtype": "float32", "dropout_rate": 0.0,
                                           **overrides})
  vocab = vocabulary(str(path / "spiece.model"),
                     int(tok_config.get("extra_ids", export.EXTRA_IDS)))
  return Model(place_params(params, config, mesh), config, vocab, max_length, max_length,
               mesh, str(path))


CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_per_core(environ: Any = os.environ) -> int | None:
  """Gives XLA:CPU one device per core this process may use, so that decoding
  splits its batch over the cores as over any devices (`run`): the one-query
  attention products of a decoder step run in XLA:CPU's own dot emitter on one
  core, and with a device per core they run on every core at once
  (benchmarks/README.md, decode_bench.py). Sets
  XLA_FLAGS in `environ`, so it must run before JAX starts its backends, as
  `ul2 infer` does first; keeps a device count the user set, and only the CPU
  backend reads the flag. Returns the count set, or None where it set none."""
  if CPU_DEVICES_FLAG in environ.get("XLA_FLAGS", ""):
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if not cores or cores < 2:
    return None
  environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {CPU_DEVICES_FLAG}={cores}".strip()
  return cores


# ----------------------------------------------------------------------------
# Inputs.


def read_file(path: str, input_key: str = "inputs", target_key: str = "targets",
              need_targets: bool = False) -> list[tuple[str, str | None]]:
  """(inputs, targets) texts of a text file (one input a line) or a JSONL file
  (`input_key`, and `target_key` where present). Any bad line is a ValueError
  naming it."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"input file {path} does not exist")
  is_json = p.suffix in JSON_SUFFIXES
  if need_targets and not is_json:
    raise ValueError(f"--score needs targets: give a JSONL file with {target_key!r}, "
                     f"not the text file {path}")
  out = []
  with p.open(encoding="utf-8", errors="replace") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      where = f"{path}:{n}"
      if not is_json:
        if not line.strip():
          raise ValueError(f"{where}: empty input line")
        out.append((line, None))
        continue
      if not line.strip():
        raise ValueError(f"{where}: empty line (one JSON object per line)")
      record = jsonl.parse_object(line, where)
      if input_key not in record:
        raise ValueError(f"{where}: no {input_key!r} key (it has {sorted(record)}); "
                         "choose the field with --input_key")
      text, targets = record[input_key], record.get(target_key)
      if not isinstance(text, str):
        raise ValueError(f"{where}: {input_key!r} is not a string")
      if not text.strip():
        raise ValueError(f"{where}: empty input")
      if need_targets and target_key not in record:
        raise ValueError(f"{where}: no {target_key!r} key, which --score needs")
      if targets is not None and not isinstance(targets, str):
        raise ValueError(f"{where}: {target_key!r} is not a string")
      out.append((text, targets))
  if not out:
    raise ValueError(f"{path} holds no inputs")
  return out


def mode_token_ids(vocab: Any, mode_token: str | None) -> tuple[int, ...]:
  """As in training (ul2.denoisers): the token's own piece, else its encoding."""
  if not mode_token:
    return ()
  tokenizer = vocab.tokenizer
  piece = tokenizer.piece_to_id(mode_token)
  if piece != tokenizer.unk_id() and tokenizer.id_to_piece(piece) == mode_token:
    return (piece,)
  return tuple(vocab.encode(mode_token))


def _fit(ids: Sequence[int], limit: int, eos: int) -> tuple[tuple[int, ...], bool]:
  """ids + EOS, cut to `limit` tokens keeping the EOS; whether it was cut."""
  ids = tuple(ids)
  if len(ids) + 1 > limit:
    return ids[:limit - 1] + (eos,), True
  return ids + (eos,), False


def tokenize(texts: Sequence[tuple[str, str | None]], model: Model, options: Options,
             mode_token: str | None = None) -> tuple[list[Example], int]:
  """Texts -> examples: [mode token] inputs EOS, targets EOS; inputs longer than the
  model takes and targets longer than --max_decode_length are cut (returns how
  many were)."""
  prefix = mode_token_ids(model.vocabulary, mode_token)
  eos = model.vocabulary.eos_id
  examples, cut = [], 0
  for text, targets in texts:
    input_ids, cut_in = _fit(prefix + tuple(model.vocabulary.encode(text)),
                             model.max_inputs_length, eos)
    target_ids, cut_out = None, False
    if targets is not None:
      target_ids, cut_out = _fit(model.vocabulary.encode(targets), options.max_decode_length,
                                 eos)
    cut += cut_in or cut_out
    examples.append(Example(text, input_ids, targets, target_ids))
  return examples, cut


def task_examples(name: str, split: str, model: Model, options: Options,
                  mode_token: str | None = None, num_examples: int | None = None
                  ) -> tuple[list[Example], int, Any]:
  """A registered seqio task's split, in order, as examples (its inputs and
  targets as the task's preprocessors make them, the denoisers seeded with
  `options.seed`); also how many were cut, and the task (for its metrics)."""
  import seqio  # pylint: disable=import-outside-toplevel  (TensorFlow)
  from ul2 import data  # pylint: disable=import-outside-toplevel
  provider = data.provider(name)
  # The lengths the model was trained with (the denoisers size their windows by them).
  lengths = {"inputs": model.max_inputs_length, "targets": model.max_targets_length}
  try:
    ds = provider.get_dataset(lengths, split=split, shuffle=False, seed=options.seed,
                              num_epochs=1, trim_output_features=False)
  except (ValueError, KeyError) as e:
    raise ValueError(f"task {name} split {split!r}: {' '.join(str(e).split())}") from e
  if num_examples:
    ds = ds.take(num_examples)
  vocab = provider.output_features["targets"].vocabulary
  prefix = mode_token_ids(vocab, mode_token)
  examples, cut = [], 0
  for ex in ds.as_numpy_iterator():
    ins = [int(t) for t in ex["inputs"] if t]
    outs = [int(t) for t in ex["targets"] if t]
    ins = ins[:-1] if ins and ins[-1] == vocab.eos_id else ins
    outs = outs[:-1] if outs and outs[-1] == vocab.eos_id else outs
    input_ids, cut_in = _fit(prefix + tuple(ins), model.max_inputs_length, vocab.eos_id)
    target_ids, cut_out = _fit(outs, options.max_decode_length, vocab.eos_id)
    cut += cut_in or cut_out
    examples.append(Example(vocab.decode(list(input_ids)), input_ids,
                            vocab.decode(list(target_ids)), target_ids))
  if not examples:
    raise ValueError(f"task {name} has no examples in split {split!r}")
  task = provider if isinstance(provider, seqio.Task) else None
  return examples, cut, task


# ----------------------------------------------------------------------------
# Running.


def bucket(length: int, limit: int) -> int:
  """The padded length of a batch whose longest row has `length` tokens."""
  return min(max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length()), max(limit, length))


@functools.lru_cache(maxsize=None)
def decode_fn(config: model_lib.ModelConfig, options: Options,
              eos_id: int = decoding.EOS_ID) -> Callable:
  """Jitted (params, inputs, targets, keys) -> (tokens [b, t], logprobs [b], scores [b]);
  `eos_id`: the vocabulary's."""
  if options.score:
    def fn(params, inputs, targets, keys):
      del keys
      logprobs = decoding.score(params, config, inputs, targets)
      return targets, logprobs, logprobs
  elif options.decode == "beam":
    def fn(params, inputs, targets, keys):
      del targets, keys
      tokens, scores, logprobs = decoding.beam_search(
          params, config, inputs, num_beams=options.num_beams,
          max_decode_length=options.max_decode_length, alpha=options.length_penalty,
          eos_id=eos_id)
      return tokens[:, 0], logprobs[:, 0], scores[:, 0]
  else:
    temperature = options.temperature if options.decode == "sample" else 0.0
    def fn(params, inputs, targets, keys):
      del targets
      tokens, logprobs = decoding.sample(
          params, config, inputs, max_decode_length=options.max_decode_length,
          temperature=temperature, top_k=options.top_k, top_p=options.top_p, rng=keys,
          eos_id=eos_id)
      return tokens, logprobs, logprobs
  return jax.jit(fn, compiler_options=compiler.inference_options(dtype=config.dtype))


def _until_eos(row: np.ndarray, eos: int) -> list[int]:
  ends = np.flatnonzero(row == eos)
  return row[:ends[0] + 1].tolist() if ends.size else row.tolist()


@dataclasses.dataclass(frozen=True)
class Stats:
  examples: int
  tokens: int  # Generated (EOS included) or, when scoring, scored.
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / max(self.seconds, 1e-9)


def run(model: Model, examples: Sequence[Example], options: Options,
        progress: Callable[[int, int, int, float], None] | None = None
        ) -> tuple[list[dict], Stats]:
  """Decodes (or scores) every example; results in input order (see module doc).
  `progress(done, total, tokens, seconds)` is called after each batch."""
  options.check(model.config.vocab_size)
  if options.score and any(e.target_ids is None for e in examples):
    raise ValueError("--score needs targets for every input")
  mesh = model.mesh
  dp = sharding.data_parallel_size(mesh)
  rows = -(-options.batch_size // dp) * dp
  batch_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES))
  # The implementation choices ("auto" attention, compiler options), made once for the mesh.
  fn = decode_fn(model.config.resolved(sharding.platform(mesh), dp), options,
                 model.vocabulary.eos_id)
  base_key = jax.random.key(options.seed)
  order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
  results: list[dict | None] = [None] * len(examples)
  tokens, start = 0, time.perf_counter()
  rules = list(sharding.LOGICAL_AXIS_RULES)
  for first in range(0, len(order), rows):
    index = order[first:first + rows]
    batch = [examples[i] for i in index]
    in_len = bucket(max(len(e.input_ids) for e in batch), model.max_inputs_length)
    inputs = np.zeros((rows, in_len), np.int32)
    for r, e in enumerate(batch):
      inputs[r, :len(e.input_ids)] = e.input_ids
    tgt_len = options.max_decode_length
    if options.score:
      tgt_len = bucket(max(len(e.target_ids) for e in batch), options.max_decode_length)
    targets = np.zeros((rows, tgt_len), np.int32)
    if options.score:
      for r, e in enumerate(batch):
        targets[r, :len(e.target_ids)] = e.target_ids
    ids = np.full((rows,), -1, np.int64)
    ids[:len(index)] = index
    keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.asarray(ids, jnp.uint32))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      out = fn(model.params, jax.device_put(inputs, batch_sharding),
               jax.device_put(targets, batch_sharding), keys)
    out_tokens, logprobs, scores = jax.device_get(out)
    for r, (i, e) in enumerate(zip(index, batch)):
      result = {"inputs": e.inputs, "input_ids": list(e.input_ids)}
      if e.targets is not None:
        result.update(targets=e.targets, target_ids=list(e.target_ids))
      if options.score:
        tokens += len(e.target_ids)
      else:
        pred = _until_eos(out_tokens[r], model.vocabulary.eos_id)
        tokens += len(pred)
        result.update(prediction=model.vocabulary.decode(pred), prediction_ids=pred)
      result["score"] = float(logprobs[r])
      if options.decode == "beam" and not options.score:
        result["beam_score"] = float(scores[r])
      results[i] = result
    if progress is not None:
      progress(min(first + rows, len(order)), len(order), tokens,
               time.perf_counter() - start)
  return results, Stats(len(examples), tokens, time.perf_counter() - start)


def task_metrics(task: Any, results: Sequence[dict], score: bool) -> dict[str, float]:
  """The task's seqio metrics (predict or score metric fns, on postprocessed text),
  and `exact_match` (prediction ids = target ids) when decoding."""
  metrics: dict[str, float] = {}
  if not score:
    metrics["exact_match"] = float(np.mean([r["prediction_ids"] == r["target_ids"]
                                            for r in results]))
  if task is None:
    return metrics
  post = task.postprocess_fn or (lambda text, **_: text)
  targets = [post(r["targets"], example={}, is_target=True) for r in results]
  fns = task.score_metric_fns if score else task.predict_metric_fns
  values = ([r["score"] for r in results] if score else
            [post(r["prediction"], example={}, is_target=False) for r in results])
  for fn in fns:
    for key, value in fn(targets, values).items():
      metrics[key] = float(getattr(value, "value", value))
  return metrics


def write_jsonl(results: Sequence[dict], path: str) -> None:
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("w", encoding="utf-8") as f:
    for r in results:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


class ProgressBar:
  """`progress` for `run`: a bar on a terminal (redrawn in place), else a line at
  each tenth; silent for a single batch."""

  def __init__(self, stream: Any, width: int = 30):
    self._stream, self._width, self._shown = stream, width, -1
    self._tty = hasattr(stream, "isatty") and stream.isatty()

  def __call__(self, done: int, total: int, tokens: int, seconds: float) -> None:
    if done == total and self._shown < 0:
      return
    tenth = done * 10 // total
    if not self._tty and tenth == self._shown:
      return
    self._shown = tenth
    filled = done * self._width // total
    line = (f"[{'#' * filled}{'.' * (self._width - filled)}] {done}/{total} examples, "
            f"{tokens / max(seconds, 1e-9):,.0f} tokens/s")
    self._stream.write(("\r" + line + ("\n" if done == total else "")) if self._tty
                       else line + "\n")
    self._stream.flush()
