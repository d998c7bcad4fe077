"""The attention core, softmax(q k^T + bias + mask) v, in two equal forms.

    q: [b, q, h, d]; k, v: [b, k, h, d]; bias, mask: broadcastable to [b, h, q, k]

`dot_product_attention`: plain XLA ops over the whole batch. Autodiff saves the
[b, h, q, k] weights for the backward pass. Used on TPU/GPU, with attention
dropout, and when decoding.

`cached_attention`: the same function for decoding, with keys and values in the
layouts of the decoder's cache (`ul2.layers.MultiHeadAttention`): keys [b, h, d, k],
values [b, h, k, d]. A step's few queries per row then read each head's keys and
values as contiguous blocks, and both einsums contract over a major axis of the
cache, which XLA:CPU streams fastest. For a T5-small cross-attention step (b 64,
k 512) the two einsums take about 6 ms in these layouts and 40 ms in
[b, k, h, d]; keys as [b, h, k, d] cost 15% more at one query per row and 2.4x at
four (beam search).

`scanned_attention`: the same function a few examples at a time (`lax.scan` over
chunks of the batch, sized by `chunk_size`) with its own backward pass. It saves
only q, k, v, the output and each row's max and sum of exponentials (not their
log-sum-exp: a fully masked row sits at -1e10, where adding log(k) is lost to
rounding), recomputes a chunk's weights in the backward pass and uses
rowsum(dO * O) for the softmax Jacobian (FlashAttention's identity). Each step
works on [c, h, q, k] (6 MB per example for T5-small at 512 tokens), which stays in
cache, instead of a few passes over [b, h, q, k] arrays (50 MB at batch 8), and no
[b, h, q, k] activation is kept for the backward pass. On 2 CPU cores the T5-small
encoder's attention core, forward and backward at batch 8 x 512, takes about
156-180 ms against 220-250 ms. The loop runs over the batch axis, so "auto" only
chooses it where that axis is not split over devices (`resolve`, which `ul2.loop.build`
applies once, from the mesh).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "scan")


def resolve(impl: str, platform: str, batch_shards: int) -> str:
  """"auto" -> "scan" on CPU when the batch is not split (`batch_shards` 1: the
  mesh's data-parallel size), else "xla". A concrete choice is kept."""
  if impl != "auto":
    return impl
  return "scan" if platform == "cpu" and batch_shards == 1 else "xla"


def _add_terms(logits: Array, *terms: Array | None) -> Array:
  for term in terms:
    if term is not None:
      logits = logits + term.astype(jnp.float32)
  return logits


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array | None,
                          mask: Array | None, dtype: jnp.dtype,
                          dropout=None) -> Array:
  """-> [b, q, h, d]. float32 logits and softmax; `dropout(weights)` if given."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(_add_terms(logits, bias, mask), axis=-1).astype(dtype)
  if dropout is not None:
    weights = dropout(weights)
  # Values as [b, h, k, d], each head's product a plain [q, k] x [k, d] matmul:
  # XLA:CPU computes "bhqk,bkhd->bqhd" as a transposed product ([b, h, d, q] out),
  # about 1.4x slower in the T5-small encoder at inference (benchmarks/README.md).
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v.transpose(0, 2, 1, 3))
  return out.transpose(0, 2, 1, 3)


def cached_attention(q: Array, k: Array, v: Array, bias: Array | None,
                     mask: Array | None, dtype: jnp.dtype) -> Array:
  """q: [b * n, q, h, d]; k: [b, h, d, k]; v: [b, h, k, d] -> [b * n, q, h, d].

  n > 1 (beam search, ul2.decoding): the n beams of a row, adjacent, share that
  row's keys and values (cross-attention's encoder projections); their queries
  attend as n * q queries of the row. bias, mask: broadcastable to [b, h, n * q, k]
  (with n > 1 only a mask [b, 1, 1, k], which broadcasts over queries)."""
  rows, q_len, h, d = q.shape
  b = k.shape[0]
  group = rows // b
  # [b * n, q, h, d] -> [b, h, n * q, d]
  q = q.reshape(b, group * q_len, h, d).transpose(0, 2, 1, 3)
  logits = jnp.einsum("bhqd,bhdk->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(_add_terms(logits, bias, mask), axis=-1).astype(dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  # [b, h, n * q, d] -> [b * n, q, h, d]
  return out.transpose(0, 2, 1, 3).reshape(rows, q_len, h, d)


# Examples per scan step: as many as keep a step's [c, h, q, k] float32 logits
# within this many bytes (about half of a 32 MiB last-level cache).
CHUNK_BYTES = 16 << 20


def chunk_size(batch: int, heads: int, q_len: int, k_len: int) -> int:
  """The largest divisor c of `batch` with c * h * q * k * 4 <= CHUNK_BYTES (>= 1)."""
  per_example = heads * q_len * k_len * 4
  return max([c for c in range(1, batch + 1)
              if batch % c == 0 and c * per_example <= CHUNK_BYTES] or [1])


def _rows(x: Array | None, i: Array, c: int) -> Array | None:
  """Examples [i*c, (i+1)*c) of a [1|b, ...] array (a shared leading 1 is kept)."""
  if x is None or x.shape[0] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=0)


def _chunk_logits(q, k, bias, mask, i, c) -> Array:
  logits = jnp.einsum("cqhd,ckhd->chqk", _rows(q, i, c), _rows(k, i, c),
                      preferred_element_type=jnp.float32)
  return _add_terms(logits, _rows(bias, i, c), _rows(mask, i, c))  # [c, h, q, k]


def _unchunk(x: Array | None) -> Array | None:
  """[b // c, c, ...] scan outputs -> [b, ...]."""
  return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _forward(q, k, v, bias, mask, c):
  def step(_, i):
    logits = _chunk_logits(q, k, bias, mask, i, c)
    row_max = jnp.max(logits, axis=-1)  # [c, h, q]
    exp = jnp.exp(logits - row_max[..., None])
    row_sum = jnp.sum(exp, axis=-1)
    weights = (exp / row_sum[..., None]).astype(v.dtype)
    return None, (jnp.einsum("chqk,ckhd->cqhd", weights, _rows(v, i, c)), row_max, row_sum)

  _, outputs = jax.lax.scan(step, None, jnp.arange(q.shape[0] // c))
  out, row_max, row_sum = map(_unchunk, outputs)
  return out, (row_max, row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scanned(q, k, v, bias, mask, c):
  return _forward(q, k, v, bias, mask, c)[0]


def _scanned_fwd(q, k, v, bias, mask, c):
  out, stats = _forward(q, k, v, bias, mask, c)
  return out, (q, k, v, bias, mask, out, stats)


def _scanned_bwd(c, residuals, d_out):
  q, k, v, bias, mask, out, (row_max, row_sum) = residuals
  # sum_k dP * P = sum_d dO * O for each query row: [b, h, q].
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  shared_bias = bias is not None and bias.shape[0] == 1

  def step(d_bias, i):
    logits = _chunk_logits(q, k, bias, mask, i, c)
    weights = jnp.exp(logits - _rows(row_max, i, c)[..., None]) / _rows(row_sum, i, c)[..., None]
    d_out_i = _rows(d_out, i, c)
    dv = jnp.einsum("chqk,cqhd->ckhd", weights.astype(v.dtype), d_out_i)
    d_weights = jnp.einsum("cqhd,ckhd->chqk", d_out_i, _rows(v, i, c),
                           preferred_element_type=jnp.float32)
    d_logits = weights * (d_weights - _rows(delta, i, c)[..., None])  # float32
    d_logits_c = d_logits.astype(q.dtype)
    dq = jnp.einsum("chqk,ckhd->cqhd", d_logits_c, _rows(k, i, c))
    dk = jnp.einsum("chqk,cqhd->ckhd", d_logits_c, _rows(q, i, c))
    per_example = None
    if bias is not None:
      reduced = _reduce_to(d_logits, (c,) + bias.shape[1:])
      if shared_bias:
        d_bias = d_bias + jnp.sum(reduced, axis=0, keepdims=True)
      else:
        per_example = reduced
    return d_bias, (dq, dk, dv, per_example)

  init = jnp.zeros(bias.shape, jnp.float32) if shared_bias else None
  d_bias, outputs = jax.lax.scan(step, init, jnp.arange(q.shape[0] // c))
  dq, dk, dv, d_bias_examples = map(_unchunk, outputs)
  if bias is not None:
    d_bias = (d_bias if shared_bias else d_bias_examples).astype(bias.dtype)
  d_mask = None if mask is None else jnp.zeros_like(mask)
  return dq, dk, dv, d_bias, d_mask


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
  """Sum the axes of x [c, h, q, k] that `shape` broadcasts (size 1)."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


_scanned.defvjp(_scanned_fwd, _scanned_bwd)


def scanned_attention(q: Array, k: Array, v: Array, bias: Array | None,
                      mask: Array | None, chunk: int | None = None) -> Array:
  """`dot_product_attention` a few examples at a time (no dropout); the mask gets
  no gradient. bias and mask: 4-D, leading axis 1 or b. chunk: examples per step
  (a divisor of b), by default `chunk_size`."""
  for name, term in (("bias", bias), ("mask", mask)):
    if term is not None and (term.ndim != 4 or term.shape[0] not in (1, q.shape[0])):
      raise ValueError(f"{name} must be [1|b, h|1, q|1, k], got {term.shape}")
  b, q_len, h, _ = q.shape
  chunk = chunk or chunk_size(b, h, q_len, k.shape[1])
  if b % chunk:
    raise ValueError(f"chunk {chunk} does not divide the batch {b}")
  return _scanned(q, k, v, bias, mask, chunk)
