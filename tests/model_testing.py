"""Helpers shared by the model tests (not a test module).

Random parameters are drawn with numpy on the abstract param tree: compiling
`Transformer.init` (threefry + erfinv per parameter) takes seconds on CPU and the
tests only need some weights of a sensible scale.
"""

import jax
import numpy as np
from flax import linen as nn

from ul2 import model as model_lib
from ul2.model import ModelConfig, Transformer


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """A float32 numpy params tree shaped like `Transformer(config).init(...)["params"]`."""
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(model_lib.abstract_params(config))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      value = 1.0 + 0.2 * rng.standard_normal(leaf.shape)
    elif "embedding" in name and "rel_" not in name:
      value = rng.standard_normal(leaf.shape)
    elif "rel_embedding" in name:
      value = 0.5 * rng.standard_normal(leaf.shape)
    else:
      fan_in = {"'wo'": config.d_ff, "'out'": config.num_heads * config.head_dim}
      std = next((f ** -0.5 for k, f in fan_in.items() if k in name), config.d_model ** -0.5)
      value = std * rng.standard_normal(leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def apply(config: ModelConfig, variables, *args, **kwargs):
  """Jitted `Transformer(config).apply` (eager op-by-op dispatch is slow on CPU)."""
  static = {k: v for k, v in kwargs.items() if isinstance(v, bool) or callable(v)}
  dynamic = {k: v for k, v in kwargs.items() if k not in static}
  fn = lambda v, a, k: Transformer(config).apply(v, *a, **k, **static)
  return jax.jit(fn)(variables, args, dynamic)


def padded_batch(low: int, high: int, target_length: int, seed: int = 0):
  """Token ids in [low, high): encoder inputs [2, 12] (the second row padded after 7
  tokens) and decoder inputs [2, target_length] starting with the start token 0."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(low, high, (2, 12)).astype(np.int32)
  enc[1, 7:] = 0
  dec = rng.integers(low, high, (2, target_length)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def hf_logits(hf, enc, dec) -> np.ndarray:
  """A `transformers` T5's logits for numpy ids (padding 0 masked in the encoder)."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    return hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
              decoder_input_ids=torch.tensor(dec)).logits.numpy()
