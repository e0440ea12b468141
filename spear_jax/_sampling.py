"""Uniform sampling of row subsets (the submatrices of SPEAR's sampler)."""

import functools

import jax
import jax.numpy as jnp

from spear_jax._types import Array
from spear_jax._types import Int
from spear_jax._types import PRNGKeyArray

__all__ = ["sample_rows"]


def sample_rows(
  key: PRNGKeyArray,
  alive_rows_m: Int[Array, " m"],
  num_alive: Int[Array, ""],
  k: int,
) -> Int[Array, " k"]:
  r"""A uniformly random ``k``-subset of the alive rows, without replacement.

  Robert Floyd's algorithm: for ``j = M - k, ..., M - 1`` draw
  ``t ~ U{0, ..., j}`` and take ``t``, or ``j`` if ``t`` was taken before.
  Every ``k``-subset of ``{0, ..., M - 1}`` is equally likely. It costs
  ``O(k^2)`` comparisons and ``k`` uniforms, independent of ``M``, and ``M``
  may be a traced value, so one compilation serves every gradient of the
  same shape.

  Args:
    key: PRNG key.
    alive_rows_m: indices of the alive rows, padded to length ``m`` (only the
      first ``num_alive`` entries are read).
    num_alive: ``M``, the number of alive rows; must be at least ``k``.
    k: subset size (``b - 1``).

  Returns:
    ``k`` distinct row indices into the full ``m`` rows.
  """
  u_k = jax.random.uniform(key, (k,), dtype=jnp.float32)
  positions: list[jax.Array] = []
  for i in range(k):
    j = num_alive - k + i
    scaled = u_k[i] * (j + 1).astype(jnp.float32)
    t = jnp.minimum(jnp.floor(scaled).astype(jnp.int32), j)
    taken = functools.reduce(
      jnp.logical_or, [t == p for p in positions], jnp.zeros((), bool)
    )
    positions.append(jnp.where(taken, j, t))
  return (
    alive_rows_m[jnp.stack(positions)]
    if positions
    else (jnp.zeros((0,), alive_rows_m.dtype))
  )
