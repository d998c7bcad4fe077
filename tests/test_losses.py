"""The fused (chunked) output-layer loss against autodiff through the logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ul2 import attention
from ul2 import loop
from ul2 import losses
from ul2 import sharding
from ul2 import trainer

from test_trainer import TINY, make_config, random_batches, run_steps


def _problem(seed, lead, e, v):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(*lead, e)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(e, v)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, v, lead).astype(np.int32))
  weights = jnp.asarray((rng.random(lead) < 0.7).astype(np.float32) * 1.5)
  return hidden, kernel, targets, weights


# (batch, length, embed, vocab, chunk): chunks that divide the tokens, that do not
# (padding), the default size, and one chunk larger than all the tokens.
@pytest.mark.parametrize("b, t, e, v, chunk", [(3, 8, 16, 50, 8), (4, 7, 8, 33, 5),
                                                (2, 64, 32, 300, None), (2, 3, 8, 20, 64)])
def test_chunked_losses_and_gradients_equal_autodiff_through_the_logits(b, t, e, v, chunk):
  hidden, kernel, targets, weights = _problem(b * t, (b, t), e, v)
  z_loss = 1e-2

  def through_logits(hidden, kernel, weights):
    per_token = losses.token_losses(jnp.einsum("bte,ev->btv", hidden, kernel), targets,
                                    z_loss)
    return jnp.sum(per_token["loss"] * weights), per_token

  def chunked(hidden, kernel, weights):
    return losses.chunked_token_losses(hidden, kernel, targets, weights, z_loss, chunk)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (want, want_tokens), want_grads = grad(through_logits)(hidden, kernel, weights)
  (got, got_tokens), got_grads = grad(chunked)(hidden, kernel, weights)
  assert float(want) > 0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for key in ("loss", "cross_entropy", "correct"):
    assert got_tokens[key].shape == (b, t)
    np.testing.assert_allclose(got_tokens[key], want_tokens[key], rtol=1e-5, atol=1e-5)
  for g, w in zip(got_grads, want_grads):
    assert float(jnp.max(jnp.abs(w))) > 0
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_chunked_losses_in_bfloat16_follow_the_float32_logits():
  hidden, kernel, targets, weights = _problem(0, (2, 16), 32, 64)

  def grads(h, k):
    return jax.value_and_grad(
        lambda h, k: losses.chunked_token_losses(h, k, targets, weights, 0.0)[0],
        argnums=(0, 1))(h, k)

  want, want_grads = grads(hidden, kernel)
  got, got_grads = grads(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  np.testing.assert_allclose(got, want, rtol=2e-2)
  for g, w in zip(got_grads, want_grads):
    assert g.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g.astype(jnp.float32), w, atol=2e-2 * scale)


def test_a_gradient_through_the_per_token_statistics_is_a_clear_error():
  hidden, kernel, targets, weights = _problem(0, (2, 4), 8, 10)
  per_token_loss = lambda h: jnp.sum(
      losses.chunked_token_losses(h, kernel, targets, weights, 0.0)[1]["loss"])
  with pytest.raises(ValueError, match="only the summed loss"):
    jax.grad(per_token_loss)(hidden)


def test_shapes_that_do_not_fit_are_a_clear_error():
  hidden, kernel, targets, weights = _problem(0, (2, 4), 8, 10)
  with pytest.raises(ValueError, match="do not multiply"):
    losses.chunked_token_losses(hidden, kernel.T, targets, weights, 0.0)
  with pytest.raises(ValueError, match="leading shape"):
    losses.chunked_token_losses(hidden, kernel, targets[:, :3], weights, 0.0)


# The attention core and the loss loop over the batch: "auto" loops only on CPU and
# only where the batch is not split over devices.
@pytest.mark.parametrize("resolve, looped, plain", [(attention.resolve, "scan", "xla"),
                                                    (losses.resolve, "chunked", "logits")])
def test_auto_loops_on_cpu_only_without_a_batch_split(resolve, looped, plain):
  for platform in ("cpu", "gpu", "tpu"):
    for shards in (1, 8):
      assert resolve(plain, platform, shards) == plain
      assert resolve(looped, platform, shards) == looped
      assert resolve("auto", platform, shards) == (
          looped if platform == "cpu" and shards == 1 else plain)


@pytest.mark.parametrize("mesh, looped", [(sharding.MeshConfig(data=2, fsdp=2, tensor=2), False),
                                          (sharding.MeshConfig(data=1, fsdp=1, tensor=8), True),
                                          (sharding.MeshConfig(data=1, fsdp=8, tensor=1), False)])
def test_build_resolves_the_choices_once_from_the_mesh(mesh, looped):
  """`loop.build` resolves "auto" from its mesh; what it runs does not depend on the
  mesh set (or not) when the step is traced."""
  config = make_config()
  assert (config.model.attention_impl, config.loss.impl) == ("auto", "auto")
  setup = loop.build(config, 1, sharding.make_mesh(mesh))
  assert (setup.config.model.attention_impl, setup.config.loss.impl) == (
      ("scan", "chunked") if looped else ("xla", "logits"))
  assert setup.model.config == setup.config.model


def test_unknown_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="loss impl 'fused'"):
    trainer.LossConfig(impl="fused")


# Tied embeddings: the kernel is the embedding's transpose, so the embedding's
# gradient has two paths. (Untied, the chunked loss on 1 device is also compared with
# the logits loss on split meshes in test_trainer's every-mesh test.)
@pytest.mark.slow
def test_train_and_eval_steps_are_the_same_with_either_loss():
  batches = random_batches(2, 8, seed=11)
  runs = {}
  for impl in ("logits", "chunked"):
    config = make_config(optimizer="adamw")
    config = dataclasses.replace(
        config, model=dataclasses.replace(TINY, tie_word_embeddings=True),
        loss=trainer.LossConfig(impl=impl))
    step_losses, params, setup = run_steps(config, batches, jax.devices()[:1])
    eval_sums = jax.device_get(setup.eval_step(params, {
        k: jnp.asarray(v) for k, v in batches[0].items()}))
    runs[impl] = step_losses, params, eval_sums
  (want, want_params, want_eval), (got, got_params, got_eval) = runs["logits"], runs["chunked"]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for key in want_eval:
    np.testing.assert_allclose(got_eval[key], want_eval[key], rtol=1e-5, atol=1e-6)
