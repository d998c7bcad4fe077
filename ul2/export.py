"""Conversion between our params and Hugging Face `T5ForConditionalGeneration`.

    sd = to_hf_state_dict(params, config)        # {"shared.weight": np.ndarray, ...}
    params = from_hf_state_dict(sd, config)
    save_hf(params, config, vocab_path, out_dir) # config.json, model.safetensors, spiece.model, ...
    params, config = load_hf(out_dir)

`params` is the "params" collection (`variables["params"]`), boxed or not, with
layers listed or scanned (`config.scan_layers`). Arrays are float32 numpy.
Hugging Face keeps (out, in) Linear weights; ours are (in, out) with heads and
head_dim as separate axes, so the mapping is transposes and reshapes only: exact.
torch and transformers are never imported here (safetensors' numpy API is).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np
from etils import epath
from flax import linen as nn

from ul2.model import ModelConfig, abstract_params

EXTRA_IDS = 100  # T5's, and the default of a Hugging Face directory without tokenizer_config.

# ---------------------------------------------------------------------------
# Per-layer mapping: (HF suffix under `block.{i}.`, our path under the layer,
# kind). Kinds say how an HF (out, in) weight becomes ours.

_ATTN = (("q", "query", "in_heads"), ("k", "key", "in_heads"), ("v", "value", "in_heads"),
         ("o", "out", "heads_out"))
_MLP = (("wi_0", "wi_0", "t"), ("wi_1", "wi_1", "t"), ("wo", "wo", "t"))


def _layer_table(decoder: bool) -> list[tuple[str, tuple[str, ...], str]]:
  table = []
  if decoder:
    blocks = (("layer.0.SelfAttention", "self_attention", "layer.0.layer_norm",
               "pre_self_attention_layer_norm"),
              ("layer.1.EncDecAttention", "encoder_decoder_attention", "layer.1.layer_norm",
               "pre_cross_attention_layer_norm"))
    mlp_hf, mlp_norm = "layer.2", "pre_mlp_layer_norm"
  else:
    blocks = (("layer.0.SelfAttention", "attention", "layer.0.layer_norm",
               "pre_attention_layer_norm"),)
    mlp_hf, mlp_norm = "layer.1", "pre_mlp_layer_norm"
  for hf_attn, ours_attn, hf_norm, ours_norm in blocks:
    table.append((f"{hf_norm}.weight", (ours_norm, "scale"), "same"))
    for hf, ours, kind in _ATTN:
      table.append((f"{hf_attn}.{hf}.weight", (ours_attn, ours, "kernel"), kind))
  table.append((f"{mlp_hf}.layer_norm.weight", (mlp_norm, "scale"), "same"))
  for hf, ours, kind in _MLP:
    table.append((f"{mlp_hf}.DenseReluDense.{hf}.weight", ("mlp", ours, "kernel"), kind))
  return table


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  if kind == "same":
    return x
  if kind == "t":
    return x.T
  if kind == "in_heads":  # [embed, heads, kv] -> [heads*kv, embed]
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_out":  # [heads, kv, embed] -> [embed, heads*kv]
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(kind)


def _from_hf(x: np.ndarray, kind: str, config: ModelConfig) -> np.ndarray:
  h, d = config.num_heads, config.head_dim
  if kind == "same":
    return x
  if kind == "t":
    return x.T
  if kind == "in_heads":  # [heads*kv, embed] -> [embed, heads, kv]
    return x.T.reshape(x.shape[1], h, d)
  if kind == "heads_out":  # [embed, heads*kv] -> [heads, kv, embed]
    return x.T.reshape(h, d, x.shape[0])
  raise ValueError(kind)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _plain(params: Any) -> Any:
  """Unboxed numpy float32 tree; accepts the params collection or {"params": ...}."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  params = nn.unbox(params)
  if "params" in params and "token_embedder" not in params:
    params = params["params"]
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _layer_getter(stack: dict, scanned: bool) -> Callable[[int, tuple[str, ...]], np.ndarray]:
  if scanned:
    return lambda i, path: _get(stack["layers"], path)[i]
  return lambda i, path: _get(stack[f"layers_{i}"], path)


# ---------------------------------------------------------------------------
# The Hugging Face tensors in `T5ForConditionalGeneration.state_dict()` order (the
# order `save_pretrained` shards in), each with the param it comes from.


