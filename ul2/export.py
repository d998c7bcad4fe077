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

import functools
import json
import os
import pathlib
import shutil
from typing import Any, Callable

import numpy as np

from ul2.model import ModelConfig

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
EXTRA_IDS = 100

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


def to_hf_state_dict(params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> Hugging Face T5 state dict (the keys `save_pretrained` writes)."""
  p = _plain(params)
  sd = {"shared.weight": p["token_embedder"]["embedding"]}
  for name, n_layers, decoder in (("encoder", config.num_encoder_layers, False),
                                  ("decoder", config.num_decoder_layers, True)):
    stack = p[name]
    get = _layer_getter(stack, config.scan_layers)
    for i in range(n_layers):
      for hf, ours, kind in _layer_table(decoder):
        sd[f"{name}.block.{i}.{hf}"] = _to_hf(get(i, ours), kind)
    sd[f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        stack["relpos_bias"]["rel_embedding"].T)
  sd["encoder.final_layer_norm.weight"] = p["encoder"]["encoder_norm"]["scale"]
  if config.final_decoder_norm_scale:
    sd["decoder.final_layer_norm.weight"] = p["decoder"]["decoder_norm"]["scale"]
  else:  # A norm without scale is a norm with scale 1.
    sd["decoder.final_layer_norm.weight"] = np.ones((config.d_model,), np.float32)
  if not config.tie_word_embeddings:
    sd["lm_head.weight"] = p["decoder"]["logits_dense"]["kernel"].T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


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


def hf_config_dict(config: ModelConfig) -> dict:
  """The `config.json` of the equivalent `T5ForConditionalGeneration`."""
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
      "pad_token_id": PAD_ID,
      "eos_token_id": EOS_ID,
      "decoder_start_token_id": PAD_ID,
      "use_cache": True,
      "torch_dtype": "float32",
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


def _tokenizer_files(vocab_path: str | os.PathLike, out: pathlib.Path) -> None:
  shutil.copyfile(vocab_path, out / "spiece.model")
  extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
  special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
             "additional_special_tokens": extra}
  (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
  tok_config = {"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS,
                "model_max_length": 512, "legacy": True, **special}
  (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def save_hf(params: Any, config: ModelConfig, vocab_path: str | os.PathLike,
            out_dir: str | os.PathLike) -> None:
  """Writes a directory that `T5ForConditionalGeneration.from_pretrained` and
  `AutoTokenizer.from_pretrained` load: config.json, generation_config.json,
  model.safetensors, spiece.model (+ 100 extra ids), tokenizer configs."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
  generation = {"decoder_start_token_id": PAD_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
  save_file(to_hf_state_dict(params, config), str(out / "model.safetensors"),
            metadata={"format": "pt"})
  _tokenizer_files(vocab_path, out)


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
