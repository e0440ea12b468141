"""What real federated clients send: FedSGD, mini-batch FedAvg, DP-SGD.

:func:`simulate_client` runs one client round on any model given as
``apply_fn(params, inputs_bxn) -> logits`` and a pytree of parameters
(flax linen or nnx, equinox after ``eqx.partition``, plain dicts) and
returns the attacked dense layer's share of the update in the paper's
layout, with the ground truth (the layer's inputs and ``D``) for scoring:

* ``fedsgd``: the gradient of the mean (or summed) cross-entropy;
* ``fedavg``: ``E`` local epochs over the client's ``N`` samples in shuffled
  mini-batches of size ``B`` with plain SGD (or any optax optimizer), sent
  as the parameter delta (server minus client, or client minus server);
* ``dpsgd``: per-example gradients clipped to global norm ``C`` and
  Gaussian noise ``sigma C`` on their sum, then the mean
  (:func:`optax.contrib.differentially_private_aggregate`); the privacy
  of a run is :func:`dp_epsilon` (``dp_accounting``'s RDP accountant).

The ground-truth ``D`` of the attacked layer is assembled from per-example
gradients of its bias (``dL_i/dbeta = d_i``): for FedSGD and DP-SGD it is
the (clipped, scaled) ``d_i`` at the server's weights; for FedAvg with SGD
it is ``D_eff``, the learning-rate-weighted sum of ``d_i`` over the steps
that saw sample ``i``, so that the first layer's update is exactly
``D_eff X^T``.
"""

from collections.abc import Callable
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spear_jax._layouts import dense_layer
from spear_jax._types import Array
from spear_jax._types import Float
from spear_jax._types import Int
from spear_jax._types import PRNGKeyArray

__all__ = [
  "CLIENT_MODES",
  "ClientConfig",
  "ModelSpec",
  "SimulatedUpdate",
  "dp_epsilon",
  "dpsgd_update",
  "fedavg_update",
  "fedsgd_update",
  "parse_client_spec",
  "simulate_client",
]

CLIENT_MODES = ("fedsgd", "fedavg", "dpsgd")
SIGNS = ("server_minus_client", "client_minus_server")
ApplyFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """How a client computes what it sends.

  Attributes:
    mode: ``"fedsgd"``, ``"fedavg"`` or ``"dpsgd"``.
    reduction: FedSGD's loss over the batch, ``"mean"`` or ``"sum"``.
    local_epochs: FedAvg's ``E``.
    local_batch_size: FedAvg's ``B`` (``None``: the whole batch per step);
      the last mini-batch of an epoch may be smaller, as in PyTorch.
    learning_rate: FedAvg's ``lr`` of the default plain SGD.
    optimizer: FedAvg's local optimizer (an optax transformation);
      ``None`` means ``optax.sgd(learning_rate)``. Only plain SGD keeps the
      update exactly ``D_eff X^T`` (momentum and Adam rescale it per
      coordinate), so the ground-truth ``D`` is given for SGD only.
    sign: FedAvg's delta, ``"server_minus_client"`` (FedJAX, TFF) or
      ``"client_minus_server"``.
    clip_norm: DP-SGD's per-example global clipping norm ``C``.
    noise_multiplier: DP-SGD's ``sigma``; the noise on the summed gradient
      has standard deviation ``sigma C``.
  """

  mode: str = "fedsgd"
  reduction: str = "mean"
  local_epochs: int = 1
  local_batch_size: int | None = None
  learning_rate: float = 0.01
  optimizer: optax.GradientTransformation | None = None
  sign: str = "server_minus_client"
  clip_norm: float = 1.0
  noise_multiplier: float = 0.0

  def __post_init__(self):
    if self.mode not in CLIENT_MODES:
      raise ValueError(
        f"Unknown client mode {self.mode!r}; use one of {CLIENT_MODES}."
      )
    if self.reduction not in ("mean", "sum"):
      raise ValueError(
        f"reduction must be 'mean' or 'sum', not {self.reduction!r}."
      )
    if self.sign not in SIGNS:
      raise ValueError(f"sign must be one of {SIGNS}, not {self.sign!r}.")
    if self.local_epochs < 1:
      raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}.")
    if self.local_batch_size is not None and self.local_batch_size < 1:
      raise ValueError("local_batch_size must be positive.")
    if not self.learning_rate > 0:
      raise ValueError(
        f"learning_rate must be positive, got {self.learning_rate}."
      )
    if not self.clip_norm > 0 or self.noise_multiplier < 0:
      raise ValueError("clip_norm must be positive and noise_multiplier >= 0.")

  @property
  def noise_std(self) -> float:
    """Standard deviation of the noise on the summed DP-SGD gradient."""
    if self.mode != "dpsgd":
      return 0.0
    return self.noise_multiplier * self.clip_norm


