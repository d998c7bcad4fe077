"""ul2.model: packing, scan/remat equivalence, sharding under a mesh, sizes, gin files."""

import dataclasses
import pathlib
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from ul2 import model as model_lib
from ul2.model import ModelConfig, Transformer
from model_testing import apply, random_params

GIN_MODELS = pathlib.Path(__file__).resolve().parent.parent / "gin" / "models"
SMALL = ModelConfig(vocab_size=128, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                    num_encoder_layers=2, num_decoder_layers=2, dtype="float32")


def _init(cfg, enc, dec, seed=0):
  del enc, dec
  return {"params": random_params(cfg, seed)}


_apply = apply


def _tokens(rng, shape, vocab=128):
  return rng.integers(3, vocab, shape).astype(np.int32)


def test_packed_row_equals_each_example_alone():
  rng = np.random.default_rng(0)
  cfg = SMALL
  a_in, a_tg = _tokens(rng, 7), _tokens(rng, 5)
  b_in, b_tg = _tokens(rng, 6), _tokens(rng, 4)
  a_dec = np.concatenate([[0], a_tg[:-1]])  # Decoder inputs: targets shifted right.
  b_dec = np.concatenate([[0], b_tg[:-1]])
  in_len, tg_len = 16, 12  # Room for both plus padding.

  def row(*parts):
    out = np.zeros(max(in_len, tg_len), np.int32)
    flat = np.concatenate(parts)
    out[:len(flat)] = flat
    return out

  packed = dict(
      encoder_input_tokens=row(a_in, b_in)[None, :in_len],
      decoder_input_tokens=row(a_dec, b_dec)[None, :tg_len],
      encoder_segment_ids=row(np.full(7, 1), np.full(6, 2))[None, :in_len],
      decoder_segment_ids=row(np.full(5, 1), np.full(4, 2))[None, :tg_len],
      encoder_positions=row(np.arange(7), np.arange(6))[None, :in_len],
      decoder_positions=row(np.arange(5), np.arange(4))[None, :tg_len])
  variables = _init(cfg, packed["encoder_input_tokens"], packed["decoder_input_tokens"])
  logits = np.asarray(_apply(cfg, variables, **packed))
  alone_a = np.asarray(_apply(cfg, variables, a_in[None], a_dec[None]))
  alone_b = np.asarray(_apply(cfg, variables, b_in[None], b_dec[None]))
  np.testing.assert_allclose(logits[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:9], alone_b[0], rtol=1e-5, atol=1e-5)
  # Padded to a longer length, unpacked, an example's logits do not change either.
  padded_in = np.zeros((1, in_len), np.int32)
  padded_in[0, :7] = a_in
  padded_dec = np.zeros((1, tg_len), np.int32)
  padded_dec[0, :5] = a_dec
  padded = np.asarray(_apply(cfg, variables, padded_in, padded_dec))
  np.testing.assert_allclose(padded[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)


def _scan_params(params, cfg):
  """Listed layers -> one stacked `layers` subtree (what scan_layers=True stores)."""
  out = dict(params)
  for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    s = dict(params[stack])
    layers = [s.pop(f"layers_{i}") for i in range(n)]
    s["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    out[stack] = s
  return out


# "none" runs in the quick tier; the remat policies with the slow one.
@pytest.mark.parametrize("remat_policy", ["none", pytest.param("full", marks=pytest.mark.slow),
                                          pytest.param("dots", marks=pytest.mark.slow)])
def test_scan_and_remat_give_the_same_logits_and_grads(remat_policy):
  rng = np.random.default_rng(1)
  enc, dec = _tokens(rng, (2, 9)), _tokens(rng, (2, 5))
  base = SMALL
  variables = nn.unbox(_init(base, enc, dec))
  other = dataclasses.replace(base, scan_layers=True, remat_policy=remat_policy)
  scanned = {"params": _scan_params(variables["params"], base)}
  # Same tree structure as the scanned model's own init, with a `layers` axis.
  abstract = model_lib.abstract_params(other)
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(scanned["params"])
  specs = nn.get_partition_spec(abstract)
  assert specs["encoder"]["layers"]["mlp"]["wi_0"]["kernel"] == P("layers", "embed", "mlp")

  def loss(cfg, v):
    return jnp.sum(Transformer(cfg).apply(v, enc, dec) ** 2)

  want, want_grad = jax.jit(jax.value_and_grad(lambda v: loss(base, v)))(variables)
  got, got_grad = jax.jit(jax.value_and_grad(lambda v: loss(other, v)))(scanned)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad["params"]["encoder"]["layers"]["mlp"]["wo"]["kernel"][1],
                             want_grad["params"]["encoder"]["layers_1"]["mlp"]["wo"]["kernel"],
                             rtol=1e-4, atol=1e-4)


def test_dropout_uses_the_dropout_rng_and_only_when_enabled():
  cfg = dataclasses.replace(SMALL, dropout_rate=0.3)
  rng = np.random.default_rng(2)
  enc, dec = _tokens(rng, (2, 6)), _tokens(rng, (2, 4))
  variables = _init(cfg, enc, dec)
  plain = _apply(cfg, variables, enc, dec)
  np.testing.assert_array_equal(plain, _apply(cfg, variables, enc, dec))
  # rbg keys: threefry's bits take many seconds to compile on CPU.
  drop = lambda seed: _apply(cfg, variables, enc, dec, enable_dropout=True,
                             rngs={"dropout": jax.random.key(seed, impl="rbg")})
  np.testing.assert_array_equal(drop(1), drop(1))
  assert not np.allclose(drop(1), drop(2))
  assert not np.allclose(drop(1), plain)


def test_init_bfloat16_activations_float32_params_and_logits():
  cfg = dataclasses.replace(SMALL, dtype="bfloat16")
  enc, dec = np.ones((1, 4), np.int32), np.ones((1, 3), np.int32)
  init = lambda e, d: Transformer(cfg).init({"params": jax.random.key(0, impl="rbg")}, e, d)
  variables = jax.jit(init)(enc, dec)  # The real init.
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  kernel = variables["params"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert kernel.names == ("embed", "heads", "kv")
  # T5's init: query std (d_model * head_dim)**-0.5 folds in the missing 1/sqrt(d).
  assert np.std(kernel.value) == pytest.approx((32 * 8) ** -0.5, rel=0.2)
  logits = _apply(cfg, variables, enc, dec)
  assert logits.dtype == jnp.float32 and logits.shape == (1, 3, 128)
  encoded = _apply(cfg, variables, enc, method=Transformer.encode)
  assert encoded.dtype == jnp.bfloat16


def test_extra_batch_features_are_accepted():
  enc, dec = np.ones((1, 4), np.int32), np.ones((1, 3), np.int32)
  variables = _init(SMALL, enc, dec)
  batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=dec,
               decoder_loss_weights=np.ones_like(dec), decoder_denoiser_ids=np.zeros_like(dec))
  assert _apply(SMALL, variables, **batch).shape == (1, 3, 128)


RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("vocab", "tensor"), ("kv", None), ("length", None), ("relpos_buckets", None),
         ("layers", None))


