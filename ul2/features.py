"""The model's batch features: the one table of what a converted batch holds.

`ul2.data.UL2FeatureConverter` produces these features (int32 [batch, length], the
length of the task feature named in `Feature.length`); the trainer feeds those
marked `model_input` to `ul2.model.Transformer` as keyword arguments, and `ul2.plan`
and `ul2.loop` build abstract or dummy batches from the same table. TF-free, so the
trainer and the planner do not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Feature:
  length: str          # The task feature whose length it has: "inputs" or "targets".
  model_input: bool    # Passed to the model (the rest feed the loss and its metrics).
  packed_only: bool = False  # Only in packed batches (segment ids, positions).


FEATURES: Mapping[str, Feature] = {
    "encoder_input_tokens": Feature("inputs", model_input=True),
    "encoder_segment_ids": Feature("inputs", model_input=True, packed_only=True),
    "encoder_positions": Feature("inputs", model_input=True, packed_only=True),
    "decoder_input_tokens": Feature("targets", model_input=True),
    "decoder_segment_ids": Feature("targets", model_input=True, packed_only=True),
    "decoder_positions": Feature("targets", model_input=True, packed_only=True),
    "decoder_target_tokens": Feature("targets", model_input=False),
    "decoder_loss_weights": Feature("targets", model_input=False),
    "decoder_denoiser_ids": Feature("targets", model_input=False),
}
MODEL_INPUTS = tuple(name for name, f in FEATURES.items() if f.model_input)


def batch_shapes(batch_size: int, lengths: Mapping[str, int], packed: bool = True
                 ) -> dict[str, tuple[int, int]]:
  """{feature: (batch_size, length)} of a converted batch (int32 each)."""
  return {name: (batch_size, lengths[f.length]) for name, f in FEATURES.items()
          if packed or not f.packed_only}


def model_inputs(batch: Mapping) -> dict:
  """The features of `batch` the model takes, as keyword arguments."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def dummy_model_inputs(batch_size: int, lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Ones for every model input of a packed batch: a batch to initialise or trace on."""
  shapes = batch_shapes(batch_size, lengths)
  return {name: np.ones(shapes[name], np.int32) for name in MODEL_INPUTS}
