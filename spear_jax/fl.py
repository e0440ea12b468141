"""Federated clients: models, what a client sends, layer layouts.

* Models: :class:`MLP` (Dense-ReLU stack) and :class:`CNN` (convolutions,
  then a dense layer that sees the flattened conv features).
* Client rounds: :func:`simulate_client` (any ``apply_fn`` and parameter
  pytree, a :class:`ClientConfig` of ``fedsgd``, ``fedavg`` or ``dpsgd``),
  the updates themselves (:func:`fedsgd_update`, :func:`fedavg_update`,
  :func:`dpsgd_update`) and the privacy of DP-SGD (:func:`dp_epsilon`).
  :func:`client_update` is the FedSGD shortcut for an :class:`MLP`.
* Layouts: :func:`dense_layer` picks a dense layer out of flax linen/nnx,
  equinox or dict pytrees by its path and returns it in the paper's
  ``m x n`` layout (:func:`paper_layout` for a single flax kernel);
  :func:`replace_dense_layer` writes one back.
"""

from spear_jax._client import CNN as CNN
from spear_jax._client import MLP as MLP
from spear_jax._client import ClientUpdate as ClientUpdate
from spear_jax._client import client_update as client_update
from spear_jax._client import init_mlp as init_mlp
from spear_jax._client import layer_gradient as layer_gradient
from spear_jax._client import layer_parameters as layer_parameters
from spear_jax._client import paper_layout as paper_layout
from spear_jax._clients import CLIENT_MODES as CLIENT_MODES
from spear_jax._clients import ClientConfig as ClientConfig
from spear_jax._clients import ModelSpec as ModelSpec
from spear_jax._clients import SimulatedUpdate as SimulatedUpdate
from spear_jax._clients import dp_epsilon as dp_epsilon
from spear_jax._clients import dpsgd_update as dpsgd_update
from spear_jax._clients import fedavg_update as fedavg_update
from spear_jax._clients import fedsgd_update as fedsgd_update
from spear_jax._clients import parse_client_spec as parse_client_spec
from spear_jax._clients import simulate_client as simulate_client
from spear_jax._layouts import dense_layer as dense_layer
from spear_jax._layouts import dense_paths as dense_paths
from spear_jax._layouts import replace_dense_layer as replace_dense_layer

__all__ = [
  "CLIENT_MODES",
  "CNN",
  "MLP",
  "ClientConfig",
  "ClientUpdate",
  "ModelSpec",
  "SimulatedUpdate",
  "client_update",
  "dense_layer",
  "dense_paths",
  "dp_epsilon",
  "dpsgd_update",
  "fedavg_update",
  "fedsgd_update",
  "init_mlp",
  "layer_gradient",
  "layer_parameters",
  "paper_layout",
  "parse_client_spec",
  "replace_dense_layer",
  "simulate_client",
]