@pytest.mark.parametrize("scan", [False, True])
def test_runs_sharded_under_a_mesh_with_logical_rules(scan):
  cfg = dataclasses.replace(SMALL, scan_layers=scan)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(3)
  enc, dec = _tokens(rng, (4, 8)), _tokens(rng, (4, 6))
  model = Transformer(cfg)
  variables = _init(cfg, enc, dec)
  want = _apply(cfg, variables, enc, dec)  # No mesh, no rules.
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    abstract = model_lib.abstract_params(cfg)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    params = jax.device_put(variables["params"], shardings)
    kernel = params["decoder"]["logits_dense"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    logits = jax.jit(lambda v, e, d: model.apply(v, e, d))({"params": params}, enc, dec)
  assert logits.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_import_does_not_pull_in_tensorflow():
  code = ("import sys, ul2.model, ul2.layers, ul2.decoding, ul2.export; "
          "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'torch', "
          "'transformers', 'seqio')]; print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="activation"):
    dataclasses.replace(SMALL, activation="relu")
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(SMALL, remat_policy="some")


def test_flops_per_token_counts_matmuls_and_attention():
  cfg = SMALL
  li, lt = 10, 4
  inner, e, f, v = 32, 32, 64, 128
  enc = li * 2 * (2 * (4 * e * inner + 3 * e * f) + 4 * li * inner)
  # Decoder: self q/k/v/o + cross q/o per target position; cross k/v per input one.
  dec = lt * 2 * (2 * (6 * e * inner + 3 * e * f) + 4 * lt * inner + 4 * li * inner)
  dec += li * 2 * 2 * (2 * e * inner)
  head = lt * 2 * e * v
  assert model_lib.flops_per_token(cfg, li, lt) == pytest.approx(3 * (enc + dec + head) / lt)


# Published sizes (T5 v1.1 model cards; UL2 paper). xxl's 11.3B is rounded up from
# the exact 11.14B of its shapes, hence the 2% tolerance.
PUBLISHED = {"small": 77e6, "base": 248e6, "large": 783e6, "xl": 2.85e9, "xxl": 11.3e9,
             "ul2_20b": 19.6e9}


def _config_from_gin(name):
  gin.clear_config()
  try:
    gin.parse_config_file(str(GIN_MODELS / f"{name}.gin"))
    return gin.get_configurable(ModelConfig)()
  finally:
    gin.clear_config()


def _exact_count(c):
  layer_enc = 4 * c.d_model * c.num_heads * c.head_dim + 3 * c.d_model * c.d_ff + 2 * c.d_model
  layer_dec = (8 * c.d_model * c.num_heads * c.head_dim + 3 * c.d_model * c.d_ff
               + 3 * c.d_model)
  return (c.num_encoder_layers * layer_enc + c.num_decoder_layers * layer_dec
          + 2 * c.num_heads * c.relative_attention_num_buckets
          + c.d_model * (1 + int(c.final_decoder_norm_scale))
          + c.vocab_size * c.d_model * (1 + int(not c.tie_word_embeddings)))


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["tiny"])
def test_model_gin_files_parse_with_published_parameter_counts(name):
  cfg = _config_from_gin(name)
  count = model_lib.param_count(cfg)  # Abstract shapes only: nothing allocated.
  assert count == _exact_count(cfg)
  if name == "tiny":
    assert cfg.vocab_size == 8192 and cfg.vocab_size >= 8100 and count < 5e6
  else:
    assert count == pytest.approx(PUBLISHED[name], rel=0.02)
    assert cfg.vocab_size == 32128
    assert cfg.activation == ("silu" if name == "ul2_20b" else "gelu")
  if name == "ul2_20b":
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim) == (4096, 16384, 16, 256)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (32, 32)


def test_all_model_gin_files_are_tested():
  # from_hf.gin has no shape of its own: it reads the checkpoint's (tests/test_warm_start.py).
  assert {p.stem for p in GIN_MODELS.glob("*.gin")} == set(PUBLISHED) | {"tiny", "from_hf"}