@dataclasses.dataclass(frozen=True)
class HfTensor:
  """One Hugging Face tensor: `key`, made from our param `path` (`index`: its slice
  `[index]`, a layer of a scanned stack) by `kind`; `path=None` is a tensor of ones
  (the final decoder norm of a model without its scale)."""
  key: str
  path: tuple[str, ...] | None
  index: int | None
  kind: str
  shape: tuple[int, ...]


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "same":
    return tuple(shape)
  if kind == "t":
    return tuple(reversed(shape))
  if kind == "in_heads":  # [embed, heads, kv] -> [heads*kv, embed]
    return (int(np.prod(shape[1:])), shape[0])
  if kind == "heads_out":  # [heads, kv, embed] -> [embed, heads*kv]
    return (shape[-1], int(np.prod(shape[:-1])))
  raise ValueError(kind)


def hf_tensors(config: ModelConfig) -> list[HfTensor]:
  """Every tensor of the exported model, in Hugging Face's state-dict order, with its
  shape (computed from `config`, nothing read)."""
  e, h, d, f = config.d_model, config.num_heads, config.head_dim, config.d_ff
  ours_shape = {"same": lambda: (e,), "in_heads": lambda: (e, h, d),
                "heads_out": lambda: (h, d, e)}
  mlp_shape = {"wi_0": (e, f), "wi_1": (e, f), "wo": (f, e)}
  out = [HfTensor("shared.weight", ("token_embedder", "embedding"), None, "same",
                  (config.vocab_size, e))]
  for name, n_layers, decoder in (("encoder", config.num_encoder_layers, False),
                                  ("decoder", config.num_decoder_layers, True)):
    table = {hf: (ours, kind) for hf, ours, kind in _layer_table(decoder)}
    hf_order = [k for k in table if "DenseReluDense" not in k and "layer_norm" not in k]
    for i in range(n_layers):
      if config.scan_layers:
        where = lambda ours: ((name, "layers", *ours), i)
      else:
        where = lambda ours: ((name, f"layers_{i}", *ours), None)
      keys = []
      for sub in ("layer.0", "layer.1", "layer.2")[:3 if decoder else 2]:
        attention = [k for k in hf_order if k.startswith(sub + ".")]
        keys += attention
        if sub == "layer.0" and i == 0:
          keys.append("layer.0.SelfAttention.relative_attention_bias.weight")
        keys += [k for k in table if k.startswith(sub + ".DenseReluDense")]
        keys.append(f"{sub}.layer_norm.weight")
      for hf in keys:
        key = f"{name}.block.{i}.{hf}"
        if hf.endswith("relative_attention_bias.weight"):
          out.append(HfTensor(key, (name, "relpos_bias", "rel_embedding"), None, "t",
                              (config.relative_attention_num_buckets, h)))
          continue
        ours, kind = table[hf]
        path, index = where(ours)
        shape = mlp_shape[ours[1]] if ours[0] == "mlp" else ours_shape[kind]()
        out.append(HfTensor(key, path, index, kind, _hf_shape(shape, kind)))
    norm = (name, f"{name}_norm", "scale")
    if decoder and not config.final_decoder_norm_scale:
      norm = None  # A norm without scale is a norm with scale 1.
    out.append(HfTensor(f"{name}.final_layer_norm.weight", norm, None, "same", (e,)))
  if not config.tie_word_embeddings:
    out.append(HfTensor("lm_head.weight", ("decoder", "logits_dense", "kernel"), None, "t",
                        (config.vocab_size, e)))
  return out


def hf_tensor(tensor: HfTensor, read: Callable[[tuple[str, ...], int | None], np.ndarray]
              ) -> np.ndarray:
  """`tensor`'s value (contiguous float32) from `read(path, index)` of our params."""
  if tensor.path is None:
    return np.ones(tensor.shape, np.float32)
  value = _to_hf(np.asarray(read(tensor.path, tensor.index), np.float32), tensor.kind)
  return np.ascontiguousarray(value)


