"""The T5 v1.1 / UL2 encoder-decoder (Flax Linen), its config, size and FLOPs.

    model = Transformer(ModelConfig(...))
    variables = model.init({"params": rng}, encoder_input_tokens, decoder_input_tokens)
    logits = model.apply(variables, **batch)      # batch: the feature converter's dict
    # logits: float32 [batch, targets_length, vocab_size]

Param tree (`variables["params"]`; T5X names, logical axes in brackets):

    token_embedder/embedding                      [vocab, embed]
    encoder/relpos_bias/rel_embedding             [heads, relpos_buckets]
    encoder/layers_<i>/pre_attention_layer_norm/scale           [embed]
    encoder/layers_<i>/attention/{query,key,value}/kernel       [embed, heads, kv]
    encoder/layers_<i>/attention/out/kernel                     [heads, kv, embed]
    encoder/layers_<i>/pre_mlp_layer_norm/scale                 [embed]
    encoder/layers_<i>/mlp/{wi_0,wi_1}/kernel                   [embed, mlp]
    encoder/layers_<i>/mlp/wo/kernel                            [mlp, embed]
    encoder/encoder_norm/scale                                  [embed]
    decoder/relpos_bias/rel_embedding                           [heads, relpos_buckets]
    decoder/layers_<i>/pre_self_attention_layer_norm/scale, self_attention/...,
        pre_cross_attention_layer_norm/scale, encoder_decoder_attention/...,
        pre_mlp_layer_norm/scale, mlp/...                       (as the encoder)
    decoder/decoder_norm/scale          [embed]   (absent if final_decoder_norm_scale=False)
    decoder/logits_dense/kernel         [embed, vocab]  (absent if tie_word_embeddings)

With `scan_layers=True`, `layers_<i>` become one `layers` subtree whose leaves
carry a leading stacked axis named `layers`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ul2 import attention as attention_lib
from ul2 import layers as L
from ul2 import sharding

Array = jax.Array

REMAT_POLICIES = {
    "none": None,  # No rematerialisation.
    "full": jax.checkpoint_policies.nothing_saveable,  # Recompute the whole layer.
    "dots": jax.checkpoint_policies.checkpoint_dots,  # Keep matmul outputs.
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a T5 v1.1 / UL2 encoder-decoder.

  activation: "silu" (UL2's Gated-SiLU) or "gelu" (T5 v1.1's Gated-GELU, tanh approx.).
  dtype: activations and matmul inputs; parameters are always float32.
  tie_word_embeddings: output layer = token embedding, decoder output scaled by
    d_model**-0.5 (original T5); False (T5 v1.1, UL2) gives `logits_dense`.
  final_decoder_norm_scale: False for UL2-20B, whose final decoder norm has no scale.
  scan_layers / remat_policy: memory options for big models (see REMAT_POLICIES).
  attention_impl: "xla", "scan" (a few examples at a time, CPU-friendly) or "auto"
    (scan on CPU when the batch is not split over devices), resolved once from the
    mesh by `resolved` (ul2.loop.build); see ul2.attention.
  """
  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int
  d_ff: int
  num_encoder_layers: int
  num_decoder_layers: int
  activation: str = "silu"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  dtype: str = "bfloat16"
  tie_word_embeddings: bool = False
  final_decoder_norm_scale: bool = True
  scan_layers: bool = False
  remat_policy: str = "none"
  layer_norm_epsilon: float = 1e-6
  attention_impl: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "d_ff",
                 "num_encoder_layers", "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.activation not in ("silu", "gelu"):
      raise ValueError(f"ModelConfig.activation must be 'silu' or 'gelu', got {self.activation!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention_impl must be one of "
                       f"{attention_lib.IMPLEMENTATIONS}, got {self.attention_impl!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")

  @property
  def activation_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]

  def resolved(self, platform: str, batch_shards: int) -> "ModelConfig":
    """This config with "auto" replaced by the choice for `platform` and a batch split
    `batch_shards` ways (`ul2.attention.resolve`): what `ul2.loop.build` runs."""
    return dataclasses.replace(
        self, attention_impl=attention_lib.resolve(self.attention_impl, platform, batch_shards))


