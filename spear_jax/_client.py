"""A federated-learning client: a flax ReLU MLP and its FedSGD gradient.

The server in FedSGD receives the gradient of the client's mean loss on its
private batch. :func:`client_update` computes it for a Dense-ReLU stack and
returns the attacked layer's gradient in the paper's layout.

Layouts: flax ``nn.Dense`` stores its kernel as ``(in, out) = (n, m)``, the
transpose of the paper's ``W`` (``m x n``); :func:`paper_layout` converts.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from spear_jax._types import Array
from spear_jax._types import Float
from spear_jax._types import Int
from spear_jax._types import PRNGKeyArray

__all__ = [
  "CNN",
  "MLP",
  "ClientUpdate",
  "client_update",
  "init_mlp",
  "layer_gradient",
  "layer_parameters",
  "paper_layout",
]


def _torch_uniform(fan_in_axis: int):
  """PyTorch's default ``nn.Linear`` init: ``U(-1/sqrt(fan_in), +...)``."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = shape[fan_in_axis]
    bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, dtype))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class MLP(nn.Module):
  """Dense-ReLU stack followed by a linear classifier.

  Attributes:
    widths: widths of the hidden Dense layers (each followed by ReLU).
    num_classes: outputs of the final Dense layer.
    initializer: ``"torch"`` (uniform ``+-1/sqrt(fan_in)`` for kernel and
      bias, as PyTorch's ``nn.Linear``) or ``"flax"`` (lecun normal kernel,
      zero bias).
  """

  widths: Sequence[int]
  num_classes: int
  initializer: str = "torch"

  def _dense(self, width: int, fan_in: int, dtype) -> nn.Dense:
    if self.initializer == "torch":
      return nn.Dense(
        width,
        kernel_init=_torch_uniform(0),
        bias_init=_torch_bias(fan_in),
        param_dtype=dtype,
      )
    if self.initializer == "flax":
      return nn.Dense(width, param_dtype=dtype)
    raise ValueError(
      f"Unknown initializer {self.initializer!r}; use 'torch' or 'flax'."
    )

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(self._dense(width, x.shape[-1], x.dtype)(x))
    return self._dense(self.num_classes, x.shape[-1], x.dtype)(x)


