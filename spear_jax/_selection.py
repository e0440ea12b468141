"""Candidate pool, deduplication, two-stage greedy selection, scale recovery.

After the sparsity filter, every correct direction is proposed many times
and a few wrong ones (mixtures of several columns of ``Q`` that happen to
be sparse) appear too. This module keeps the distinct candidates, picks
``b`` independent ones, and turns them into ``Q`` with the bias gradient.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._types import Array, Bool, Float, Int

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "CandidatePool",
  "empty_pool",
  "merge_candidates",
  "recover_batch",
  "select_independent",
]


class CandidatePool(NamedTuple):
  """Distinct filter-passing directions found so far (host-side arrays).

  Attributes:
    directions: unit directions, one per row.
    zeros: number of zeros of ``L q`` over alive rows, after polishing.
    hits: how many proposals landed on each direction.
  """

  directions: np.ndarray
  zeros: np.ndarray
  hits: np.ndarray


def empty_pool(b: int, dtype) -> CandidatePool:
  """A pool with no candidates for batch size ``b``."""
  return CandidatePool(
    directions=np.zeros((0, b), dtype),
    zeros=np.zeros((0,), np.int64),
    hits=np.zeros((0,), np.int64),
  )


def merge_candidates(
  pool: CandidatePool,
  directions: np.ndarray,
  zeros: np.ndarray,
  dedup_tol: float,
  capacity: int,
) -> tuple[CandidatePool, int]:
  r"""Adds new directions to the pool, merging duplicates.

  Two unit directions are the same if ``|<u, v>| >= 1 - dedup_tol`` (a
  direction and its negative are the same column of ``Q`` up to the scale
  that the bias gradient fixes). Of two copies the sparser one is kept: a
  nearby mixture must not shadow the exact column. When the pool exceeds
  ``capacity`` the least sparse candidates are dropped.

  Args:
    pool: the current pool.
    directions: new unit directions, one per row.
    zeros: their zero counts.
    dedup_tol: duplicate tolerance.
    capacity: maximum pool size.

  Returns:
    ``(pool, num_new)``: the updated pool and how many distinct new
    directions it gained.
  """
  dirs = np.asarray(directions)
  zeros = np.asarray(zeros, np.int64)
  hits = pool.hits.copy()
  if dirs.shape[0] == 0:
    return pool, 0
  pool_dirs, pool_zeros = pool.directions.copy(), pool.zeros.copy()
  if pool_dirs.shape[0]:
    sim = np.abs(dirs @ pool_dirs.T)
    is_known = (sim >= 1.0 - dedup_tol).any(axis=1)
    for i in np.flatnonzero(is_known):
      j = int(np.argmax(sim[i]))
      hits[j] += 1
      if zeros[i] > pool_zeros[j]:  # the sparser copy is the better fit
        pool_dirs[j], pool_zeros[j] = dirs[i], zeros[i]
    dirs, zeros = dirs[~is_known], zeros[~is_known]
  # Deduplicate the new directions among themselves: keep the first of each
  # group, count the rest as hits of it.
  # Sparsest first, so that the copy kept of each group is the sparsest.
  order = np.argsort(-zeros, kind="stable")
  dirs, zeros = dirs[order], zeros[order]
  keep = np.ones(dirs.shape[0], bool)
  new_hits = np.ones(dirs.shape[0], np.int64)
  if dirs.shape[0] > 1:
    sim = np.abs(dirs @ dirs.T) >= 1.0 - dedup_tol
    for i in range(dirs.shape[0]):
      if keep[i]:
        dup = sim[i] & keep
        dup[: i + 1] = False
        new_hits[i] += dup.sum()
        keep[dup] = False
  dirs, zeros, new_hits = dirs[keep], zeros[keep], new_hits[keep]
  merged = CandidatePool(
    directions=np.concatenate([pool_dirs, dirs]),
    zeros=np.concatenate([pool_zeros, zeros]),
    hits=np.concatenate([hits, new_hits]),
  )
  if merged.zeros.shape[0] > capacity:
    order = np.argsort(-merged.zeros, kind="stable")[:capacity]
    merged = CandidatePool(*(a[order] for a in merged))
  return merged, int(dirs.shape[0])


@jax.jit
def select_independent(
  directions_pxb: Float[Array, "P b"],
  eligible_p: Bool[Array, " P"],
  independence_tol: Float[Array, ""],
) -> tuple[Int[Array, " b"], Int[Array, ""]]:
  r"""Stage 1 of the greedy selection: sparsest independent directions.

  Walks the candidates in the given order (the caller sorts them by
  sparsity, descending) and keeps a candidate when its residual after
  projecting out the span of the kept ones has norm at least
  ``independence_tol`` (modified Gram-Schmidt, applied twice).

  Args:
    directions_pxb: unit candidate directions in priority order.
    eligible_p: which rows may be selected.
    independence_tol: minimum residual norm.

  Returns:
    ``(selected, count)``: indices of the kept candidates (the first
    ``count`` entries are valid, the rest are ``-1``) and their number.
  """
  p, b = directions_pxb.shape
  dtype = directions_pxb.dtype

  def body(i, carry):
    basis_bxb, selected_b, count = carry
    q = directions_pxb[i]
    for _ in range(2):
      coeffs = jnp.dot(basis_bxb, q, precision=_HI)
      q = q - jnp.dot(coeffs, basis_bxb, precision=_HI)
    norm = jnp.linalg.norm(q)
    take = eligible_p[i] & (norm >= independence_tol) & (count < b)
    row = jnp.where(take, q / jnp.where(norm > 0, norm, 1.0), 0.0)
    slot = jnp.minimum(count, b - 1)
    basis_bxb = jnp.where(take, basis_bxb.at[slot].set(row), basis_bxb)
    selected_b = jnp.where(take, selected_b.at[slot].set(i), selected_b)
    return basis_bxb, selected_b, count + take.astype(count.dtype)

  init = (
    jnp.zeros((b, b), dtype),
    jnp.full((b,), -1, jnp.int32),
    jnp.zeros((), jnp.int32),
  )
  _, selected, count = jax.lax.fori_loop(0, p, body, init)
  return selected, count


@jax.jit
def recover_batch(
  directions_bxb: Float[Array, "b b"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  bias_grad_m: Float[Array, " m"],
) -> tuple[Float[Array, "b n"], Float[Array, "m b"], Float[Array, "b b"]]:
  r"""Scale recovery from the bias gradient, then the batch.

  The columns of ``directions`` are ``Q`` up to scale: ``Q = Qbar diag(s)``.
  The bias gradient is ``D 1 = L Q 1 = L Qbar s``; since ``L`` has
  orthonormal columns, ``Qbar s = L^T bias_grad``. This fixes the magnitude
  and the sign of every column. Then ``X^T = Q^{-1} R`` and ``D = L Q``.

  Args:
    directions_bxb: unit directions as columns (``Qbar``).
    l_mxb: the left factor ``L``.
    r_bxn: the right factor ``R``.
    bias_grad_m: the bias gradient.

  Returns:
    ``(inputs, grad_z, q)``: ``X^T`` (one sample per row), ``D`` and ``Q``.
  """
  target_b = jnp.dot(l_mxb.T, bias_grad_m, precision=_HI)
  scales_b = jnp.linalg.solve(directions_bxb, target_b)
  q_bxb = directions_bxb * scales_b[None, :]
  inputs_bxn = jnp.linalg.solve(q_bxb, r_bxn)
  grad_z_mxb = jnp.dot(l_mxb, q_bxb, precision=_HI)
  return inputs_bxn, grad_z_mxb, q_bxb
