r"""An approximate baseline: gradient matching as in "Inverting Gradients".

Geiping et al. (2020) reconstruct a batch by optimizing dummy inputs so
that their gradient points the same way as the shared one:

.. math::
  \min_{\tilde X}\; 1 - \frac{\langle \nabla_\theta L(\tilde X, y),
  g\rangle}{\|\nabla_\theta L(\tilde X, y)\|\,\|g\|}
  + \lambda\,\mathrm{TV}(\tilde X),

over every parameter of the model at once, with Adam on the signed
gradient, a step schedule (learning rate divided by 10 at 3/8, 5/8 and
7/8 of the steps), the inputs kept inside the data's box, and several
restarts of which the one with the smallest matching loss is kept. The
labels are given, as in the paper's own experiments; that favours the
baseline. It is what an attacker without the exact method gets: no
certificate, no exactness, a PSNR.

The restarts are ``vmap``-ed and the steps are a ``lax.scan``: one jitted
program per shape.
"""

from collections.abc import Callable, Sequence
import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spear_jax._types import Array
from spear_jax._types import Float
from spear_jax._types import PRNGKeyArray

__all__ = ["BaselineConfig", "BaselineResult", "gradient_matching"]


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """Settings of the gradient-matching baseline.

  Attributes:
    steps: Adam steps per restart.
    restarts: independent random initializations; the best is kept.
    learning_rate: initial Adam learning rate (divided by 10 at 3/8, 5/8
      and 7/8 of the steps).
    tv_weight: weight of the total-variation prior (images only).
    signed: step on the sign of the gradient, as Geiping et al. do.
  """

  steps: int = 200
  restarts: int = 2
  learning_rate: float = 0.1
  tv_weight: float = 1e-2
  signed: bool = True

  def __post_init__(self):
    if self.steps < 1 or self.restarts < 1:
      raise ValueError("steps and restarts must be at least 1.")
    if not self.learning_rate > 0 or self.tv_weight < 0:
      raise ValueError("learning_rate must be positive, tv_weight >= 0.")


class BaselineResult(NamedTuple):
  """The best restart of the baseline.

  Attributes:
    inputs: ``(b, n)`` the reconstruction (no order, nothing certified).
    loss: its final matching loss (cosine distance plus the TV term).
    restart_losses: the final loss of every restart.
    seconds: wall time, compilation included.
  """

  inputs: Float[Array, "b n"]
  loss: float
  restart_losses: Float[Array, " r"]
  seconds: float


def _total_variation(x_bxn, image_shape):
  x = x_bxn.reshape((x_bxn.shape[0], *image_shape))
  dy = jnp.abs(x[:, 1:] - x[:, :-1]).mean()
  dx = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean()
  return dx + dy


def _cosine_distance(grads, target):
  dots = jax.tree.leaves(
    jax.tree.map(lambda g, t: jnp.vdot(g, t), grads, target)
  )
  dot = sum(dots)
  return 1.0 - dot / (optax.tree.norm(grads) * optax.tree.norm(target) + 1e-30)


def gradient_matching(
  loss_fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
  target: Any,
  *,
  key: PRNGKeyArray,
  shape: tuple[int, int],
  image_shape: Sequence[int] | None = None,
  bounds: tuple[Any, Any] | None = None,
  config: BaselineConfig | None = None,
  dtype: Any = jnp.float32,
) -> BaselineResult:
  """Reconstructs a batch by matching the direction of the shared update.

  Args:
    loss_fn: ``loss_fn(params, inputs_bxn) -> scalar``, the client's loss
      with the labels closed over.
    params: the server's parameters.
    target: what the client sent, a pytree like ``params`` (a gradient; a
      FedAvg delta or DP-SGD gradient is matched as if it were one).
    key: PRNG key of the initializations.
    shape: ``(b, n)``.
    image_shape: ``(H, W, C)`` of a flattened sample, for the TV prior
      (``None``: no prior).
    bounds: ``(low, high)`` of the inputs, broadcastable to ``(n,)``;
      ``None``: unbounded.
    config: a :class:`BaselineConfig`.
    dtype: dtype of the dummy inputs.

  Returns:
    A :class:`BaselineResult`.
  """
  config = BaselineConfig() if config is None else config
  start = time.perf_counter()
  tv_weight = config.tv_weight if image_shape is not None else 0.0
  steps = config.steps
  schedule = optax.piecewise_constant_schedule(
    config.learning_rate,
    {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8) if int(steps * f)},
  )
  optimizer = optax.adam(schedule)

  def objective(x):
    grads = jax.grad(loss_fn)(params, x)
    value = _cosine_distance(grads, target)
    if tv_weight:
      value = value + tv_weight * _total_variation(x, image_shape)
    return value

  if bounds is not None:  # broadcast to (b, n) explicitly
    low, high = (jnp.broadcast_to(jnp.asarray(v, dtype), shape) for v in bounds)

  def clip(x):
    if bounds is None:
      return x
    return jnp.clip(x, low, high)

  def one_restart(restart_key):
    x0 = clip(jax.random.normal(restart_key, shape, dtype))

    def step(carry, _):
      x, opt_state = carry
      value, grad = jax.value_and_grad(objective)(x)
      if config.signed:
        grad = jnp.sign(grad)
      updates, opt_state = optimizer.update(grad, opt_state, x)
      return (clip(optax.apply_updates(x, updates)), opt_state), value

    (x, _), _ = jax.lax.scan(step, (x0, optimizer.init(x0)), length=steps)
    return x, objective(x)

  run = jax.jit(jax.vmap(one_restart))
  # optax's Adam mixes Python floats with its int32 step count.
  with jax.numpy_dtype_promotion("standard"):
    inputs, losses = run(jax.random.split(key, config.restarts))
  best = int(jnp.argmin(losses))
  inputs = jax.block_until_ready(inputs[best])
  return BaselineResult(
    inputs=inputs,
    loss=float(losses[best]),
    restart_losses=losses,
    seconds=time.perf_counter() - start,
  )
