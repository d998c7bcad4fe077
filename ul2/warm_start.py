"""Warm start: the parameters of a checkpoint, placed on a mesh tensor by tensor.

    source = warm_start.parse(path)                     # where, and what kind
    warm_start.check_matches(source, config.model, vocabulary_size=vocab.vocab_size)
    params, source_config = warm_start.load_params(source, config.model, param_shardings)

`path` (the `--init_from` of `ul2 train`) is one of

* a Hugging Face T5 directory: `config.json` and `model.safetensors`, or sharded
  `model-*.safetensors` with `model.safetensors.index.json` (as `save_pretrained`
  writes them);
* a `ul2 train` model_dir: its latest checkpoint, or `DIR@STEP` for another; its
  model settings are read from `model_config.json` (`ul2.model_settings`), never
  by executing its config.gin.

Only parameters are read (a warm-started run starts at step 0 with a fresh
optimiser state and data stream). Each parameter goes straight onto its target
sharding: a Hugging Face tensor (or, for a scanned stack, the tensors of its
layers) is read from the safetensors files, converted (`ul2.export.hf_param_specs`)
and placed with `jax.make_array_from_callback` before the next is read, so a host
never holds more than one parameter beyond what is on its devices; an ul2
checkpoint is restored by orbax directly onto the shardings. Parameters are
float32, whatever the checkpoint's dtype (bfloat16 releases included).

The configured model must have the source's architecture: `check_matches` raises
one line naming each field that differs with both values (a T5 v1.0 checkpoint,
whose feed-forward is not gated, included). The model's vocabulary may be larger
than the SentencePiece vocabulary plus its extra ids (T5's 32128 for 32100); only
a smaller one is an error. Errors are ValueError or FileNotFoundError, one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from ul2 import export, model_settings
from ul2 import model as model_lib
from ul2.model import ModelConfig

HF = "huggingface"
UL2 = "ul2"
HF_INDEX = "model.safetensors.index.json"
# What two configs must agree on for the parameters to be the same function.
ARCHITECTURE = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "num_encoder_layers",
                "num_decoder_layers", "feed_forward", "tie_word_embeddings",
                "relative_attention_num_buckets", "relative_attention_max_distance")


@dataclasses.dataclass(frozen=True)
class Source:
  """A checkpoint to start from: `kind` is HF or UL2; `step` (UL2 only) None = latest."""
  path: str
  kind: str
  step: int | None = None


def parse(path: str) -> Source:
  """What `path` is: a Hugging Face T5 directory or a ul2 model_dir (`DIR@STEP`; local
  or on an object store, `gs://...`)."""
  text = str(path)
  step = None
  match = re.fullmatch(r"(.+)@(\d+)", text)
  if match and not epath.Path(text).exists():
    text, step = match.group(1), int(match.group(2))
  where = epath.Path(text)
  if not where.exists():
    raise FileNotFoundError(f"warm start: {text} does not exist")
  if not where.is_dir():
    raise ValueError(f"warm start: {text} is not a directory (give a Hugging Face T5 "
                     "directory or a ul2 model_dir)")
  if (where / "config.json").is_file():
    if step is not None:
      raise ValueError(f"warm start: @{step} applies to a ul2 model_dir; {text} is a "
                       "Hugging Face directory")
    return Source(text, HF)
  if (where / model_settings.FILENAME).is_file() or (where / "checkpoints").is_dir():
    return Source(text, UL2, step)
  raise ValueError(f"warm start: {text} is not a checkpoint: no config.json (Hugging Face "
                   f"T5 directory) or {model_settings.FILENAME} (ul2 model_dir) in it")


def _source(source: Source | str) -> Source:
  return source if isinstance(source, Source) else parse(source)


def _hf_config(source: Source) -> dict:
  path = pathlib.Path(source.path) / "config.json"
  try:
    hf = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"warm start: cannot read {path}: {e}") from e
  if not isinstance(hf, dict) or hf.get("model_type", "t5") != "t5":
    raise ValueError(f"warm start: {path} is not a T5 config (model_type "
                     f"{hf.get('model_type') if isinstance(hf, dict) else None!r})")
  return hf


def architecture(source: Source | str) -> dict[str, Any]:
  """The source's `ARCHITECTURE` fields; `feed_forward` as Hugging Face names it
  ("gated-silu", "gated-gelu"; T5 v1.0's "relu" is not gated)."""
  source = _source(source)
  if source.kind == UL2:
    return config_architecture(model_settings.read(source.path).model)
  hf = _hf_config(source)
  try:
    return {
        "vocab_size": hf["vocab_size"], "d_model": hf["d_model"], "num_heads": hf["num_heads"],
        "head_dim": hf["d_kv"], "d_ff": hf["d_ff"], "num_encoder_layers": hf["num_layers"],
        "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
        "feed_forward": hf.get("feed_forward_proj", "relu"),
        # As export.config_from_hf: T5 ties unless told otherwise.
        "tie_word_embeddings": bool(hf.get("scale_decoder_outputs",
                                           hf.get("tie_word_embeddings", True))),
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
    }
  except KeyError as e:
    raise ValueError(f"warm start: {source.path}/config.json has no {e.args[0]!r}") from e


def config_architecture(config: ModelConfig) -> dict[str, Any]:
  fields = {name: getattr(config, name) for name in ARCHITECTURE if name != "feed_forward"}
  return {**fields, "feed_forward": f"gated-{config.activation}"}


def _describe(field: str, value: Any) -> str:
  if field == "feed_forward" and not str(value).startswith("gated-"):
    return f"{value!r} (not gated: T5 v1.0)"
  return repr(value) if isinstance(value, str) else str(value)


def check_matches(source: Source | str, config: ModelConfig,
                  vocabulary_size: int | None = None) -> None:
  """Raises one ValueError line naming every architecture field in which `config`
  differs from the source, with both values; and if `vocabulary_size` (the
  SentencePiece pieces plus extra ids) exceeds the model's vocab_size."""
  source = _source(source)
  theirs, ours = architecture(source), config_architecture(config)
  diffs = [f"{f} {_describe(f, theirs[f])} in the checkpoint, {_describe(f, ours[f])} "
           "configured" for f in ARCHITECTURE if theirs[f] != ours[f]]
  if source.kind == UL2:
    src = model_settings.read(source.path).model
    for f in ("final_decoder_norm_scale", "scan_layers"):
      if getattr(src, f) != getattr(config, f):
        diffs.append(f"{f} {getattr(src, f)} in the checkpoint, {getattr(config, f)} "
                     "configured")
  if diffs:
    raise ValueError(f"warm start from {source.path}: the model does not match: "
                     f"{'; '.join(diffs)}")
  if vocabulary_size is not None and vocabulary_size > config.vocab_size:
    raise ValueError(f"warm start from {source.path}: the vocabulary has {vocabulary_size} "
                     f"ids (pieces and extra ids) but the model only {config.vocab_size}")


def source_config(source: Source | str | None, **overrides: Any) -> ModelConfig:
  """The source's ModelConfig, with `overrides` for the fields it does not fix
  (dtype, dropout_rate, scan_layers, ...). `gin/models/from_hf.gin` calls it with
  source = INIT_FROM, so that a run's model is its checkpoint's.

  Raises:
    ValueError: in one line, for no source; a T5 v1.0 (non-gated) checkpoint; or
      an override of an architecture field (`ARCHITECTURE`, activation) that
      differs from the source's, naming each such field with both values.
  """
  if source is None:
    raise ValueError("warm start: the model comes from the checkpoint (INIT_FROM, "
                     "gin/models/from_hf.gin) but none is given: pass --init_from=PATH")
  source = _source(source)
  if source.kind == UL2:
    theirs = model_settings.read(source.path).model
  else:
    arch = architecture(source)
    if not str(arch["feed_forward"]).startswith("gated-"):
      raise ValueError(f"warm start from {source.path}: feed_forward_proj "
                       f"{arch['feed_forward']!r} is not gated (T5 v1.0); ul2 models are T5 "
                       "v1.1 / UL2 (gated-gelu or gated-silu)")
    theirs = export.config_from_hf(_hf_config(source))
  fixed = [f for f in ARCHITECTURE if f != "feed_forward"] + ["activation"]
  diffs = [f"{f} {_describe(f, getattr(theirs, f))} in the checkpoint, "
           f"{_describe(f, overrides[f])} configured"
           for f in fixed if f in overrides and overrides[f] != getattr(theirs, f)]
  if diffs:
    raise ValueError(f"warm start from {source.path}: the model does not match: "
                     f"{'; '.join(diffs)}")
  return dataclasses.replace(theirs, **overrides)


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """The NamedShardings of the (unboxed) params on `mesh`, by the logical axis rules."""
  return model_lib.abstract_params_and_shardings(config, mesh)[1]


# ----------------------------------------------------------------------------
# Reading.


class _SafetensorsReader:
  """Tensors of a Hugging Face directory's safetensors files, read one at a time."""

  def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    index = directory / HF_INDEX
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = [f.name for f in sorted(directory.glob("model*.safetensors"))]
      weight_map = None
    if not files:
      raise FileNotFoundError(f"warm start: no model.safetensors (or {HF_INDEX}) in "
                              f"{directory}")
    self._handles = {}
    for name in files:
      if not (directory / name).is_file():
        raise FileNotFoundError(f"warm start: {directory / name} (named in {HF_INDEX}) "
                                "does not exist")
      self._handles[name] = stack.enter_context(
          safe_open(str(directory / name), framework="numpy"))
    if weight_map is None:
      weight_map = {key: name for name, h in self._handles.items() for key in h.keys()}
    self.keys = weight_map
    self._directory = directory

  def __call__(self, key: str) -> np.ndarray:
    handle = self._handles[self.keys[key]]
    dtype = handle.get_slice(key).get_dtype()
    if dtype == "BF16":  # numpy has no bfloat16: read the bytes as ml_dtypes' bfloat16.
      return self._bfloat16(self.keys[key], key).astype(np.float32)
    return np.asarray(handle.get_tensor(key), np.float32)

  def _bfloat16(self, name: str, key: str) -> np.ndarray:
    import ml_dtypes  # pylint: disable=import-outside-toplevel  (a jax dependency)
    with open(self._directory / name, "rb") as f:
      header_size = int.from_bytes(f.read(8), "little")
      info = json.loads(f.read(header_size))[key]
      begin, end = info["data_offsets"]
      f.seek(8 + header_size + begin)
      data = f.read(end - begin)
    return np.frombuffer(data, ml_dtypes.bfloat16).reshape(info["shape"])


def _place(value: np.ndarray, target: Any) -> jax.Array:
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def _path(keys: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in keys)


def _load_hf(source: Source, config: ModelConfig, shardings: Any) -> Any:
  specs = export.hf_param_specs(config)
  abstract = nn.unbox(model_lib.abstract_params(config))
  shapes = {_path(p): leaf.shape for p, leaf in
            jax.tree_util.tree_flatten_with_path(abstract)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shardings)
  with contextlib.ExitStack() as stack:
    read = _SafetensorsReader(pathlib.Path(source.path), stack)
    get: Callable[[str], np.ndarray] = lambda key: read(export.hf_key(key, read.keys))
    placed = []
    for keys, target in leaves:
      path = _path(keys)
      if path not in specs:
        raise ValueError(f"warm start: no Hugging Face tensor for parameter {'/'.join(path)}")
      hf_keys, convert = specs[path]
      try:
        value = np.asarray(convert([get(k) for k in hf_keys]), np.float32)
      except KeyError as e:
        raise ValueError(f"warm start from {source.path}: {e.args[0]}") from e
      if value.shape != shapes[path]:
        raise ValueError(f"warm start from {source.path}: parameter {'/'.join(path)} has "
                         f"shape {value.shape} in the checkpoint, {shapes[path]} configured")
      placed.append(_place(value, target))
      del value
    export.check_hf_extras(get, read.keys, config)
  return jax.tree_util.tree_unflatten(treedef, placed)


def _ul2_step(source: Source, ckpt: Any) -> int:
  steps = ckpt.all_steps()
  if not steps:
    raise ValueError(f"warm start: no checkpoint in {ckpt.directory}")
  if source.step is None:
    return max(steps)
  if source.step not in steps:
    raise ValueError(f"warm start: no checkpoint for step {source.step} in {ckpt.directory}; "
                     f"there are steps {sorted(steps)}")
  return source.step


def _load_ul2(source: Source, config: ModelConfig, shardings: Any) -> Any:
  from ul2 import checkpoint  # pylint: disable=import-outside-toplevel  (orbax)
  abstract = nn.unbox(model_lib.abstract_params(config))
  targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=s),
                         abstract, shardings)
  ckpt = checkpoint.Checkpointer(source.path, read_only=True)
  try:
    step = _ul2_step(source, ckpt)
    params, _, _ = ckpt.restore(step, targets)
  finally:
    ckpt.close()
  return params


def load_params(source: Source | str, config: ModelConfig, shardings: Any
                ) -> tuple[Any, ModelConfig]:
  """The source's parameters, placed on `shardings`, and the source's ModelConfig.

  Args:
    source: a `Source` or a path (see `parse`).
    config: the configured model; checked against the source (`check_matches`).
    shardings: a tree of `jax.sharding.Sharding`s shaped like the (unboxed)
      params of `config`, e.g. `param_shardings(config, mesh)` or a train
      state's param shardings.
  Returns:
    (params: the unboxed float32 params tree of jax.Arrays on `shardings`,
     the source's ModelConfig, with `config`'s non-architecture fields).
  """
  source = _source(source)
  check_matches(source, config)
  keep = {f: getattr(config, f) for f in ("dtype", "scan_layers", "remat_policy",
                                          "attention_impl", "dropout_rate",
                                          "final_decoder_norm_scale")}
  if source.kind == UL2:
    return _load_ul2(source, config, shardings), source_config(source, **keep)
  return _load_hf(source, config, shardings), source_config(source, **keep)