class CNN(nn.Module):
  """A small convolutional classifier whose first dense layer follows convs.

  Flattened ``(b, H*W*C)`` images are reshaped to ``image_shape``, passed
  through ``3x3`` convolutions (ReLU, ``2x2`` average pooling), flattened,
  then ``Dense(width)``-ReLU and a linear classifier. The first dense layer
  (``"params/Dense_0"``) sees the flattened conv features
  (:meth:`features`); attacking it recovers them.

  Attributes:
    image_shape: ``(H, W, C)`` of the flattened inputs.
    channels: output channels of each convolution.
    width: width of the dense hidden layer (``m``).
    num_classes: outputs of the classifier.
  """

  image_shape: Sequence[int] = (32, 32, 3)
  channels: Sequence[int] = (8, 16)
  width: int = 400
  num_classes: int = 10

  def setup(self):
    self.convs = [
      nn.Conv(c, (3, 3), param_dtype=self.param_dtype, name=f"Conv_{i}")
      for i, c in enumerate(self.channels)
    ]
    self.hidden = nn.Dense(
      self.width, param_dtype=self.param_dtype, name="Dense_0"
    )
    self.head = nn.Dense(
      self.num_classes, param_dtype=self.param_dtype, name="Dense_1"
    )

  param_dtype: Any = jnp.float32

  def features(self, x):
    """The flattened conv features, the first dense layer's inputs."""
    h = x.reshape((x.shape[0], *self.image_shape))
    for conv in self.convs:
      h = nn.relu(conv(h))
      b, height, width, c = h.shape  # 2x2 average pooling (even sizes)
      h = h[:, : height // 2 * 2, : width // 2 * 2]
      h = h.reshape((b, height // 2, 2, width // 2, 2, c)).mean(axis=(2, 4))
    return h.reshape((h.shape[0], -1))

  def __call__(self, x):
    return self.head(nn.relu(self.hidden(self.features(x))))


def _torch_bias(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, dtype))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def init_mlp(
  key: PRNGKeyArray, model: MLP, n: int, dtype=jnp.float32
) -> Mapping[str, Any]:
  """Initial parameters of ``model`` for ``n``-dimensional inputs."""
  return model.init(key, jnp.zeros((1, n), dtype))


def paper_layout(kernel_nxm: Float[Array, "n m"]) -> Float[Array, "m n"]:
  """Converts a flax/haiku ``(in, out)`` kernel (or its gradient) to ``W``.

  The paper writes ``Z = W X + beta`` with ``W`` of shape ``(m, n)``; flax
  ``nn.Dense`` computes ``x @ kernel`` with ``kernel`` of shape ``(n, m)``,
  so ``W = kernel^T`` and ``dL/dW = (dL/dkernel)^T``.
  """
  return jnp.swapaxes(kernel_nxm, -1, -2)


def layer_parameters(params, layer: int = 0):
  """``(W, beta)`` of hidden layer ``layer`` in the paper's layout."""
  dense = params["params"][f"Dense_{layer}"]
  return paper_layout(dense["kernel"]), dense["bias"]


def layer_gradient(grads, layer: int = 0):
  """``(dL/dW, dL/dbeta)`` of layer ``layer`` in the paper's layout."""
  return layer_parameters(grads, layer)


def hidden_features(params, inputs_bxn, layer: int, start: int = 0):
  """The inputs of dense layer ``layer`` of an :class:`MLP`.

  ``inputs_bxn`` are the inputs of layer ``start`` (0: the model's inputs);
  every dense layer from ``start`` to ``layer - 1`` is followed by ReLU.
  """
  features = inputs_bxn
  for j in range(start, layer):
    w_j, b_j = layer_parameters(params, j)
    features = jax.nn.relu(features @ w_j.T + b_j[None, :])
  return features


class ClientUpdate(NamedTuple):
  """What the client shares about the attacked layer, and the truth.

  Attributes:
    weight_grad: ``dL/dW`` (``m x n``).
    bias_grad: ``dL/dbeta``.
    weight: the layer's ``W`` (known to the server).
    bias: the layer's ``beta`` (known to the server).
    inputs: the input of the attacked layer, one sample per row (the
      ground truth the attack should recover).
    grad_z: the true ``D = dL/dZ`` (``m x b``), for tests.
  """

  weight_grad: Float[Array, "m n"]
  bias_grad: Float[Array, " m"]
  weight: Float[Array, "m n"]
  bias: Float[Array, " m"]
  inputs: Float[Array, "b n"]
  grad_z: Float[Array, "m b"]


def client_update(
  params,
  model: MLP,
  inputs_bxn: Float[Array, "b n"],
  labels_b: Int[Array, " b"],
  layer: int = 0,
) -> ClientUpdate:
  r"""FedSGD gradient of the mean cross-entropy, attacked layer extracted.

  .. math:: \mathcal{L} = \tfrac{1}{b} \sum_i \mathrm{CE}(f(x_i), y_i)

  Args:
    params: the model's parameters (as sent by the server).
    model: the :class:`MLP`.
    inputs_bxn: the private batch, one flattened sample per row.
    labels_b: integer labels.
    layer: which hidden Dense layer is attacked (0 = the first).

  Returns:
    A :class:`ClientUpdate`. For ``layer > 0`` the ground-truth ``inputs``
    are that layer's input features.
  """
  if not 0 <= layer < len(model.widths):
    raise ValueError(
      f"layer must be a hidden layer in [0, {len(model.widths) - 1}], got "
      f"{layer}."
    )

  def loss_fn(p):
    logits = model.apply(p, inputs_bxn)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels_b
    ).mean()

  grads = jax.grad(loss_fn)(params)
  weight_grad, bias_grad = layer_gradient(grads, layer)
  weight, bias = layer_parameters(params, layer)

  # Ground truth: the attacked layer's input and dL/dZ (for tests only).
  features = hidden_features(params, inputs_bxn, layer)

  def loss_from_z(z_bxm):
    x = jax.nn.relu(z_bxm)
    for j in range(layer + 1, len(model.widths)):
      w_j, b_j = layer_parameters(params, j)
      x = jax.nn.relu(x @ w_j.T + b_j[None, :])
    head = params["params"][f"Dense_{len(model.widths)}"]
    logits = x @ head["kernel"] + head["bias"][None, :]
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels_b
    ).mean()

  grad_z_bxm = jax.grad(loss_from_z)(features @ weight.T + bias[None, :])
  return ClientUpdate(
    weight_grad=weight_grad,
    bias_grad=bias_grad,
    weight=weight,
    bias=bias,
    inputs=features,
    grad_z=grad_z_bxm.T,
  )
