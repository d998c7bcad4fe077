"""Autoregressive decoding and scoring: encode once, then one decoder position per step.

    tokens = generate(params, config, encoder_input_tokens, max_decode_length=64)
    tokens, logprobs = sample(params, config, inputs, max_decode_length=64,
                              temperature=0.7, top_k=40, top_p=0.95, rng=jax.random.key(0))
    tokens, scores, logprobs = beam_search(params, config, inputs, num_beams=4,
                                           max_decode_length=64, alpha=0.6)
    logprobs = score(params, config, inputs, target_tokens)

The decoder keeps a key/value cache in Flax's "cache" collection: a first call
at full target length allocates it (and projects the encoder output for
cross-attention once); each step then feeds the previous token. The decoder
starts from the pad id (0), as T5; a row stops at EOS (1) and is padded after it.
Outputs never hold the start token; EOS is included. Log-probabilities are the
model's own (log-softmax of the logits, before temperature or filtering), summed
over the output tokens.

Beam search follows T5X's `decoding.beam_search`: per step the top 2k candidates of
the k live beams, the best k that do not end become the live beams, those that end
compete for the k finished slots with score `logprob / ((5 + length) / 6) ** alpha`
(length counts the output tokens, EOS included), and a row stops once no live beam
can beat its worst finished one. Two choices follow Hugging Face's `generate`
(`num_beams=k`) instead, so that with alpha 0 the result is exactly its beam
search ranked by the sum of log-probabilities: a candidate that ends only counts
if it is among the k best of the step, and at `max_decode_length` the live beams
end (unfinished) and compete too. The beams of a row share that row's
cross-attention projections (`ul2.layers.MultiHeadAttention`), so the cache grows
with the beams only in its self-attention part.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ul2 import losses
from ul2.model import ModelConfig, Transformer

# seqio's convention, whatever the vocabulary: id 0 pads and starts the decoder.
PAD_ID = 0
# T5's EOS, the default only: callers pass their vocabulary's (`vocabulary.eos_id`).
EOS_ID = 1
# "Minus infinity" for scores: finite, so sums and divisions stay ordered (HF's value).
NEG_INF = -1.0e9


def _plain_params(params: Any) -> Any:
  params = nn.unbox(params)
  if "params" in params and "token_embedder" not in params:
    params = params["params"]
  return params


def init_cache(model: Transformer, params: Any, encoded: jax.Array, encoder_input_tokens: jax.Array,
               max_decode_length: int) -> Any:
  """The decoder cache for `max_decode_length` steps (self-attention keys/values,
  cross-attention projections of `encoded`, the step index)."""
  batch = encoder_input_tokens.shape[0]
  dummy = jnp.zeros((batch, max_decode_length), jnp.int32)
  _, variables = model.apply({"params": params}, encoded, encoder_input_tokens, dummy,
                             decode=True, method=Transformer.decode, mutable=["cache"])
  return variables["cache"]


def decode_step(model: Transformer, params: Any, cache: Any, encoded: jax.Array,
                encoder_input_tokens: jax.Array, token: jax.Array) -> tuple[jax.Array, Any]:
  """token [b] -> (logits float32 [b, vocab] for the next position, new cache).

  `token` may hold n beams per row of `encoder_input_tokens` ([b * n], beams of a
  row adjacent) when the self-attention cache was made for b * n rows
  (`_beam_cache`)."""
  logits, variables = model.apply({"params": params, "cache": cache}, encoded,
                                  encoder_input_tokens, token[:, None], decode=True,
                                  method=Transformer.decode, mutable=["cache"])
  return logits[:, 0], variables["cache"]


# The encoder runs over at most this many rows at a time (`_encode`).
ENCODE_ROWS = 4


def _encode(params: Any, config: ModelConfig, encoder_input_tokens: jax.Array
            ) -> tuple[Transformer, Any, jax.Array, jax.Array]:
  """The encoder output, in pieces of at most ENCODE_ROWS rows one after another
  when the batch divides into them: on CPU a piece's [rows, length, d_ff]
  activations stay closer to the caches, which makes a large batch's encoder
  faster (benchmarks/README.md, decode_bench.py).
  Piece j holds rows j, j + n, ..., so a batch split over devices stays split the
  same way in every piece. Equal to the encoder over the whole batch."""
  params = _plain_params(params)
  model = Transformer(config)
  tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  encode = lambda t: model.apply({"params": params}, t, method=Transformer.encode)
  b, length = tokens.shape
  pieces = -(-b // ENCODE_ROWS)
  if pieces == 1 or b % pieces:
    return model, params, tokens, encode(tokens)
  # [b, l] -> [pieces, b // pieces, l], row r = i * pieces + j at [j, i].
  encoded = jax.lax.map(encode, tokens.reshape(b // pieces, pieces, length).swapaxes(0, 1))
  encoded = encoded.swapaxes(0, 1).reshape(b, length, encoded.shape[-1])
  return model, params, tokens, encoded


# ----------------------------------------------------------------------------
# Greedy and sampled decoding.


def _filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
  """Hugging Face's order: top-k, then top-p (nucleus) on what is left. [b, v]."""
  if top_k:
    kth = top_k_values(logits, top_k)
    logits = jnp.where(logits < kth, -jnp.inf, logits)

  def nucleus(logits):
    # Keep the smallest set of most likely tokens whose probability reaches top_p
    # (the token that crosses it included, at least one token).
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)

  # The sort runs only when top_p filters.
  return jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits)


