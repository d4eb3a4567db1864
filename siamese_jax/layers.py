"""Layers shared by every network: BatchNorm over the data-parallel axis, a fast 2x2 max-pool, L2 norm.

BatchNorm and modes. Every BatchNorm is built with `axis_name="data"` (the data-parallel mesh axis,
`parallel.AXIS`): in train mode its batch statistics are averaged over all devices, so 1 device and
N devices compute the same thing. The flip side: train mode only runs where an axis "data" is bound
(inside the `shard_map`/`pmap` step, or `jax.vmap(..., axis_name="data")`). Models are therefore
*created in eval mode* (running averages), and the train step switches its merged copy with
`model.train()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# The mesh axis name of the data-parallel step (`parallel.AXIS`); BatchNorm averages statistics over it.
# Spelled out here rather than imported so that layers stay a leaf module.
BATCH_AXIS = "data"


def l2_normalize(embeddings: jax.Array) -> jax.Array:
  """Unit length along the last axis: rsqrt of a floored squared norm, so even an all-zero vector has a
  finite gradient."""
  return embeddings * jax.lax.rsqrt(jnp.maximum(jnp.sum(embeddings**2, axis=-1, keepdims=True), 1e-12))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon: float, axis_name: str):
  """Train-mode batch norm over all axes but the last, statistics averaged over `axis_name`.

  Returns (y, mean, var): nnx.BatchNorm's numbers (E[x^2] - E[x]^2 variance, floored at 0; gradients
  equal to autodiff's within float rounding), with a hand-written backward pass whose per-channel sums
  are matrix products (`_channel_sums`). Autodiff of nnx.BatchNorm instead emits several reductions over
  the activations, which XLA:CPU runs far below memory speed, and BatchNorm is a large part of the conv4
  step. The speed-up is measured by benchmarks/run.py (the conv4 train-step cases).
  """
  return _batch_norm_forward(x, scale, bias, epsilon, axis_name)[0]


def _channel_sums(*arrays: jax.Array) -> list[jax.Array]:
  # Sums over every axis but the last, each as a matrix product with a row of ones: on XLA:CPU that
  # runs several times faster than the equivalent reduce (and than a fused multi-output reduce).
  sums = []
  for a in arrays:
    rows = a.reshape(-1, a.shape[-1])
    sums.append((jnp.ones((1, rows.shape[0]), rows.dtype) @ rows)[0])
  return sums


def _batch_norm_forward(x, scale, bias, epsilon, axis_name):
  count = x.size // x.shape[-1]
  sums = jax.lax.pmean(jnp.stack(_channel_sums(x, x * x)) / count, axis_name)
  mean, mean_square = sums[0], sums[1]
  var = jnp.maximum(0.0, mean_square - mean * mean)
  inverse_std = jax.lax.rsqrt(var + epsilon)
  multiplier = inverse_std * scale
  y = x * multiplier + (bias - mean * multiplier)
  return (y, mean, var), (x, mean, inverse_std, scale)


def _batch_norm_backward(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, inverse_std, scale = residuals
  dy = cotangents[0]  # mean and var only feed the running averages, under stop_gradient
  normalized = (x - mean) * inverse_std
  # Local sums are this device's parameter gradients (the step sums gradients over devices itself);
  # the input gradient needs the global ones, as the statistics were global.
  dbias, dscale = _channel_sums(dy, dy * normalized)
  global_count = jax.lax.psum(x.size // x.shape[-1], axis_name)
  global_sums = jax.lax.psum(jnp.stack([dbias, dscale]), axis_name) / global_count
  dx = (scale * inverse_std) * (dy - global_sums[0] - normalized * global_sums[1])
  return dx, dscale, dbias


_batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm (same parameters, statistics and numbers) with a faster train-mode gradient.

  `frozen=True` keeps it in inference mode (running statistics, never updated) even after
  `model.train()`: how fine-tuning treats the BatchNorms of a frozen pretrained stage.
  """

  frozen: bool = False

  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None) -> jax.Array:
    use_running_average = self.use_running_average if use_running_average is None else use_running_average
    use_running_average = use_running_average or self.frozen
    # The fast path covers how this module builds BatchNorm; anything else takes nnx's own code.
    if (use_running_average or mask is not None or self.axis != -1 or self.scale is None or self.bias is None
        or x.dtype != jnp.float32 or self.axis_name is None or self.axis_index_groups is not None):
      return super().__call__(x, use_running_average, mask=mask)
    y, mean, var = _batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, self.axis_name)
    momentum = self.momentum
    self.mean[...] = jax.lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
    self.var[...] = jax.lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)
    return y


def batch_norm(num_features: int, momentum: float, rngs: nnx.Rngs, epsilon: float = 1e-5) -> BatchNorm:
  """A BatchNorm over the data-parallel axis, created in eval mode (see the module docstring)."""
  return BatchNorm(num_features, momentum=momentum, epsilon=epsilon, axis_name=BATCH_AXIS,
                   use_running_average=True, rngs=rngs)


def max_pool_2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, VALID: odd sizes are floored (7 -> 3), as in the ProtoNet and Koch papers.

  Written as a reshape and a max rather than `nnx.max_pool` (reduce_window): same forward values, but
  XLA:CPU computes the gradient of reduce_window (select-and-scatter) several times slower than that of
  a max, and pooling is a large part of the backward pass of both networks. Ties in a window share the
  gradient instead of giving it to one element; both are valid subgradients.
  """
  batch, height, width, channels = x.shape
  height, width = height // 2, width // 2
  x = x[:, : 2 * height, : 2 * width]
  return jnp.max(x.reshape(batch, height, 2, width, 2, channels), axis=(2, 4))
