"""ul2.layers against naive references (numpy / plain einsum) and hand-computed values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ul2 import layers as L


# Hand-computed with num_buckets=32, max_distance=128: bidirectional gives 16 buckets
# per direction, 8 exact (0..7), then 8 + floor(8 * log(n / 8) / log(16)) up to 15;
# positive (key after query) adds 16. Causal: 32 buckets for the past, 16 exact,
# then 16 + floor(16 * log(n / 16) / log(8)).
BIDIRECTIONAL = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -15: 9, -16: 10, -23: 11,
                 -31: 11, -32: 12, -63: 13, -64: 14, -90: 14, -91: 15, -128: 15, -5000: 15,
                 1: 17, 7: 23, 8: 24, 16: 26, 64: 30, 91: 31, 1000: 31}
CAUSAL = {0: 0, 1: 0, 50: 0, -1: 1, -15: 15, -16: 16, -18: 16, -19: 17, -32: 21, -64: 26,
          -127: 31, -128: 31, -1000: 31}


@pytest.mark.parametrize("bidirectional,table", [(True, BIDIRECTIONAL), (False, CAUSAL)])
def test_relative_position_bucket_hand_values(bidirectional, table):
  rel = np.array(list(table))
  got = np.asarray(L.relative_position_bucket(rel, bidirectional, 32, 128))
  np.testing.assert_array_equal(got, np.array(list(table.values())))


def _hand_bucket(n, bidirectional, num_buckets=32, max_distance=128):
  """Direct transcription of the Mesh TensorFlow formula, in float64."""
  ret = 0
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n > 0 else 0
    n = abs(n)
  else:
    n = max(-n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(np.log(n / max_exact) / np.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_formula_everywhere(bidirectional):
  rel = np.arange(-600, 601)
  got = np.asarray(L.relative_position_bucket(rel, bidirectional, 32, 128))
  want = np.array([_hand_bucket(int(n), bidirectional) for n in rel])
  np.testing.assert_array_equal(got, want)


def test_relative_position_biases_gather_the_table():
  module = L.RelativePositionBiases(32, 128, num_heads=3, bidirectional=True)
  q, k = jnp.arange(5), jnp.arange(7)
  variables = module.init(jax.random.key(0), q, k)
  table = np.asarray(nn.unbox(variables)["params"]["rel_embedding"])
  assert table.shape == (3, 32)
  bias = np.asarray(module.apply(variables, q, k))
  assert bias.shape == (1, 3, 5, 7)
  for i in range(5):
    for j in range(7):
      np.testing.assert_array_equal(bias[0, :, i, j], table[:, _hand_bucket(j - i, True)])
  # Per-example positions give a per-example bias.
  pos = jnp.array([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
  bias_b = np.asarray(module.apply(variables, pos, pos))
  assert bias_b.shape == (2, 3, 5, 5)
  np.testing.assert_array_equal(bias_b[0, :, 3, 4], table[:, _hand_bucket(1, True)])
  np.testing.assert_array_equal(bias_b[0, :, 4, 2], table[:, _hand_bucket(1, True)])


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 3
  module = L.RMSNorm(epsilon=1e-6)
  variables = module.init(jax.random.key(0), x)
  scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
  variables = {"params": {"scale": scale}}
  want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-5, atol=1e-6)
  no_scale = L.RMSNorm(use_scale=False)
  assert not no_scale.init(jax.random.key(0), x)  # No parameters at all.


def _naive_attention(x, kv, p, bias):
  """Per-head loops of plain matmuls: no scaling by 1/sqrt(d)."""
  b, q_len, _ = x.shape
  h = p["query"]["kernel"].shape[1]
  out = np.zeros((b, q_len, x.shape[-1]), np.float64)
  for bi in range(b):
    for hi in range(h):
      q = x[bi] @ p["query"]["kernel"][:, hi]
      k = kv[bi] @ p["key"]["kernel"][:, hi]
      v = kv[bi] @ p["value"]["kernel"][:, hi]
      s = q @ k.T + np.broadcast_to(bias, (b, h, q_len, len(k)))[bi, hi]
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi] += (w @ v) @ p["out"]["kernel"][hi]
  return out


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_naive_reference(cross):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 12)).astype(np.float32)
  kv = rng.normal(size=(2, 7, 12)).astype(np.float32) if cross else x
  key_len = kv.shape[1]
  bias = rng.normal(size=(1, 3, 5, key_len)).astype(np.float32)
  key_mask = np.ones((2, key_len), bool)
  key_mask[1, -2:] = False
  bias = bias + np.asarray(L.attention_mask_bias(None, key_mask, None, None, False, 5, key_len))
  module = L.MultiHeadAttention(num_heads=3, head_dim=4, is_cross_attention=cross)
  variables = module.init(jax.random.key(0), x, kv if cross else None, bias)
  p = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
  assert p["query"]["kernel"].shape == (12, 3, 4) and p["out"]["kernel"].shape == (3, 4, 12)
  got = module.apply(variables, x, kv if cross else None, bias)
  np.testing.assert_allclose(got, _naive_attention(x, kv, p, bias), rtol=1e-4, atol=1e-5)


def test_attention_mask_bias_combines_padding_segments_and_causality():
  key_mask = np.array([[True, True, True, False]])
  segments = np.array([[1, 1, 2, 0]])
  bias = np.asarray(L.attention_mask_bias(None, key_mask, segments, segments, True, 4, 4))
  allowed = bias[0, 0] == 0
  want = np.array([[1, 0, 0, 0],
                   [1, 1, 0, 0],
                   [0, 0, 1, 0],
                   [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(allowed, want)
  assert L.attention_mask_bias(None, None, None, None, False, 4, 4) is None


def test_self_attention_cache_steps_equal_full_causal_attention():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 8)).astype(np.float32)
  causal = np.asarray(L.attention_mask_bias(None, None, None, None, True, 6, 6))
  module = L.MultiHeadAttention(num_heads=2, head_dim=4)
  variables = module.init(jax.random.key(0), x, None, causal)
  full = np.asarray(module.apply(variables, x, None, causal))
  _, state = module.apply(variables, x, None, causal, decode=True, mutable=["cache"])
  cache = state["cache"]
  for i in range(6):
    step_bias = np.where(np.arange(6) <= i, 0.0, L.MASK_VALUE)[None, None, None, :]
    out, state = module.apply({**variables, "cache": cache}, x[:, i:i + 1], None, step_bias,
                              decode=True, cache_index=jnp.asarray(i), mutable=["cache"])
    cache = state["cache"]
    np.testing.assert_allclose(out[:, 0], full[:, i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_mlp_matches_numpy(activation):
  x = np.random.default_rng(3).normal(size=(2, 3, 8)).astype(np.float32)
  module = L.GatedMlp(d_ff=16, activation=activation)
  variables = module.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
  gate = x @ p["wi_0"]["kernel"]
  if activation == "silu":
    act = gate / (1 + np.exp(-gate))
  else:  # Hugging Face's gelu_new.
    act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3)))
  want = (act * (x @ p["wi_1"]["kernel"])) @ p["wo"]["kernel"]
  np.testing.assert_allclose(module.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_every_param_has_logical_axes():
  x = np.zeros((1, 2, 8), np.float32)
  variables = L.MultiHeadAttention(2, 4).init(jax.random.key(0), x, None, None)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert specs["out"]["kernel"] == jax.sharding.PartitionSpec("heads", "kv", "embed")


@pytest.mark.parametrize("per_example", [False, True])
def test_scanned_attention_equals_plain_values_and_gradients(per_example):
  """The scan-over-examples core with its own VJP gives XLA autodiff's numbers:
  shared bias + padding mask, and per-example bias + packed causal mask."""
  from ul2 import attention  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  b, q_len, k_len, h, d = 3, 6, 6, 2, 4
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32)
             for n in (q_len, k_len, k_len))
  bias = jnp.asarray(rng.normal(size=(b if per_example else 1, h, q_len, k_len)), jnp.float32)
  if per_example:
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 2, 3, 3, 3]])
    mask = L.attention_mask_bias(None, segments > 0, segments, segments, True, q_len, k_len)
  else:
    mask = L.attention_mask_bias(None, jnp.arange(k_len)[None] < jnp.asarray([[6], [4], [1]]),
                                 None, None, False, q_len, k_len)

  def loss(fn, q, k, v, bias):
    return jnp.sum(jnp.sin(fn(q, k, v, bias)))

  plain = lambda q, k, v, bias: attention.dot_product_attention(q, k, v, bias, mask, jnp.float32)
  want = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for chunk in (1, 3):  # One example per step, and the whole batch in one step.
    scanned = lambda q, k, v, bias: attention.scanned_attention(q, k, v, bias, mask, chunk)
    np.testing.assert_allclose(scanned(q, k, v, bias), plain(q, k, v, bias), rtol=1e-5,
                               atol=1e-6)
    got = jax.grad(functools.partial(loss, scanned), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, g, w in zip("q k v bias".split(), got, want):
      assert g.shape == w.shape, name
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"{name}, chunk {chunk}")


def test_scan_chunks_fit_the_cache_budget_and_divide_the_batch():
  from ul2 import attention  # pylint: disable=import-outside-toplevel
  per_example = 6 * 512 * 512 * 4  # T5-small heads, 512 tokens: 6 MiB.
  assert attention.CHUNK_BYTES // per_example == 2
  assert attention.chunk_size(8, 6, 512, 512) == 2
  assert attention.chunk_size(6, 6, 512, 512) == 2
  assert attention.chunk_size(7, 6, 512, 512) == 1   # Prime batch: one at a time.
  assert attention.chunk_size(8, 32, 2048, 2048) == 1  # Bigger than the budget: still 1.
  assert attention.chunk_size(8, 4, 128, 128) == 8
