"""The train state and the pure train / eval steps.

    train_step(state, batch, rng) -> (state, metrics)

is jitted once with explicit in/out shardings and the state donated; the static
pieces (the model's apply function, the optimiser, the loss settings) are bound with
`functools.partial` by `ul2.loop`. Gradient accumulation is a separate pure wrapper,
`accumulate_gradients`, so the step reads the same with or without microbatches.

Losses are returned as *sums* over target tokens (see `ul2.metrics`); the gradient
is normalised once, after accumulation, so two microbatches of 4 give the same
update as one batch of 8.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from ul2 import features, losses

Batch = Mapping[str, jax.Array]
Sums = dict[str, jax.Array]

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the per-token losses become the training objective.

  Attributes:
    z_loss: coefficient of `logsumexp(logits)**2` (PaLM/T5X z-loss, 1e-4 for UL2).
    normalizer: "num_tokens" divides the summed loss by the number of real target
      tokens in the (global) batch; a number divides by that constant instead
      (T5X's `loss_normalizing_factor`).
    impl: "logits" forms the [b, t, vocab] logits and lets autodiff through them;
      "chunked" never forms them (`ul2.losses.chunked_token_losses`); "auto" picks
      "chunked" on CPU when the batch is not split over devices, else "logits".
      All three give the same losses and gradients in float32 (with bfloat16
      activations, "chunked" keeps the logits in float32; "logits" rounds them).
  """
  z_loss: float = 1e-4
  normalizer: str | float = "num_tokens"
  impl: str = "auto"

  def __post_init__(self):
    if not (self.normalizer == "num_tokens" or
            (isinstance(self.normalizer, (int, float)) and self.normalizer > 0)):
      raise ValueError(f"loss normalizer {self.normalizer!r}: expected 'num_tokens' "
                       "or a positive number")
    if self.impl not in losses.IMPLEMENTATIONS:
      raise ValueError(f"loss impl {self.impl!r}: expected one of {losses.IMPLEMENTATIONS}")

  def resolved(self, platform: str, batch_shards: int) -> "LossConfig":
    """This config with "auto" replaced by the choice for `platform` and a batch split
    `batch_shards` ways (`ul2.losses.resolve`)."""
    return dataclasses.replace(self, impl=losses.resolve(self.impl, platform, batch_shards))


def summed_loss(params: Any, batch: Batch, *, apply_fn: Callable, loss: LossConfig,
                num_denoisers: int, **apply_kwargs: Any) -> tuple[jax.Array, Sums]:
  """The model's summed token loss over `batch` (the objective), and the loss sums."""
  targets = batch["decoder_target_tokens"]                             # [b, t]
  weights = batch["decoder_loss_weights"].astype(jnp.float32)          # [b, t]
  variables = {"params": params}
  # "auto" here (not resolved from a mesh by `resolved`): one device of JAX's default backend.
  if losses.resolve(loss.impl, jax.default_backend(), 1) == "chunked":
    hidden, kernel = apply_fn(variables, **features.model_inputs(batch), return_hidden=True,
                              **apply_kwargs)
    objective, per_token = losses.chunked_token_losses(hidden, kernel, targets, weights,
                                                       loss.z_loss)
  else:
    logits = apply_fn(variables, **features.model_inputs(batch), **apply_kwargs)
    per_token = losses.token_losses(logits, targets, loss.z_loss)
    objective = jnp.sum(per_token["loss"] * weights)
  return objective, _sums(per_token, batch, num_denoisers)


def loss_sums(logits: jax.Array, batch: Batch, z_loss: float,
              num_denoisers: int) -> Sums:
  """Summed token losses of `logits` [b, t, v], overall and per denoiser."""
  per_token = losses.token_losses(logits, batch["decoder_target_tokens"], z_loss)
  return _sums(per_token, batch, num_denoisers)


def _sums(per_token: Mapping[str, jax.Array], batch: Batch, num_denoisers: int) -> Sums:
  """Per-token losses [b, t] -> sums over the tokens (weighted), overall and per
  denoiser (n: denoisers)."""
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  denoiser_ids = batch.get("decoder_denoiser_ids", jnp.zeros_like(targets))
  per_denoiser = jax.nn.one_hot(denoiser_ids, num_denoisers) * weights[..., None]
  return {
      "loss": jnp.sum(per_token["loss"] * weights),
      "cross_entropy": jnp.sum(per_token["cross_entropy"] * weights),
      "correct": jnp.sum(per_token["correct"] * weights),
      "tokens": jnp.sum(weights),
      "denoiser_loss": jnp.einsum("btn,bt->n", per_denoiser, per_token["loss"]),
      "denoiser_tokens": jnp.sum(per_denoiser, axis=(0, 1)),
  }


def grad_sums(params: Any, batch: Batch, rng: jax.Array, *, apply_fn: Callable,
              loss: LossConfig, num_denoisers: int) -> tuple[Any, Sums]:
  """Gradient of the *summed* loss of `batch`, and the loss sums."""
  objective = functools.partial(summed_loss, batch=batch, apply_fn=apply_fn, loss=loss,
                                num_denoisers=num_denoisers, enable_dropout=True,
                                rngs={"dropout": rng})
  grads, sums = jax.grad(objective, has_aux=True)(params)
  return grads, sums


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [k, B/k, ...], microbatch i = rows i, i+k, i+2k, ...

  Strided rows, so that with the batch split over devices in contiguous blocks
  every device holds an equal share of every microbatch (no data movement).
  """
  def split(x):
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def accumulate_gradients(grad_fn: Callable, params: Any, batch: Batch, rng: jax.Array,
                         num_microbatches: int) -> tuple[Any, Sums]:
  """Sums `grad_fn(params, microbatch, rng_i)` over `num_microbatches` microbatches."""
  if num_microbatches == 1:
    return grad_fn(params, batch, rng)
  micro = split_microbatches(batch, num_microbatches)

  def body(acc, inputs):
    microbatch, index = inputs
    out = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, acc, out), None

  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first, rng))
  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num_microbatches)))
  return total


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, apply_fn: Callable,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               loss: LossConfig, num_denoisers: int,
               num_microbatches: int = 1) -> tuple[TrainState, dict[str, Any]]:
  """One optimiser update. `rng` is the run's dropout key; the step folds itself in."""
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = functools.partial(grad_sums, apply_fn=apply_fn, loss=loss,
                              num_denoisers=num_denoisers)
  grads, sums = accumulate_gradients(grad_fn, state.params, batch, rng, num_microbatches)
  normalizer = (jnp.maximum(sums["tokens"], 1.0) if loss.normalizer == "num_tokens"
                else jnp.float32(loss.normalizer))
  grads = jax.tree.map(lambda g: g / normalizer, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"sums": sums,
             "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, apply_fn: Callable, loss: LossConfig,
              num_denoisers: int) -> Sums:
  return summed_loss(params, batch, apply_fn=apply_fn, loss=loss, num_denoisers=num_denoisers,
                     enable_dropout=False)[1]