def to_hf_state_dict(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> Hugging Face T5 state dict (the keys `save_pretrained` writes)."""
  p = _plain(params)
  read = lambda path, index: _get(p, path) if index is None else _get(p, path)[index]
  return {t.key: hf_tensor(t, read) for t in hf_tensors(config)}


HfSpec = tuple[tuple[str, ...], Callable[[list[np.ndarray]], np.ndarray]]


def hf_param_specs(config: ModelConfig) -> dict[tuple[str, ...], HfSpec]:
  """How each of our params is made from Hugging Face tensors, one param at a time.

  Returns {our param path: (HF keys, fn(list of those tensors) -> our array)}, the
  paths of `nn.unbox(abstract_params(config))`. A scanned stack's param takes the
  tensor of every layer (stacked). `lm_head.weight` falls back to `shared.weight`
  where a checkpoint has none (`hf_key`).
  """
  specs: dict[tuple[str, ...], HfSpec] = {
      ("token_embedder", "embedding"): (("shared.weight",), lambda xs: xs[0])}
  for name, n_layers, decoder in (("encoder", config.num_encoder_layers, False),
                                  ("decoder", config.num_decoder_layers, True)):
    for hf, ours, kind in _layer_table(decoder):
      convert = functools.partial(_from_hf, kind=kind, config=config)
      keys = tuple(f"{name}.block.{i}.{hf}" for i in range(n_layers))
      if config.scan_layers:
        specs[(name, "layers", *ours)] = (keys, lambda xs, c=convert: np.stack(
            [c(x) for x in xs]))
      else:
        for i, key in enumerate(keys):
          specs[(name, f"layers_{i}", *ours)] = ((key,), lambda xs, c=convert: c(xs[0]))
    specs[(name, "relpos_bias", "rel_embedding")] = (
        (f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
        lambda xs: xs[0].T)
  specs[("encoder", "encoder_norm", "scale")] = (("encoder.final_layer_norm.weight",),
                                                 lambda xs: xs[0])
  if config.final_decoder_norm_scale:
    specs[("decoder", "decoder_norm", "scale")] = (("decoder.final_layer_norm.weight",),
                                                   lambda xs: xs[0])
  if not config.tie_word_embeddings:
    specs[("decoder", "logits_dense", "kernel")] = (("lm_head.weight",), lambda xs: xs[0].T)
  return specs


def hf_key(key: str, available: Any) -> str:
  """`key`, or the tensor a checkpoint without it means (an untied model saved
  without `lm_head.weight` uses `shared.weight`); KeyError if neither is there."""
  if key in available:
    return key
  if key == "lm_head.weight" and "shared.weight" in available:
    return "shared.weight"
  raise KeyError(f"Hugging Face state dict has no {key!r}")


def check_hf_extras(get: Callable[[str], np.ndarray], available: Any,
                    config: ModelConfig) -> None:
  """The checks of tensors that `hf_param_specs` does not read: a final decoder norm
  that `final_decoder_norm_scale=False` drops must be all ones, and a tied model's
  `lm_head.weight`, if saved, must equal `shared.weight`."""
  if not config.final_decoder_norm_scale and not np.all(
      get("decoder.final_layer_norm.weight") == 1.0):
    raise ValueError("config.final_decoder_norm_scale=False but the checkpoint's "
                     "decoder.final_layer_norm.weight is not all ones")
  if (config.tie_word_embeddings and "lm_head.weight" in available
      and not np.array_equal(get("lm_head.weight"), get("shared.weight"))):
    raise ValueError("config.tie_word_embeddings=True but the checkpoint's lm_head.weight "
                     "differs from shared.weight")


def from_hf_state_dict(sd: dict[str, Any], config: ModelConfig) -> dict:
  """Hugging Face T5 state dict (numpy or torch tensors) -> our params collection."""
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
        for k, v in sd.items()}
  get = lambda key: sd[hf_key(key, sd)]
  params: dict = {}
  for path, (keys, convert) in hf_param_specs(config).items():
    _set(params, path, convert([get(k) for k in keys]))
  check_hf_extras(get, sd, config)
  return params


def hf_config_dict(config: ModelConfig, tokens: TokenIds | None = None,
                   dtype: str = "float32") -> dict:
  """The `config.json` of the equivalent `T5ForConditionalGeneration`."""
  tokens = TokenIds() if tokens is None else tokens
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.head_dim,
      "d_ff": config.d_ff,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "num_heads": config.num_heads,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": {"silu": "gated-silu", "gelu": "gated-gelu"}[config.activation],
      "is_encoder_decoder": True,
      # False: separate lm_head, decoder output not scaled (T5 v1.1, UL2).
      "tie_word_embeddings": config.tie_word_embeddings,
      "pad_token_id": tokens.pad,
      "eos_token_id": tokens.eos,
      "decoder_start_token_id": tokens.pad,
      "use_cache": True,
      "torch_dtype": dtype,
  }


def config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
  """ModelConfig of a Hugging Face T5 `config.json` (gated FFNs only)."""
  proj = hf.get("feed_forward_proj", "relu")
  activations = {"gated-silu": "silu", "gated-gelu": "gelu"}
  if proj not in activations:
    raise ValueError(f"feed_forward_proj={proj!r} is not supported; "
                     f"only {sorted(activations)} (T5 v1.1 / UL2)")
  tied = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"],
      head_dim=hf["d_kv"], d_ff=hf["d_ff"], num_encoder_layers=hf["num_layers"],
      num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
      activation=activations[proj],
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      dropout_rate=hf.get("dropout_rate", 0.0),
      layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      tie_word_embeddings=bool(tied))
  fields.update(overrides)
  return ModelConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special ids of a vocabulary, as trained: seqio pads (and starts the decoder)
  with id 0, ends with the SentencePiece model's EOS, and puts `extra_ids` sentinels
  at the top (`<extra_id_0>` = pieces + extra_ids - 1). The defaults are T5's."""
  pad: int = 0
  eos: int = 1
  unk: int = 2
  extra_ids: int = 100
  pad_piece: str = "<pad>"
  eos_piece: str = "</s>"
  unk_piece: str = "<unk>"


def token_ids(vocab_path: str | os.PathLike, extra_ids: int) -> TokenIds:
  """The `TokenIds` of a SentencePiece model with `extra_ids` sentinels (what
  `model_config.json` records of the task's vocabulary); ValueError in one line."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  if extra_ids < 0:
    raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
  try:
    proto = epath.Path(vocab_path).read_bytes()
  except OSError as e:
    raise FileNotFoundError(f"vocabulary {os.fspath(vocab_path)} cannot be read: {e}") from e
  sp = spm.SentencePieceProcessor()
  try:
    sp.LoadFromSerializedProto(proto)
  except Exception as e:  # pylint: disable=broad-except  (protobuf's RuntimeError)
    raise ValueError(f"vocabulary {os.fspath(vocab_path)} is not a SentencePiece model") from e
  if sp.eos_id() < 0 or sp.unk_id() < 0:
    raise ValueError(f"vocabulary {os.fspath(vocab_path)} has no EOS or no unknown piece")
  return TokenIds(pad=0, eos=sp.eos_id(), unk=sp.unk_id(), extra_ids=extra_ids,
                  pad_piece=sp.id_to_piece(0), eos_piece=sp.id_to_piece(sp.eos_id()),
                  unk_piece=sp.id_to_piece(sp.unk_id()))


def _tokenizer_files(vocab_path: str | os.PathLike, out: epath.Path,
                     tokens: TokenIds) -> None:
  (out / "spiece.model").write_bytes(epath.Path(vocab_path).read_bytes())
  extra = [f"<extra_id_{i}>" for i in range(tokens.extra_ids)]
  special = {"eos_token": tokens.eos_piece, "unk_token": tokens.unk_piece,
             "pad_token": tokens.pad_piece, "additional_special_tokens": extra}
  (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  tok_config = {"tokenizer_class": "T5Tokenizer", "extra_ids": tokens.extra_ids,
                "model_max_length": 512, "legacy": True, **special}
  (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


# ---------------------------------------------------------------------------
# Sharded safetensors, as `save_pretrained` writes them.

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(size: str | int) -> int:
  """Bytes of "5GB", "200MB", "1.5GB" (decimal units KB/MB/GB/TB, as transformers and
  huggingface_hub's `parse_size_to_int`) or of an int; ValueError in one line."""
  if isinstance(size, int):
    value = size
  else:
    text = str(size).strip()
    unit = text[-2:].upper()
    try:
      value = int(float(text[:-2].strip()) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
      raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 200MB (decimal "
                       "units KB, MB, GB, TB)") from None
  if value <= 0:
    raise ValueError(f"max_shard_size {size!r} must be positive")
  return value


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  return dtype


def split_into_shards(tensors: list[HfTensor], max_shard_size: int, dtype: str
                      ) -> list[list[HfTensor]]:
  """huggingface_hub's `split_state_dict_into_shards_factory`: in state-dict order, a
  new shard when the next tensor would tip the current one over `max_shard_size`; a
  tensor larger than that gets a shard of its own."""
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  shards, current, current_size = [], [], 0
  for t in tensors:
    size = int(np.prod(t.shape, dtype=np.int64)) * itemsize
    if size > max_shard_size:
      shards.append([t])
      continue
    if current_size + size > max_shard_size:
      shards.append(current)
      current, current_size = [], 0
    current.append(t)
    current_size += size
  if current:
    shards.append(current)
  return shards


def shard_filenames(num_shards: int) -> list[str]:
  if num_shards == 1:
    return [WEIGHTS_NAME]
  return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def convert(value: np.ndarray, dtype: str) -> np.ndarray:
  """float32 -> the export dtype; bfloat16 rounds to nearest even (ml_dtypes, as torch)."""
  return value if dtype == "float32" else value.astype(DTYPES[dtype])


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def write_safetensors(path: epath.Path, tensors: list[HfTensor], dtype: str,
                      produce: Callable[[HfTensor], np.ndarray]) -> int:
  """Writes one safetensors file holding `tensors`, a tensor at a time: the header
  (their dtypes, shapes and offsets) is known from the shapes, so each tensor is
  `produce`d, written and dropped. safetensors' own writer (`save_file`) takes the
  whole file's tensors at once and copies each to bytes; this writes the same format
  (8-byte little-endian header size, JSON header padded to 8 bytes, the raw
  little-endian data in header order), which safetensors and transformers read back.
  Returns the data bytes written."""
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in tensors:
    size = int(np.prod(t.shape, dtype=np.int64)) * itemsize
    header[t.key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with path.open("wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
      value = np.ascontiguousarray(produce(t))
      if value.shape != t.shape or value.dtype != DTYPES[dtype]:
        raise ValueError(f"{t.key}: made {value.dtype}{list(value.shape)}, expected "
                         f"{dtype}{list(t.shape)}")
      f.write(value.reshape(-1).view(np.uint8).data)  # Little-endian hosts (x86, ARM).
      del value
  return offset


def write_weights(tensors: list[HfTensor],
                  read: Callable[[tuple[str, ...], int | None], np.ndarray],
                  out: epath.Path, *, max_shard_size: int, dtype: str) -> list[str]:
  """Writes the weights as `save_pretrained` does: `model.safetensors`, or shards and
  `model.safetensors.index.json` (with `metadata.total_size`), a tensor at a time: the
  memory held is about one tensor, whatever the shard size. Returns the file names."""
  shards = split_into_shards(tensors, max_shard_size, dtype)
  names = shard_filenames(len(shards))
  produce = lambda t: convert(hf_tensor(t, read), dtype)
  total_size = sum(write_safetensors(out / name, shard, dtype, produce)
                   for name, shard in zip(names, shards))
  if len(names) > 1:
    weight_map = {t.key: name for name, shard in zip(names, shards) for t in shard}
    parameters = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
    index = {"metadata": {"total_parameters": parameters, "total_size": total_size},
             "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    names.append(INDEX_NAME)
  return names


_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def write_hf_dir(read: Callable[[tuple[str, ...], int | None], np.ndarray],
                 config: ModelConfig, vocab_path: str | os.PathLike, out_dir: Any, *,
                 tokens: TokenIds = TokenIds(), max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 dtype: str = "float32", before_commit: Callable[[], None] = lambda: None
                 ) -> None:
  """Writes a Hugging Face T5 directory from `read(path, index)` of our params.

  Everything is written into a staging directory inside `out_dir` first; then
  `before_commit()` runs (the checkpoint's verification: it raises to abandon the
  export), the weight files of an earlier export are removed and the new files moved
  in, so a failed export leaves `out_dir` as it was.
  """
  max_shard_size, dtype = parse_size(max_shard_size), check_dtype(dtype)
  out = epath.Path(out_dir)
  created = not out.exists()
  out.mkdir(parents=True, exist_ok=True)
  staging = out / f".export-{os.getpid()}.tmp"
  if staging.exists():
    staging.rmtree()
  staging.mkdir()
  try:
    (staging / "config.json").write_text(json.dumps(hf_config_dict(config, tokens, dtype),
                                                    indent=2))
    generation = {"decoder_start_token_id": tokens.pad, "eos_token_id": tokens.eos,
                  "pad_token_id": tokens.pad}
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    write_weights(hf_tensors(config), read, staging, max_shard_size=max_shard_size,
                  dtype=dtype)
    _tokenizer_files(vocab_path, staging, tokens)
    before_commit()
    for old in out.iterdir():
      if _WEIGHT_FILE.fullmatch(old.name):
        old.unlink()
    for new in staging.iterdir():
      new.replace(out / new.name)
  except BaseException:
    if created:  # Nothing of this export stays behind.
      out.rmtree()
    raise
  finally:
    if staging.exists():
      staging.rmtree()


def save_hf(params: Any, config: ModelConfig, vocab_path: str | os.PathLike,
            out_dir: str | os.PathLike, *, tokens: TokenIds = TokenIds(),
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype: str = "float32") -> None:
  """Writes a directory that `T5ForConditionalGeneration.from_pretrained` and
  `AutoTokenizer.from_pretrained` load: config.json, generation_config.json,
  model.safetensors (or shards and their index), spiece.model (+ `tokens.extra_ids`
  sentinels), tokenizer configs. `export_checkpoint` does the same from a checkpoint
  without holding the parameters."""
  p = _plain(params)
  read = lambda path, index: _get(p, path) if index is None else _get(p, path)[index]
  write_hf_dir(read, config, vocab_path, out_dir, tokens=tokens,
               max_shard_size=max_shard_size, dtype=dtype)


def export_checkpoint(model_dir: Any, out_dir: Any, config: ModelConfig,
                      vocab_path: str | os.PathLike, *, tokens: TokenIds = TokenIds(),
                      step: int | None = None,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      dtype: str = "float32", warn: Callable[[str], None] = print) -> int:
  """Exports checkpoint `step` of `model_dir` (default: the newest that verifies) to
  `out_dir`, reading one tensor (one layer of a scanned stack) at a time: the host
  holds about one shard. Each leaf read is checked into the parameters' fingerprint
  and the output is committed only if the whole matches the checkpoint's checksum;
  a bad newest step is skipped with a `warn` line, as `ul2 eval` does. Returns the step."""
  from ul2 import checkpoint  # pylint: disable=import-outside-toplevel  (orbax)
  max_shard_size, dtype = parse_size(max_shard_size), check_dtype(dtype)
  abstract = nn.unbox(abstract_params(config))
  ckpt = checkpoint.Checkpointer(model_dir, read_only=True)
  try:
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps:
      raise ValueError(f"no checkpoint in {ckpt.directory}")
    if step is not None and step not in steps:
      raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; there are "
                       f"steps {sorted(steps)}")
    failures = []
    for candidate in [step] if step is not None else steps:
      try:
        reader = ckpt.params_reader(candidate, abstract)
        write_hf_dir(reader.read, config, vocab_path, out_dir, tokens=tokens,
                     max_shard_size=max_shard_size, dtype=dtype,
                     before_commit=reader.verify)
        return candidate
      except checkpoint.Unreadable as e:
        if step is not None:
          raise
        failures.append(e)
        warn(f"warning: {e}; trying the previous checkpoint" if candidate != steps[-1]
             else f"warning: {e}")
    raise checkpoint.Unreadable(steps[0], "no step is readable", message=(
        f"no checkpoint in {ckpt.directory} is readable ("
        + "; ".join(f"step {e.step}: {e.reason}" for e in failures) + ")"))
  finally:
    ckpt.close()


def load_hf(path: str | os.PathLike, **overrides: Any) -> tuple[dict, ModelConfig]:
  """A Hugging Face T5 directory (config.json + model.safetensors) -> (params, config).

  `overrides` set ModelConfig fields the HF config does not carry (dtype,
  scan_layers, remat_policy, final_decoder_norm_scale, ...).
  """
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  config = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
  files = sorted(path.glob("model*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no model*.safetensors in {path}")
  sd: dict[str, np.ndarray] = {}
  for f in files:
    sd.update(load_file(str(f)))
  return from_hf_state_dict(sd, config), config