# ----------------------------------------------------------------------------
# Layers of the two stacks. Each returns (x, None) so nn.scan can carry x.


def _mlp_residual(cfg: ModelConfig, deterministic: bool, x: Array, dropout: nn.Module) -> Array:
  """x + MLP(norm(x)): the last block of both layer kinds (called inside their
  compact __call__, so the submodules belong to the calling layer)."""
  y = L.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="pre_mlp_layer_norm")(x)
  y = L.GatedMlp(cfg.d_ff, cfg.activation, cfg.activation_dtype, cfg.dropout_rate, deterministic,
                 name="mlp")(y)
  return L.constrain(x + dropout(y), ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, mask: Array | None) -> tuple[Array, None]:
    cfg, dtype = self.config, self.config.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    y = L.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    y = L.MultiHeadAttention(cfg.num_heads, cfg.head_dim, dtype, cfg.dropout_rate,
                             self.deterministic, attention_impl=cfg.attention_impl,
                             name="attention")(y, None, bias, mask=mask)
    x = x + dropout(y)
    return _mlp_residual(cfg, self.deterministic, x, dropout), None


class DecoderLayer(nn.Module):
  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array | None, self_mask: Array | None,
               cross_mask: Array | None, cache_index: Array | None) -> tuple[Array, None]:
    cfg, dtype = self.config, self.config.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    attention = functools.partial(L.MultiHeadAttention, cfg.num_heads, cfg.head_dim, dtype,
                                  cfg.dropout_rate, self.deterministic,
                                  attention_impl=cfg.attention_impl)
    y = L.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_self_attention_layer_norm")(x)
    y = attention(name="self_attention")(y, None, self_bias, self.decode, cache_index,
                                         mask=self_mask)
    x = x + dropout(y)
    y = L.RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_cross_attention_layer_norm")(x)
    y = attention(is_cross_attention=True, name="encoder_decoder_attention")(
        y, encoded, None, self.decode, mask=cross_mask)
    x = x + dropout(y)
    return _mlp_residual(cfg, self.deterministic, x, dropout), None


def _stack(layer_cls: type[nn.Module], cfg: ModelConfig, num_layers: int, num_args: int,
           use_remat: bool, **layer_kwargs: Any) -> list[nn.Module] | nn.Module:
  """The layers of a stack: a list of `layers_<i>`, or one scanned `layers` module."""
  policy = REMAT_POLICIES[cfg.remat_policy]
  if use_remat and cfg.remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * num_args, length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, name="layers", **layer_kwargs)
  return [layer_cls(cfg, name=f"layers_{i}", **layer_kwargs) for i in range(num_layers)]


def _run_stack(stack, x: Array, *args: Any) -> Array:
  if isinstance(stack, list):
    for layer in stack:
      x, _ = layer(x, *args)
    return x
  x, _ = stack(x, *args)
  return x


def _row_positions(tokens: Array) -> Array:
  """0..l-1, shared by the batch: the positions the relative position bias is
  computed from, packed rows included (as T5X). A packed example is a contiguous
  run of its row whose positions count up by one, so between two of its tokens the
  relative position is the difference of their row indices, and the segment mask
  hides every pair across examples: one [1, h, q, k] bias serves the whole batch,
  where per-example positions would make (and differentiate) a [b, h, q, k] one."""
  return jnp.arange(tokens.shape[1], dtype=jnp.int32)


