"""Dense layers inside model pytrees, in the paper's layout.

Frameworks store a dense layer differently:

* flax linen (``params["params"]["Dense_0"]``) and flax nnx
  (``nnx.state(model)["linear"]``) keep ``kernel`` as ``(in, out) = (n, m)``,
  the transpose of the paper's ``W``;
* equinox (``model.layers[0]``) and PyTorch keep ``weight`` as
  ``(out, in) = (m, n)``, the paper's layout;
* plain dicts may use either name.

A layer is named by its *path* in the pytree: the keys, attribute names
and sequence indices from the root, joined by ``/`` (``"params/Dense_0"``,
``"layers/0"``, ``"linear"``). The same path picks the layer out of the
parameters and out of a gradient or update of the same structure. nnx's
``Variable.value`` wrappers are transparent.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "LAYOUTS",
  "dense_layer",
  "dense_paths",
  "replace_dense_layer",
]

# Leaf names of a dense layer's weight, by layout, and of its bias.
_IN_OUT_NAMES = ("kernel",)
_OUT_IN_NAMES = ("weight", "w", "W")
_BIAS_NAMES = ("bias", "b")
LAYOUTS = ("auto", "in_out", "out_in")


def _key_name(entry) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def _leaf_path(key_path) -> str:
  names = [_key_name(entry) for entry in key_path]
  if names and names[-1] == "value" and len(names) > 1:
    names = names[:-1]  # nnx Variable / VariableState wrapper
  return "/".join(names)


def _normalize(path: str | Sequence[Any]) -> str:
  if isinstance(path, str):
    return path.strip("/")
  return "/".join(str(p) for p in path)


def _array_leaves(tree) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    _leaf_path(kp): leaf
    for kp, leaf in leaves
    if isinstance(leaf, (jax.Array, np.ndarray))
  }


def _find(leaves, path, names):
  found = [
    name for name in names if (f"{path}/{name}" if path else name) in leaves
  ]
  return found[0] if found else None


def dense_paths(tree) -> list[str]:
  """Paths of every dense layer (a 2-D weight beside a 1-D bias) in a tree."""
  leaves = _array_leaves(tree)
  paths = []
  for leaf_path, leaf in leaves.items():
    parent, _, name = leaf_path.rpartition("/")
    is_weight = name in _IN_OUT_NAMES + _OUT_IN_NAMES and np.ndim(leaf) == 2
    if is_weight and _find(leaves, parent, _BIAS_NAMES) is not None:
      paths.append(parent)
  return paths


def _locate(tree, path, layout):
  if layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {layout!r}; use one of {LAYOUTS}.")
  path = _normalize(path)
  leaves = _array_leaves(tree)
  weight_name = _find(leaves, path, _IN_OUT_NAMES + _OUT_IN_NAMES)
  bias_name = _find(leaves, path, _BIAS_NAMES)
  if weight_name is None or bias_name is None:
    raise ValueError(
      f"no dense layer (a weight/kernel and a bias) at path {path!r}; dense "
      f"layers in this tree: {dense_paths(tree)}."
    )
  prefix = f"{path}/" if path else ""
  if layout == "auto":
    layout = "in_out" if weight_name in _IN_OUT_NAMES else "out_in"
  return prefix + weight_name, prefix + bias_name, layout, leaves


def dense_layer(
  tree, path: str | Sequence[Any], layout: str = "auto"
) -> tuple[jax.Array, jax.Array]:
  """``(W, beta)`` of the dense layer at ``path``, ``W`` as ``(m, n)``.

  Args:
    tree: parameters, a gradient or an update (flax linen/nnx, equinox,
      dicts).
    path: the layer's path, e.g. ``"params/Dense_0"`` (linen), ``"linear"``
      (an nnx state), ``"layers/0"`` (equinox), or a sequence of keys.
    layout: ``"auto"`` (``kernel`` is ``(in, out)``, ``weight`` is
      ``(out, in)``), or force ``"in_out"`` / ``"out_in"``.

  Returns:
    The weight in the paper's layout (``m x n``) and the bias (``m``).

  Raises:
    ValueError: when no dense layer sits at ``path`` (the message lists the
      dense layers that exist) or the shapes do not match.
  """
  weight_path, bias_path, layout, leaves = _locate(tree, path, layout)
  weight, bias = (
    jnp.asarray(leaves[weight_path]),
    jnp.asarray(leaves[bias_path]),
  )
  if layout == "in_out":
    weight = weight.T
  if weight.ndim != 2 or bias.shape != (weight.shape[0],):
    raise ValueError(
      f"layer {path!r}: weight {weight.shape} (as m x n) and bias "
      f"{bias.shape} do not fit together; pass layout= explicitly."
    )
  return weight, bias


def replace_dense_layer(
  tree, path: str | Sequence[Any], weight_mxn, bias_m, layout: str = "auto"
):
  """A copy of ``tree`` whose layer at ``path`` holds ``(W, beta)``.

  The inverse of :func:`dense_layer`: the weight is stored back in the
  tree's own layout, every other leaf is kept as is.
  """
  weight_path, bias_path, layout, _ = _locate(tree, path, layout)
  stored = jnp.asarray(weight_mxn)
  if layout == "in_out":
    stored = stored.T
  new_values = {weight_path: stored, bias_path: jnp.asarray(bias_m)}

  def swap(key_path, leaf):
    value = new_values.get(_leaf_path(key_path))
    if value is None:
      return leaf
    if np.shape(leaf) != value.shape:
      raise ValueError(
        f"{_leaf_path(key_path)}: shape {value.shape} does not match the "
        f"stored {np.shape(leaf)}."
      )
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(swap, tree)