class ModelSpec(NamedTuple):
  """A model, as the experiment runner and the audit need to know it.

  A model factory ``factory(key, n, width, num_classes, dtype) ->
  ModelSpec`` brings a user's own flax (or any JAX) model to the audit
  (:func:`spear_jax.audit.run_audit`) and the experiment runner.

  Attributes:
    apply_fn: ``apply_fn(params, inputs_bxn) -> logits``.
    params: the server's parameters (a pytree).
    layer: path of the attacked dense layer in ``params``
      (:func:`spear_jax.fl.dense_layer`), e.g. ``"params/Dense_0"``.
    head: path of the classifier (last dense layer), for labels; ``None``
      skips label recovery.
    features_fn: ``features_fn(params, inputs) -> the attacked layer's
      inputs``; ``None`` when the attacked layer sees the inputs (then the
      reconstruction is scored as images and the baseline can run).
    tail_fn: ``tail_fn(params, layer_inputs) -> the classifier's inputs``
      (what the network computes between the attacked layer's input and
      the head), for labels; ``None`` skips label recovery.
    next_layer: path of the dense layer that reads the attacked layer's
      ReLU output directly (the head, after the last hidden layer): its
      weight rules out mixed columns under FedSGD (:func:`spear_jax.invert`'s
      ``next_weight``); ``None`` skips that check.
  """

  apply_fn: Callable[..., Any]
  params: Any
  layer: str
  head: str | None = None
  features_fn: Callable[..., Any] | None = None
  tail_fn: Callable[..., Any] | None = None
  next_layer: str | None = None


def parse_client_spec(spec: str) -> ClientConfig:
  """A :class:`ClientConfig` from a short spec, as the scripts take it.

  ``fedsgd``; ``dpsgd/SIGMA`` (clipping norm 1); ``fedavg/E/B/LR`` (``E``
  local epochs of mini-batches of ``B`` at SGD rate ``LR``).

  Raises:
    ValueError: a malformed spec, in one line.
  """
  mode, *args = spec.split("/")
  try:
    if mode == "fedsgd" and not args:
      return ClientConfig()
    if mode == "dpsgd" and len(args) == 1:
      return ClientConfig(mode="dpsgd", noise_multiplier=float(args[0]))
    if mode == "fedavg" and len(args) == 3:
      return ClientConfig(
        mode="fedavg",
        local_epochs=int(args[0]),
        local_batch_size=int(args[1]),
        learning_rate=float(args[2]),
      )
  except ValueError as err:
    raise ValueError(f"client spec {spec!r}: {err}") from None
  raise ValueError(
    f"client spec {spec!r}: use fedsgd, dpsgd/SIGMA or fedavg/E/B/LR."
  )


def _per_example_loss(apply_fn: ApplyFn, params, x_n, y):
  logits = apply_fn(params, x_n[None, :])[0]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _per_example_grads(apply_fn, params, inputs_bxn, labels_b):
  grad = jax.grad(lambda p, x, y: _per_example_loss(apply_fn, p, x, y))
  return jax.vmap(grad, in_axes=(None, 0, 0))(params, inputs_bxn, labels_b)


def fedsgd_update(
  apply_fn: ApplyFn,
  params,
  inputs_bxn: Float[Array, "b n"],
  labels_b: Int[Array, " b"],
  reduction: str = "mean",
):
  """The FedSGD gradient of the batch's cross-entropy (mean or sum)."""

  def loss_fn(p):
    logits = apply_fn(p, inputs_bxn)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels_b)
    return losses.mean() if reduction == "mean" else losses.sum()

  return jax.grad(loss_fn)(params)


def dpsgd_update(
  apply_fn: ApplyFn,
  params,
  inputs_bxn: Float[Array, "b n"],
  labels_b: Int[Array, " b"],
  *,
  key: PRNGKeyArray,
  clip_norm: float,
  noise_multiplier: float,
):
  """One DP-SGD gradient: clip per example, add ``N(0, (sigma C)^2)``, mean.

  Built on :func:`optax.contrib.differentially_private_aggregate` (global
  per-example clipping over the whole model).
  """
  per_example = _per_example_grads(apply_fn, params, inputs_bxn, labels_b)
  aggregate = optax.contrib.differentially_private_aggregate(
    clip_norm, noise_multiplier, key=key
  )
  noised, _ = aggregate.update(per_example, aggregate.init(params))
  return noised