def argmax(logits: jax.Array, slabs: int = 32) -> tuple[jax.Array, jax.Array]:
  """`jnp.argmax` over the last axis of a wide [b, n] and that maximum: (int32 [b],
  [b, 1]). The same index as `jnp.argmax` (the first of equal maxima; a NaN counts
  as the maximum) and the same value as `jnp.max`.

  XLA:CPU lowers `jnp.argmax` to a variadic (value, index) reduce that reads a
  [32, 32128] row block of logits at about 1 GB/s (4.5 ms a step, T5-small at
  batch 64 on two devices). Here the row is cut into `slabs` slabs and every pass
  is elementwise across them: their maximum per column, the row maximum of that,
  the first slab where each column reaches it, the first such column
  (benchmarks/README.md, decode_bench.py)."""
  b, n = logits.shape
  width = -(-n // slabs)
  x = jnp.pad(logits, ((0, 0), (0, slabs * width - n)), constant_values=-jnp.inf)
  x = x.reshape(b, slabs, width)  # Entry (s, j) is index s * width + j.
  top = jnp.max(jnp.max(x, axis=1), axis=-1, keepdims=True)  # [b, 1]
  # NaN != NaN: where the maximum is NaN, the NaNs are its positions.
  hit = (x == top[:, :, None]) | jnp.isnan(x)
  first_slab = jnp.min(jnp.where(hit, jnp.arange(slabs, dtype=jnp.int32)[:, None], slabs),
                       axis=1)  # [b, width]
  index = first_slab * width + jnp.arange(width, dtype=jnp.int32)
  return jnp.min(jnp.where(first_slab < slabs, index, n), axis=-1), top


def token_log_softmax(logits: jax.Array, tokens: jax.Array,
                      top: jax.Array | None = None) -> jax.Array:
  """`jax.nn.log_softmax(logits)` at `tokens` ([b, v], [b] -> [b]), the same
  float32 operations, without writing the whole [b, v] log-softmax. top: the rows'
  maxima [b, 1] where the caller has them (`argmax`)."""
  if top is None:
    top = jnp.max(logits, axis=-1, keepdims=True)
  shifted = logits - jax.lax.stop_gradient(top)
  picked = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0]
  return picked - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def top_k_values(logits: jax.Array, k: int) -> jax.Array:
  """The k-th largest value of each row, [b, 1]."""
  return top_k(logits, k)[0][:, -1:]


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "top_k"))
def sample(params: Any, config: ModelConfig, encoder_input_tokens: jax.Array, *,
           max_decode_length: int, temperature: float | jax.Array = 0.0, top_k: int = 0,
           top_p: float | jax.Array = 1.0, rng: jax.Array | None = None,
           eos_id: int | jax.Array = EOS_ID) -> tuple[jax.Array, jax.Array]:
  """Greedy (temperature 0) or sampled decoding.

  encoder_input_tokens: int32 [b, inputs_length], 0-padded. rng: one key, or one
  per row ([b]; a row's draws then do not depend on the rest of the batch).
  Returns (tokens int32 [b, max_decode_length]: generated ids, EOS included, 0
  after it; logprobs float32 [b]: their summed log-probabilities). Stops early
  once every row has produced EOS.
  """
  model, params, encoder_input_tokens, encoded = _encode(params, config, encoder_input_tokens)
  batch = encoder_input_tokens.shape[0]
  cache = init_cache(model, params, encoded, encoder_input_tokens, max_decode_length)
  rng = jax.random.key(0) if rng is None else rng
  row_keys = rng if rng.ndim == 1 else jax.random.split(rng, batch)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def cond(state):
    i, _, _, _, _, done = state
    return jnp.logical_and(i < max_decode_length, jnp.logical_not(jnp.all(done)))

  def body(state):
    i, cache, token, out, logprobs, done = state
    logits, cache = decode_step(model, params, cache, encoded, encoder_input_tokens, token)
    greedy, top = argmax(logits)

    def draw():
      filtered = _filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
      keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
      return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    nxt = jax.lax.cond(temperature > 0.0, draw, lambda: greedy)
    nxt = jnp.where(done, PAD_ID, nxt)
    step_logprob = token_log_softmax(logits, nxt, top)
    logprobs = logprobs + jnp.where(done, 0.0, step_logprob)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    return i + 1, cache, nxt, out, logprobs, jnp.logical_or(done, nxt == eos_id)

  state = (jnp.zeros((), jnp.int32), cache, jnp.full((batch,), PAD_ID, jnp.int32),
           jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), jnp.float32),
           jnp.zeros((batch,), bool))
  _, _, _, out, logprobs, _ = jax.lax.while_loop(cond, body, state)
  return out, logprobs


