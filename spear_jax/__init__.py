"""spear_jax: exact gradient inversion of batches (SPEAR, SPEAR++) in JAX.

The public API is grouped by topic, as in optax and flax:

* :mod:`spear_jax.attack`: :func:`invert`, its configs, results and the
  search strategies;
* :mod:`spear_jax.fl`: client models and the updates a client sends;
* :mod:`spear_jax.data`: bundled real images and tfds datasets;
* :mod:`spear_jax.metrics`: scores and pictures of a reconstruction.

The names a quickstart needs are also available here. ``fl``, ``data`` and
``metrics`` (and their names here) are imported on first use, so that
``import spear_jax`` for an attack does not pay for flax and scipy.

References:
  Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
  Batches in Federated Learning. NeurIPS 2024.
  https://arxiv.org/abs/2403.03945
"""

import importlib
from typing import TYPE_CHECKING, Any

from spear_jax import attack as attack
from spear_jax.attack import AttackConfig as AttackConfig
from spear_jax.attack import InversionResult as InversionResult
from spear_jax.attack import InversionStats as InversionStats
from spear_jax.attack import LearnerConfig as LearnerConfig
from spear_jax.attack import invert as invert

if TYPE_CHECKING:
  from spear_jax import audit as audit
  from spear_jax import data as data
  from spear_jax import fl as fl
  from spear_jax import metrics as metrics
  from spear_jax.data import load_bundled as load_bundled
  from spear_jax.data import sample_batch as sample_batch
  from spear_jax.fl import MLP as MLP
  from spear_jax.fl import client_update as client_update
  from spear_jax.fl import init_mlp as init_mlp
  from spear_jax.fl import paper_layout as paper_layout
  from spear_jax.metrics import match_and_score as match_and_score

__version__ = "0.1.0"

# Lazily imported: name -> (module, attribute or None for the module).
_LAZY = {
  "audit": ("spear_jax.audit", None),
  "data": ("spear_jax.data", None),
  "fl": ("spear_jax.fl", None),
  "metrics": ("spear_jax.metrics", None),
  "load_bundled": ("spear_jax.data", "load_bundled"),
  "sample_batch": ("spear_jax.data", "sample_batch"),
  "MLP": ("spear_jax.fl", "MLP"),
  "client_update": ("spear_jax.fl", "client_update"),
  "init_mlp": ("spear_jax.fl", "init_mlp"),
  "paper_layout": ("spear_jax.fl", "paper_layout"),
  "match_and_score": ("spear_jax.metrics", "match_and_score"),
}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'spear_jax' has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(__all__)


__all__ = [
  "MLP",
  "AttackConfig",
  "InversionResult",
  "InversionStats",
  "LearnerConfig",
  "attack",
  "audit",
  "client_update",
  "data",
  "fl",
  "init_mlp",
  "invert",
  "load_bundled",
  "match_and_score",
  "metrics",
  "paper_layout",
  "sample_batch",
]
