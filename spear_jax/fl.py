"""Federated clients: the client model, what a client sends, layouts.

A client update is the gradient (FedSGD) of a batch through a ReLU MLP;
:func:`paper_layout` turns flax's ``(n, m)`` kernels into the paper's
``m x n`` layout that :func:`spear_jax.invert` takes.
"""

from spear_jax._client import MLP as MLP
from spear_jax._client import ClientUpdate as ClientUpdate
from spear_jax._client import client_update as client_update
from spear_jax._client import init_mlp as init_mlp
from spear_jax._client import layer_gradient as layer_gradient
from spear_jax._client import layer_parameters as layer_parameters
from spear_jax._client import paper_layout as paper_layout

__all__ = [
  "MLP",
  "ClientUpdate",
  "client_update",
  "init_mlp",
  "layer_gradient",
  "layer_parameters",
  "paper_layout",
]