def generate(params: Any, config: ModelConfig, encoder_input_tokens: jax.Array, *,
             max_decode_length: int, temperature: float | jax.Array = 0.0,
             rng: jax.Array | None = None, eos_id: int | jax.Array = EOS_ID) -> jax.Array:
  """The tokens of `sample` (greedy at temperature 0): int32 [b, max_decode_length]."""
  return sample(params, config, encoder_input_tokens, max_decode_length=max_decode_length,
                temperature=temperature, rng=rng, eos_id=eos_id)[0]


# ----------------------------------------------------------------------------
# Beam search.


def top_k(x: jax.Array, k: int, block: int = 128) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over the last axis of a wide [b, n]: the same values and
  indices (ties to the lower index), through the k blocks of `block` entries with
  the largest maxima, which hold the k largest entries.

  Inside the decoding loop XLA:CPU lowers `lax.top_k` over a beams x vocabulary
  row to a sort of the whole row (225 ms a step at batch 8 with 4 beams); this
  reads the row once and sorts only the block maxima and k blocks."""
  b, n = x.shape
  if k * block >= n:
    return jax.lax.top_k(x, k)
  blocks = -(-n // block)
  x = jnp.pad(x, ((0, 0), (0, blocks * block - n)), constant_values=-jnp.inf)
  x = x.reshape(b, blocks, block)
  _, best = jax.lax.top_k(jnp.max(x, axis=-1), k)  # [b, k] block ids
  best = jnp.sort(best, axis=-1)  # Candidates in index order keep ties to the lower index.
  candidates = jnp.take_along_axis(x, best[:, :, None], axis=1).reshape(b, k * block)
  values, at = jax.lax.top_k(candidates, k)
  return values, jnp.take_along_axis(best, at // block, axis=1) * block + at % block


def brevity_penalty(alpha: float | jax.Array, length: int | jax.Array) -> jax.Array:
  """T5X's (GNMT's) length normalisation: ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _batch_axis(path: tuple[Any, ...], leaf: jax.Array) -> int | None:
  """Where the rows are in a cache leaf: keys/values are [(layers,) b, h, ., .]."""
  name = str(getattr(path[-1], "key", path[-1]))
  if name in ("cached_key", "cached_value", "cross_key", "cross_value"):
    return leaf.ndim - 4
  return None


