"""A model_dir's model settings as data: `DIR/model_config.json`, written by `ul2 train`.

    write(model_dir, ModelSettings(model=config.model, vocab_path=..., extra_ids=100,
                                   task_feature_lengths={"inputs": 512, "targets": 512},
                                   mixture_or_task_name="c4_ul2"))
    settings = read(model_dir)

Readers of a model_dir (`ul2 infer`) take the model from here and never execute
`config.gin`: a model_dir is data, and a stranger's config.gin may bind anything.
The file holds the `ModelConfig` fields, the vocabulary, the feature lengths and
the settings `ul2 eval` needs (`run`: batch size, seed, eval split and steps, loss),
in plain JSON; unknown model keys are an error, so a newer file is not half-read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from etils import epath

from ul2.model import ModelConfig

FILENAME = "model_config.json"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  model: ModelConfig
  vocab_path: str
  extra_ids: int
  task_feature_lengths: Mapping[str, int]
  mixture_or_task_name: str
  run: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# The fields that decide the parameters' shapes, structure or meaning: a checkpoint
# is only restored under the same values. (dtype, dropout, remat and the attention
# implementation may change between runs.)
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                       "num_encoder_layers", "num_decoder_layers", "activation",
                       "relative_attention_num_buckets", "relative_attention_max_distance",
                       "tie_word_embeddings", "final_decoder_norm_scale", "scan_layers",
                       "layer_norm_epsilon")


def architecture_differences(saved: ModelConfig, configured: ModelConfig) -> list[str]:
  """'field: saved -> configured' for each architecture field that differs."""
  return [f"{name} {getattr(saved, name)!r} (checkpoint) vs {getattr(configured, name)!r} "
          "(config)" for name in ARCHITECTURE_FIELDS
          if getattr(saved, name) != getattr(configured, name)]


def write(model_dir: str | os.PathLike, settings: ModelSettings) -> epath.Path:
  """Writes `model_dir/model_config.json` (local, or an object store: `gs://...`)."""
  path = epath.Path(model_dir) / FILENAME
  record = {"model": dataclasses.asdict(settings.model), "vocab_path": settings.vocab_path,
            "extra_ids": settings.extra_ids,
            "task_feature_lengths": dict(settings.task_feature_lengths),
            "mixture_or_task_name": settings.mixture_or_task_name, "run": dict(settings.run)}
  text = json.dumps(record, indent=2) + "\n"
  if "://" in os.fspath(path):  # An object is written whole or not at all.
    path.write_text(text)
    return path
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(text)
  tmp.replace(path)
  return path


def read(model_dir: str | os.PathLike) -> ModelSettings:
  """The settings in `model_dir`; FileNotFoundError / ValueError in one line."""
  path = epath.Path(model_dir) / FILENAME
  if not epath.Path(model_dir).is_dir():
    raise FileNotFoundError(f"model_dir {os.fspath(model_dir)!r} is not a directory")
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: model_dirs written before `ul2 train` saved its model settings "
        "lack it (config.gin is never executed here). Re-run the same `ul2 train` command "
        "once on this model_dir (it writes the file and stops if training is done), or "
        "`ul2 export --model_dir=DIR --output_dir=OUT` and use --hf_dir=OUT")
  try:
    record = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(record["model"]) - fields
    if unknown:
      raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    return ModelSettings(model=ModelConfig(**record["model"]),
                         vocab_path=str(record["vocab_path"]),
                         extra_ids=int(record["extra_ids"]),
                         task_feature_lengths={k: int(v) for k, v in
                                               record["task_feature_lengths"].items()},
                         mixture_or_task_name=str(record["mixture_or_task_name"]),
                         run=dict(record.get("run", {})))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is not a valid model settings file: {e}") from e