class Encoder(nn.Module):
  config: ModelConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens: Array, segment_ids: Array | None, positions: Array | None,
               deterministic: bool) -> Array:
    del positions  # Implied by the segments: see _row_positions.
    cfg = self.config
    pos = _row_positions(tokens)
    bias = L.RelativePositionBiases(cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance, cfg.num_heads,
                                    bidirectional=True, name="relpos_bias")(pos, pos)
    mask = L.attention_mask_bias(None, tokens > 0, segment_ids, segment_ids, causal=False,
                                 query_length=tokens.shape[1], key_length=tokens.shape[1])
    x = self.shared_embedding(tokens)
    x = L.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    layers = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, 2, use_remat=True,
                    deterministic=deterministic)
    x = _run_stack(layers, x, bias, mask)
    x = L.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name="encoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return L.constrain(x, ("batch", "length", "embed"))


class Decoder(nn.Module):
  """With decode=True: the first call (no "cache" yet) runs the whole target length
  and allocates the caches; each later call takes one token [b, 1]."""
  config: ModelConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: Array, encoder_tokens: Array, tokens: Array,
               encoder_segment_ids: Array | None, segment_ids: Array | None,
               positions: Array | None, deterministic: bool, decode: bool,
               return_hidden: bool = False) -> Array | tuple[Array, Array]:
    del positions  # Implied by the segments: see _row_positions.
    cfg = self.config
    step = decode and self.has_variable("cache", "cache_index")
    cache_index = None
    relpos = L.RelativePositionBiases(cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance, cfg.num_heads,
                                      bidirectional=False, name="relpos_bias")
    if step:
      index = self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
      max_length = self.get_variable("cache", "key_positions").shape[0]
      cache_index = index.value
      index.value = cache_index + 1
      key_pos = jnp.arange(max_length, dtype=jnp.int32)
      self_bias = relpos(cache_index[None], key_pos)  # [1, h, 1, max_length]
      self_mask = jnp.where(key_pos <= cache_index, 0.0, L.MASK_VALUE)[None, None, None, :]
    else:
      if decode:  # Creating call: remember the cache length.
        self.variable("cache", "cache_index", jnp.zeros, (), jnp.int32)
        self.variable("cache", "key_positions", jnp.arange, tokens.shape[1], dtype=jnp.int32)
      pos = _row_positions(tokens)
      self_bias = relpos(pos, pos)
      self_mask = L.attention_mask_bias(
          None, None, segment_ids, segment_ids, causal=True,
          query_length=tokens.shape[1], key_length=tokens.shape[1])
    cross_mask = L.attention_mask_bias(
        None, encoder_tokens > 0, segment_ids, encoder_segment_ids, causal=False,
        query_length=tokens.shape[1], key_length=encoder_tokens.shape[1])

    x = self.shared_embedding(tokens)
    x = L.constrain(x, ("batch", "length", "embed"))
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    layers = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, 5, use_remat=not decode,
                    deterministic=deterministic, decode=decode)
    x = _run_stack(layers, x, encoded, self_bias, self_mask, cross_mask, cache_index)
    x = L.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype,
                  use_scale=cfg.final_decoder_norm_scale, name="decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = L.constrain(x, ("batch", "length", "embed"))
    if cfg.tie_word_embeddings:
      x = x * (cfg.d_model ** -0.5)
      kernel = self.shared_embedding.embedding.T  # [embed, vocab]
    else:
      kernel = L.Kernel((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model ** -0.5,
                        name="logits_dense")()
    kernel = kernel.astype(cfg.activation_dtype)
    if return_hidden:
      return x, kernel
    logits = jnp.einsum("ble,ev->blv", x, kernel)
    return L.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Transformer(nn.Module):
  """The encoder-decoder. Batch keys are the keyword arguments of `__call__`."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = L.Embed(cfg.vocab_size, cfg.d_model, cfg.activation_dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, *, enable_dropout: bool = False) -> Array:
    """-> encoder output [b, inputs_length, d_model] in the activation dtype."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None, *, enable_dropout: bool = False,
             decode: bool = False, return_hidden: bool = False) -> Array | tuple[Array, Array]:
    """-> logits float32 [b, targets_length, vocab]. `decode=True` uses the "cache"
    collection (pass it mutable): see ul2.decoding. `return_hidden=True` returns the
    output layer's input and kernel instead, (hidden [b, t, embed], kernel [embed,
    vocab]) with logits = hidden @ kernel, for losses that never form the logits
    (`ul2.losses.chunked_token_losses`)."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        encoder_segment_ids, decoder_segment_ids, decoder_positions,
                        not enable_dropout, decode, return_hidden)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None,
               *, enable_dropout: bool = False, return_hidden: bool = False,
               **unused_features: Any) -> Array | tuple[Array, Array]:
    """Teacher-forced logits float32 [b, targets_length, vocab_size] (or, with
    `return_hidden`, the output layer's input and kernel: see `decode`).

    Extra batch features (decoder_target_tokens, decoder_loss_weights,
    decoder_denoiser_ids) are accepted and ignored, so `model.apply(v, **batch)` works.
    The positions of a packed batch are accepted and implied by its segment ids
    (seqio packs each example as a contiguous run counting up from 0): the relative
    position bias is computed from row indices, as T5X does (`_row_positions`).
    """
    del unused_features
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions, enable_dropout=enable_dropout,
                       return_hidden=return_hidden)


# ----------------------------------------------------------------------------
# Size and cost.


def abstract_params(config: ModelConfig) -> Any:
  """The params tree as ShapeDtypeStructs (boxed with logical axes); nothing allocated."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  model = Transformer(config)
  init = lambda enc, dec: model.init({"params": jax.random.key(0)}, enc, dec)["params"]
  return jax.eval_shape(init, tokens, tokens)


def abstract_params_and_shardings(config: ModelConfig, mesh: jax.sharding.Mesh
                                  ) -> tuple[Any, Any]:
  """The params tree as ShapeDtypeStructs, and their NamedShardings on `mesh` (from
  their logical axis names and `ul2.sharding.LOGICAL_AXIS_RULES`); nothing allocated."""
  boxed = abstract_params(config)
  return nn.unbox(boxed), sharding.logical_to_mesh(nn.get_partition_spec(boxed), mesh)


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from abstract shapes."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(config))))


def flops_per_token(config: ModelConfig, inputs_length: int, targets_length: int) -> float:
  """Training FLOPs (forward + backward = 3x forward) per *target* token.

  Counts one example of `inputs_length` encoder and `targets_length` decoder
  positions (padding included: it is computed), divided by `targets_length`:
    - every matmul with a weight: 2 * params_used per position (attention
      projections, gated MLP, the output layer; the embedding lookup is free),
      the cross-attention's key/value projections per encoder position;
    - attention scores and weighted values: 2 * 2 * q * k * heads * head_dim per
      layer, for encoder self (L_in x L_in), decoder self (L_t x L_t, the full
      square as computed, not halved for causality) and cross (L_t x L_in);
  and excludes norms, softmax, activations, the loss and the optimiser update.
  Multiply by target tokens/s for achieved FLOP/s (MFU against the peak).
  """
  c = config
  inner = c.num_heads * c.head_dim
  attn_params = 4 * c.d_model * inner
  mlp_params = 3 * c.d_model * c.d_ff
  enc = inputs_length * c.num_encoder_layers * (
      2 * (attn_params + mlp_params) + 4 * inputs_length * inner)
  # Decoder: self-attention and the cross-attention's query/output projections run
  # per target position; the cross-attention's key/value projections per input one.
  dec = targets_length * c.num_decoder_layers * (
      2 * (attn_params + attn_params // 2 + mlp_params)
      + 4 * targets_length * inner + 4 * inputs_length * inner)
  dec += inputs_length * c.num_decoder_layers * 2 * (attn_params // 2)
  head = targets_length * 2 * c.d_model * c.vocab_size
  return 3.0 * (enc + dec + head) / targets_length