def _map_self_attention_cache(cache: Any, fn) -> Any:
  """`fn(leaf, batch_axis)` on the self-attention keys/values; the rest as it is."""
  def apply(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("cached_key", "cached_value"):
      return fn(leaf, _batch_axis(path, leaf))
    return leaf
  return jax.tree_util.tree_map_with_path(apply, cache)


def _beam_cache(cache: Any, num_beams: int) -> Any:
  """Self-attention keys/values repeated per beam ([b * n] rows, a row's beams
  adjacent); cross-attention projections stay [b] (decode_step shares them)."""
  return _map_self_attention_cache(
      cache, lambda leaf, axis: jnp.repeat(leaf, num_beams, axis=axis))


def _reorder_cache(cache: Any, rows: jax.Array) -> Any:
  """Self-attention keys/values of the beams each new beam continues. rows: [b * n]."""
  return _map_self_attention_cache(cache, lambda leaf, axis: jnp.take(leaf, rows, axis=axis))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, m, ...] at index [b, n] along axis 1 -> [b, n, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_decode_length"))
def beam_search(params: Any, config: ModelConfig, encoder_input_tokens: jax.Array, *,
                num_beams: int, max_decode_length: int, alpha: float | jax.Array = 0.6,
                eos_id: int | jax.Array = EOS_ID) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search with T5X's length penalty (see the module docstring).

  encoder_input_tokens: int32 [b, inputs_length], 0-padded. alpha >= 0.
  Returns, best first along axis 1:
    tokens int32 [b, num_beams, max_decode_length] (EOS included, 0 after it);
    scores float32 [b, num_beams]: logprob / brevity_penalty(alpha, length);
    logprobs float32 [b, num_beams]: summed log-probabilities of the tokens.
  """
  k, length = num_beams, max_decode_length
  model, params, encoder_input_tokens, encoded = _encode(params, config, encoder_input_tokens)
  b = encoder_input_tokens.shape[0]
  alpha = jnp.asarray(alpha, jnp.float32)
  cache = _beam_cache(init_cache(model, params, encoded, encoder_input_tokens, length), k)
  rank = jnp.arange(2 * k)
  # The best any live beam can still reach: its log-probability only falls, and the
  # penalty is largest at the longest length (1 for alpha 0: Hugging Face's bound).
  live_bound_penalty = brevity_penalty(alpha, length)

  def cond(state):
    i, open_ = state[0], state[-1]
    return jnp.logical_and(i < length, jnp.any(open_))

  def body(state):
    (i, cache, live_seqs, live_lp, fin_seqs, fin_scores, fin_lp, fin_flags, open_) = state
    last = jnp.where(i == 0, PAD_ID, jax.lax.dynamic_index_in_dim(live_seqs, i - 1, 2, False))
    logits, cache = decode_step(model, params, cache, encoded, encoder_input_tokens,
                                last.reshape(b * k))
    vocab = logits.shape[-1]
    # b: batch, n: beams, v: vocab. Candidates [b, n * v] -> the best 2n.
    candidates = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab) + live_lp[..., None]
    top_lp, top_index = top_k(candidates.reshape(b, k * vocab), 2 * k)
    parent, token = top_index // vocab, top_index % vocab
    seqs = _gather(live_seqs, parent)
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, i, 2)
    ends = jnp.logical_or(token == eos_id, i == length - 1)
    real = top_lp > NEG_INF / 2  # Not continued from an empty initial beam.

    # Live: the best k candidates that do not end.
    live_lp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_lp), k)
    live_seqs = _gather(seqs, pick)
    rows = (jnp.arange(b)[:, None] * k + _gather(parent, pick)).reshape(b * k)
    cache = _reorder_cache(cache, rows)

    # Finished: candidates that end, among the k best, while the row is open.
    counts = ends & real & (rank < k)[None] & open_[:, None]
    new_scores = jnp.where(counts, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores[:, :k]], axis=1)
    best_scores, pick = jax.lax.top_k(all_scores, k)
    fin_seqs = _gather(jnp.concatenate([fin_seqs, seqs[:, :k]], axis=1), pick)
    fin_lp = _gather(jnp.concatenate([fin_lp, top_lp[:, :k]], axis=1), pick)
    fin_flags = _gather(jnp.concatenate([fin_flags, counts[:, :k]], axis=1), pick)

    # A row closes once every finished slot is taken and no live beam can beat them.
    can_improve = live_lp[:, 0] / live_bound_penalty > jnp.min(best_scores, axis=1)
    open_ = open_ & ~(jnp.all(fin_flags, axis=1) & ~can_improve)
    return (i + 1, cache, live_seqs, live_lp, fin_seqs, best_scores, fin_lp, fin_flags, open_)

  first = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF).astype(jnp.float32)
  seqs = jnp.zeros((b, k, length), jnp.int32)
  state = (jnp.zeros((), jnp.int32), cache, seqs, jnp.tile(first, (b, 1)), seqs,
           jnp.full((b, k), NEG_INF, jnp.float32), jnp.full((b, k), NEG_INF, jnp.float32),
           jnp.zeros((b, k), bool), jnp.ones((b,), bool))
  final = jax.lax.while_loop(cond, body, state)
  return final[4], final[5], final[6]


# ----------------------------------------------------------------------------
# Scoring.


@functools.partial(jax.jit, static_argnames=("config",))
def score(params: Any, config: ModelConfig, encoder_input_tokens: jax.Array,
          target_tokens: jax.Array) -> jax.Array:
  """Summed log-probability of each row's targets (T5X's `score_batch`).

  encoder_input_tokens: int32 [b, inputs_length]; target_tokens: int32 [b,
  targets_length], EOS included, 0-padded (padding is not scored). -> float32 [b].
  """
  model, params, encoder_input_tokens, encoded = _encode(params, config, encoder_input_tokens)
  targets = jnp.asarray(target_tokens, jnp.int32)
  decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)
  hidden, kernel = model.apply({"params": params}, encoded, encoder_input_tokens,
                               decoder_inputs, method=Transformer.decode, return_hidden=True)
  weights = (targets > 0).astype(jnp.float32)
  _, per_token = losses.chunked_token_losses(hidden, kernel, targets, weights, z_loss=0.0)
  return -jnp.sum(per_token["cross_entropy"] * weights, axis=1)
