"""The pure train step on real meshes: sharding is correct, not only runnable."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ul2 import loop
from ul2 import model as model_lib
from ul2 import optimizers
from ul2 import sharding
from ul2 import trainer

TINY = model_lib.ModelConfig(
    vocab_size=256, d_model=32, num_heads=4, head_dim=8, d_ff=64,
    num_encoder_layers=1, num_decoder_layers=1, activation="silu", dtype="float32",
    dropout_rate=0.0)
LENGTHS = {"inputs": 16, "targets": 8}


def make_config(batch_size=8, mesh=sharding.MeshConfig(), microbatches=1,
                optimizer="adafactor"):
  return loop.TrainConfig(
      model_dir="/nonexistent", mixture_or_task_name="none",
      task_feature_lengths=LENGTHS, train_steps=3, batch_size=batch_size, model=TINY,
      optimizer=optimizers.OptimizerConfig(name=optimizer, learning_rate=0.01,
                                           warmup_steps=0),
      mesh=mesh, num_microbatches=microbatches, random_seed=3)


def random_batches(n, batch_size, seed=0, num_denoisers=7):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    enc = rng.integers(3, 256, (batch_size, LENGTHS["inputs"]), dtype=np.int32)
    tgt = rng.integers(3, 256, (batch_size, LENGTHS["targets"]), dtype=np.int32)
    # Two packed segments per row, with padding at the end of the targets.
    enc_seg = np.repeat([[1] * 10 + [2] * 6], batch_size, 0).astype(np.int32)
    dec_seg = np.repeat([[1] * 4 + [2] * 3 + [0]], batch_size, 0).astype(np.int32)
    dec_pos = np.repeat([[0, 1, 2, 3, 0, 1, 2, 0]], batch_size, 0).astype(np.int32)
    dec_in = np.where(dec_pos == 0, 0, np.roll(tgt, 1, axis=1)).astype(np.int32)
    out.append({
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt * (dec_seg > 0),
        "decoder_loss_weights": (dec_seg > 0).astype(np.int32),
        "encoder_segment_ids": enc_seg,
        "decoder_segment_ids": dec_seg,
        "encoder_positions": np.repeat([list(range(10)) + list(range(6))], batch_size,
                                       0).astype(np.int32),
        "decoder_positions": dec_pos,
        "decoder_denoiser_ids": rng.integers(0, num_denoisers, (batch_size, 1)).repeat(
            LENGTHS["targets"], 1).astype(np.int32),
    })
  return out


def run_steps(config, batches, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  setup = loop.build(config, num_denoisers=7, mesh=mesh)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(sharding.LOGICAL_AXIS_RULES)):
    state = setup.init(jax.random.key(config.random_seed))
    for batch in batches:
      state, metrics = setup.train_step(
          state, loop.global_batch(batch, setup.batch_sharding), jax.random.key(1))
      sums = jax.device_get(metrics["sums"])
      losses.append(float(sums["loss"] / sums["tokens"]))
  return losses, jax.device_get(state.params), setup


@pytest.fixture(scope="module")
def one_device_run():
  batches = random_batches(3, 8)
  losses, params, _ = run_steps(make_config(), batches, jax.devices()[:1])
  return batches, losses, params


# (1, 1, 4), on 4 devices: the batch is not split, so the loss is the chunked one,
# with the vocabulary split over "tensor" (TINY has 4 heads).
@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 4)])
def test_same_losses_on_every_mesh(mesh_shape, one_device_run):
  batches, reference, ref_params = one_device_run
  config = make_config(mesh=sharding.MeshConfig(*mesh_shape))
  losses, params, setup = run_steps(config, batches, jax.devices()[:math.prod(mesh_shape)])
  assert np.all(np.isfinite(reference)) and len(set(reference)) == 3
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  flat_ref = jax.tree.leaves(ref_params)
  for a, b in zip(jax.tree.leaves(params), flat_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The parameters really are sharded as the rules say.
  specs = jax.tree.leaves(setup.state_shardings.params,
                          is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  used_axes = {a for s in specs for part in s.spec if part
               for a in (part if isinstance(part, tuple) else (part,))}
  if mesh_shape[1] > 1:
    assert "fsdp" in used_axes
  if mesh_shape[2] > 1:
    assert "tensor" in used_axes


# On 1 device the loss is the chunked one (a scan inside the microbatch scan).
@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 2])
def test_microbatches_give_the_same_update(num_devices):
  batches = random_batches(2, 8, seed=5)
  devices = jax.devices()[:num_devices]
  one_losses, one, _ = run_steps(make_config(), batches, devices)
  two_losses, two, _ = run_steps(make_config(microbatches=2), batches, devices)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_steps_follow_float32(one_device_run):
  """bfloat16 activations, through `loop.build` and the compiler options it picks for
  bfloat16 (ul2.compiler): the losses of three steps stay within bfloat16 rounding of
  float32's, and the float32 parameters stay within 1% of float32's (in norm; Adafactor
  turns a tiny gradient's flipped sign into a full-size step, so not elementwise)."""
  batches, reference, ref_params = one_device_run
  config = make_config()
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16"))
  losses, params, _ = run_steps(config, batches, jax.devices()[:1])
  np.testing.assert_allclose(losses, reference, rtol=2e-2)
  assert losses != reference  # Really bfloat16.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    assert a.dtype == np.float32
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_batch_not_divisible_by_the_mesh_is_a_clear_error():
  config = make_config(batch_size=6, mesh=sharding.MeshConfig(data=4, fsdp=2))
  with pytest.raises(ValueError, match=r"batch size 6 .* not divisible by the 8 "
                                       r"data-parallel devices"):
    loop.build(config, num_denoisers=7)


def test_loss_sums_match_a_naive_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = np.array([[1, 2, 0], [4, 4, 3]], np.int32)
  weights = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
  denoisers = np.array([[0, 0, 0], [2, 2, 2]], np.int32)
  sums = trainer.loss_sums(jnp.asarray(logits), {
      "decoder_target_tokens": targets, "decoder_loss_weights": weights,
      "decoder_denoiser_ids": denoisers}, z_loss=1e-4, num_denoisers=3)
  log_z = np.log(np.exp(logits).sum(-1))
  token_loss = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  token_loss = token_loss + 1e-4 * log_z ** 2
  np.testing.assert_allclose(sums["loss"], (token_loss * weights).sum(), rtol=1e-6)
  np.testing.assert_allclose(sums["tokens"], 5)
  np.testing.assert_allclose(sums["denoiser_loss"],
                             [token_loss[0, :2].sum(), 0, token_loss[1].sum()], rtol=1e-6)
  np.testing.assert_allclose(sums["denoiser_tokens"], [2, 0, 3])


def test_rsqrt_schedule_is_t5x():
  schedule = optimizers.make_schedule(
      optimizers.OptimizerConfig(learning_rate=0.01, schedule="rsqrt", warmup_steps=10_000))
  np.testing.assert_allclose([schedule(0), schedule(10_000), schedule(40_000)],
                             [0.01, 0.01, 0.005], rtol=1e-6)


def test_optimizer_state_is_sharded_like_its_parameters():
  config = make_config(mesh=sharding.MeshConfig(data=1, fsdp=2, tensor=4),
                       optimizer="adamw")
  setup = loop.build(config, num_denoisers=7)
  param_specs = jax.tree.leaves(setup.state_shardings.params)
  mu_specs = jax.tree.leaves(setup.state_shardings.opt_state[0].mu)
  assert [s.spec for s in mu_specs] == [s.spec for s in param_specs]