def _batches(key, num_samples, batch_size, epochs):
  """Shuffled index batches of every epoch (the last may be smaller)."""
  order = []
  for epoch in range(epochs):
    perm = np.asarray(
      jax.random.permutation(jax.random.fold_in(key, epoch), num_samples)
    )
    order += [
      perm[s : s + batch_size] for s in range(0, num_samples, batch_size)
    ]
  return order


def _fedavg(apply_fn, params, inputs, labels, key, config, layer):
  """Local training; returns the final parameters and ``D_eff`` (or None)."""
  optimizer = config.optimizer or optax.sgd(config.learning_rate)
  plain_sgd = config.optimizer is None
  batch_size = config.local_batch_size or inputs.shape[0]

  @jax.jit
  def step(p, opt_state, x, y):
    per_example = _per_example_grads(apply_fn, p, x, y)
    grads = jax.tree.map(lambda g: g.mean(0), per_example)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    d_bxm = (
      jax.vmap(lambda g: dense_layer(g, layer)[1])(per_example)
      if layer is not None
      else None
    )
    return optax.apply_updates(p, updates), opt_state, d_bxm

  state = optimizer.init(params)
  d_eff = None
  for rows in _batches(key, inputs.shape[0], batch_size, config.local_epochs):
    params, state, d_bxm = step(params, state, inputs[rows], labels[rows])
    if layer is not None and plain_sgd:
      if d_eff is None:
        d_eff = jnp.zeros((inputs.shape[0], d_bxm.shape[1]), d_bxm.dtype)
      d_eff = d_eff.at[rows].add(config.learning_rate / len(rows) * d_bxm)
  return params, d_eff


def fedavg_update(
  apply_fn: ApplyFn,
  params,
  inputs_bxn: Float[Array, "N n"],
  labels_b: Int[Array, " N"],
  *,
  key: PRNGKeyArray,
  config: ClientConfig,
):
  """The FedAvg delta after ``E`` local epochs of mini-batch training.

  Returns:
    ``server - client`` or ``client - server`` (``config.sign``), a pytree
    like ``params``.
  """
  client, _ = _fedavg(apply_fn, params, inputs_bxn, labels_b, key, config, None)
  return _delta(params, client, config.sign)


def _delta(server, client, sign):
  if sign == "server_minus_client":
    return jax.tree.map(lambda s, c: s - c, server, client)
  return jax.tree.map(lambda s, c: c - s, server, client)


def dp_epsilon(
  noise_multiplier: float,
  *,
  steps: int = 1,
  sampling_rate: float = 1.0,
  delta: float = 1e-5,
) -> float:
  """The ``epsilon`` of DP-SGD at ``delta`` (``dp_accounting``, RDP).

  Args:
    noise_multiplier: ``sigma``.
    steps: noisy gradients released (one per FedSGD round).
    sampling_rate: Poisson sampling probability of each example per step
      (1 for a client that always uses its whole batch).
    delta: the ``delta`` of the guarantee.

  Returns:
    ``epsilon`` (``inf`` without noise).
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top

  if noise_multiplier <= 0:
    return math.inf
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1.0:
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
  return float(accountant.get_epsilon(delta))


class SimulatedUpdate(NamedTuple):
  """One client round, the attacked layer in the paper's layout.

  Attributes:
    weight_grad: the layer's share of what the client sends (``m x n``):
      the gradient (FedSGD, DP-SGD) or the parameter delta (FedAvg).
    bias_grad: the bias's share (``m``).
    weight: the layer's ``W`` at the server (``m x n``).
    bias: the layer's ``beta`` at the server.
    inputs: the layer's inputs at the server's weights (``b x n``), the
      ground truth of the attack.
    grad_z: the true ``D`` with ``weight_grad = D X^T`` up to the DP noise
      (``m x b``); ``None`` for FedAvg with an optimizer other than SGD, or
      for a deeper layer under FedAvg, where no such ``D`` exists.
    update: the whole update pytree, as sent.
    mode: the client mode.
    noise_std: per-entry standard deviation of the noise on ``weight_grad``
      (``sigma C / b`` for DP-SGD, else 0).
  """

  weight_grad: Float[Array, "m n"]
  bias_grad: Float[Array, " m"]
  weight: Float[Array, "m n"]
  bias: Float[Array, " m"]
  inputs: Float[Array, "b n"]
  grad_z: Float[Array, "m b"] | None
  update: Any
  mode: str
  noise_std: float


def _per_example_layer(apply_fn, params, inputs, labels, layer, chunk=8):
  """Per sample: ``d_i``, ``x_i`` and the whole-model gradient norm.

  From the per-example gradient ``G_i = d_i x_i^T`` of the layer and
  ``d_i`` of its bias: ``x_i = G_i^T d_i / |d_i|^2`` (NaN when ``d_i = 0``:
  the sample left no trace). Computed ``chunk`` samples at a time, keeping
  only these small results, so that memory stays bounded for wide models.
  """

  def one(xy):
    grads = jax.grad(lambda p: _per_example_loss(apply_fn, p, *xy))(params)
    g_mxn, d_m = dense_layer(grads, layer)
    norm = jnp.sum(d_m * d_m)
    x_n = jnp.dot(d_m, g_mxn) / jnp.where(norm > 0, norm, 1.0)
    x_n = jnp.where(norm > 0, x_n, jnp.nan)
    return d_m, x_n, optax.tree.norm(grads)

  return jax.jit(lambda x, y: jax.lax.map(one, (x, y), batch_size=chunk))(
    inputs, labels
  )


def simulate_client(
  apply_fn: ApplyFn,
  params,
  inputs_bxn: Float[Array, "b n"],
  labels_b: Int[Array, " b"],
  *,
  layer: str | Any,
  key: PRNGKeyArray | None = None,
  client: ClientConfig | None = None,
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> SimulatedUpdate:
  """Runs one client round and extracts the attacked layer.

  Args:
    apply_fn: ``apply_fn(params, inputs_bxn) -> logits``.
    params: the server's parameters (a pytree of arrays).
    inputs_bxn: the client's private samples, flattened, one per row.
    labels_b: their integer labels.
    layer: path of the attacked dense layer in ``params`` (see
      :func:`spear_jax.fl.dense_layer`).
    key: PRNG key (FedAvg's shuffling, DP-SGD's noise).
    client: a :class:`ClientConfig`; ``None`` is FedSGD with the mean.
    features_fn: ``features_fn(params, inputs) -> layer inputs`` for the
      ground truth; without it they are read off per-example gradients
      (a sample with ``d_i = 0`` then has NaN features: it left no trace).

  Returns:
    A :class:`SimulatedUpdate`.
  """
  client = ClientConfig() if client is None else client
  key = jax.random.key(0) if key is None else key
  b = inputs_bxn.shape[0]
  d_bxm, features, norms = _per_example_layer(
    apply_fn, params, inputs_bxn, labels_b, layer
  )
  if features_fn is not None:
    features = features_fn(params, inputs_bxn)
  noise_std = 0.0
  if client.mode == "fedsgd":
    update = fedsgd_update(
      apply_fn, params, inputs_bxn, labels_b, client.reduction
    )
    grad_z = d_bxm.T / (b if client.reduction == "mean" else 1)
  elif client.mode == "dpsgd":
    update = dpsgd_update(
      apply_fn,
      params,
      inputs_bxn,
      labels_b,
      key=key,
      clip_norm=client.clip_norm,
      noise_multiplier=client.noise_multiplier,
    )
    scale = jnp.minimum(
      1.0, client.clip_norm / jnp.where(norms > 0, norms, 1.0)
    )
    grad_z = (d_bxm * scale[:, None]).T / b
    noise_std = client.noise_std / b
  else:
    final, d_eff = _fedavg(
      apply_fn, params, inputs_bxn, labels_b, key, client, layer
    )
    update = _delta(params, final, client.sign)
    grad_z = None if d_eff is None else d_eff.T
    if grad_z is not None and client.sign == "client_minus_server":
      grad_z = -grad_z
  weight_grad, bias_grad = dense_layer(update, layer)
  weight, bias = dense_layer(params, layer)
  return SimulatedUpdate(
    weight_grad=weight_grad,
    bias_grad=bias_grad,
    weight=weight,
    bias=bias,
    inputs=features,
    grad_z=grad_z,
    update=update,
    mode=client.mode,
    noise_std=noise_std,
  )
