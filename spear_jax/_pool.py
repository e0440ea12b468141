"""The candidate pool and the filter stage that feeds it.

Every strategy proposes raw directions; :func:`absorb` turns them into pool
entries: directions that re-find a known column count as hits, the rest are
polished (refit on their zero set), mixtures of several columns of ``Q``
are dropped or, for SPEAR++, split into their columns, and the distinct
sparse ones are merged into a new :class:`CandidatePool`. The pool is an
immutable value: every function here returns a new one.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._config import AttackConfig
from spear_jax._linalg import distinct_directions
from spear_jax._linalg import polish_direction
from spear_jax._linalg import split_span
from spear_jax._linalg import twin_span
from spear_jax._peel import peel_span
from spear_jax._problem import Problem
from spear_jax._problem import fits_next_layer

__all__ = ["CandidatePool", "absorb", "empty_pool", "merge_candidates"]

# Directions are polished and split in chunks of one fixed size, so one
# compilation serves a run.
_CHUNK = 32
# Anchor sets tried per twin span (:func:`split_span`), one fixed number.
_ANCHORS = 512
# Twin spans of up to this many dimensions are peeled (:func:`peel_span`).
_PEEL_MAX_DIM = 48


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
    for i in np.flatnonzero(is_known).tolist():
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
def _polish_many(directions_kxb, l_mxb, alive_m, screen_tol, zero_tol):
  return jax.vmap(polish_direction, in_axes=(0, None, None, None, None))(
    directions_kxb, l_mxb, alive_m, screen_tol, zero_tol
  )


@jax.jit
def twin_spans(directions_kxb, l_mxb, alive_m, screen_tol, kernel_tol):
  """:func:`twin_span` of each row, eight at a time (each forms a masked
  copy of ``L``: bounded memory)."""
  return jax.lax.map(
    lambda q_b: twin_span(q_b, l_mxb, alive_m, screen_tol, kernel_tol),
    directions_kxb,
    batch_size=8,
  )


_split_span = jax.jit(split_span)


def _count_known(
  pool: CandidatePool, raw_kxb: np.ndarray, screen_tol: float
) -> tuple[CandidatePool, np.ndarray]:
  """Counts raw directions that re-find a pool entry as its hits.

  Most passers re-find a known column; they are not polished again (the
  raw null vectors are accurate to ``O(eps cond)``).

  Returns:
    The pool with updated hit counts and the raw directions that are new.
  """
  if not (raw_kxb.shape[0] and pool.zeros.shape[0]):
    return pool, raw_kxb
  similarity = np.abs(raw_kxb @ pool.directions.T)
  known = np.max(similarity, axis=1) >= 1.0 - screen_tol
  hits = pool.hits.copy()
  np.add.at(hits, np.argmax(similarity[known], axis=1), 1)
  return pool._replace(hits=hits), raw_kxb[~known]


def _polish(
  problem: Problem, raw_kxb: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Polished directions, their zero counts and leverages (host arrays)."""
  count, b = raw_kxb.shape
  padded = np.zeros((-(-count // _CHUNK) * _CHUNK, b), problem.dtype)
  padded[:count] = raw_kxb
  screen, zero = (
    problem.scalar(problem.tol.screen),
    problem.scalar(problem.tol.zero),
  )
  outputs = [
    _polish_many(
      padded[i : i + _CHUNK], problem.l_mxb, problem.alive, screen, zero
    )
    for i in range(0, count, _CHUNK)
  ]
  polished, zeros, leverage = (
    np.concatenate([np.asarray(o[i]) for o in outputs])[:count]
    for i in range(3)
  )
  return polished, zeros, leverage


def _anchor_sets(rng, p_mxs, usable_m, dim, max_dim):
  """``_ANCHORS`` sets of ``dim - 2`` rows of ``P`` plus padding unit rows.

  For ``dim = 3`` the anchors are distinct rows (all of them when there are
  few enough); beyond, random ``(dim - 2)``-subsets of the usable rows.
  """
  rows = np.flatnonzero(usable_m)
  k = max_dim - 2
  anchors = np.zeros((_ANCHORS, k, max_dim), p_mxs.dtype)
  # Padding: the unit vectors of the coordinates beyond dim.
  for j in range(max_dim - dim):
    anchors[:, dim - 2 + j, dim + j] = 1.0
  if dim > 2 and rows.size >= dim - 2:
    if dim == 3:
      picks = rng.permutation(rows)[:_ANCHORS]
      picks = np.resize(picks, _ANCHORS)[:, None]
    else:
      picks = np.stack(
        [rng.choice(rows, dim - 2, replace=False) for _ in range(_ANCHORS)]
      )
    anchors[:, : dim - 2, :] = p_mxs[picks]
  return anchors


def _twin_spans_of(
  problem: Problem, mixtures_kxb: np.ndarray, known_kxb: np.ndarray
) -> list[np.ndarray]:
  """The twin spans (:func:`twin_span`, orthonormal ``b x dim`` bases, ``2 <=
  dim <= _PEEL_MAX_DIM``) of sparse mixtures.

  Mixtures in the span of the ``known`` directions are dropped (nothing
  new to split); mixtures with the same zero set share their span, so one
  per zero set is kept (the first, at most one chunk).
  """
  b = mixtures_kxb.shape[1]
  l_np, alive = np.asarray(problem.l_mxb), np.asarray(problem.alive)
  if known_kxb.shape[0]:
    # Mixtures of known columns only have nothing new to split.
    u_bxk, sv, _ = np.linalg.svd(known_kxb.T, full_matrices=False)
    u_bxk = u_bxk[:, sv > sv[0] * problem.tol.independence]
    outside = mixtures_kxb - (mixtures_kxb @ u_bxk) @ u_bxk.T
    new = np.linalg.norm(outside, axis=1) > problem.tol.independence
    mixtures_kxb = mixtures_kxb[new | (u_bxk.shape[1] == b)]
    if not mixtures_kxb.shape[0]:
      return []
  zero_kxm = (np.abs(mixtures_kxb @ l_np.T) <= problem.tol.screen) & alive
  _, first = np.unique(np.packbits(zero_kxm, axis=1), axis=0, return_index=True)
  distinct = mixtures_kxb[np.sort(first)][:_CHUNK]
  batch = np.repeat(distinct[:1], _CHUNK, axis=0)
  batch[: distinct.shape[0]] = distinct
  bases, dims = twin_spans(
    batch,
    problem.l_mxb,
    problem.alive,
    problem.scalar(problem.tol.screen),
    problem.scalar(problem.tol.zero),
  )
  bases, dims = np.asarray(bases), np.asarray(dims)[: distinct.shape[0]]
  return [
    bases[i][:, : dims[i]]
    for i in np.flatnonzero((dims >= 2) & (dims <= _PEEL_MAX_DIM))
  ]


def _inside(known_kxb: np.ndarray, basis_bxs: np.ndarray) -> np.ndarray:
  """Which known unit directions lie in the span of ``basis``."""
  return np.linalg.norm(known_kxb @ basis_bxs, axis=1) >= 1.0 - 1e-8


def _split(
  problem: Problem,
  spans: list[np.ndarray],
  known_kxb: np.ndarray,
  max_dim: int,
  seed: int,
) -> np.ndarray:
  """The columns inside the twin spans of sparse mixtures.

  Each twin span (:func:`_twin_spans_of`) that the known directions do not
  already fill is peeled (:func:`peel_span`, seeded with the known columns
  inside it); those of at most ``max_dim`` dimensions are also split by
  anchor rows (:func:`split_span`).
  """
  l_np, alive = np.asarray(problem.l_mxb), np.asarray(problem.alive)
  b = l_np.shape[1]
  rng = np.random.default_rng(seed)
  row_norm_m = np.linalg.norm(l_np, axis=1)
  parts = [np.zeros((0, b), l_np.dtype)]
  done: list[np.ndarray] = []
  for i, basis_bxs in enumerate(spans):
    dim = basis_bxs.shape[1]
    inside = _inside(known_kxb, basis_bxs)
    if inside.sum() >= dim or any(
      s_.shape == basis_bxs.shape
      and np.linalg.norm(s_.T @ basis_bxs) ** 2 >= dim - 1e-8
      for s_ in done
    ):
      continue  # every column of this span is known, or it was split
    done.append(basis_bxs)
    p_mxs = l_np @ basis_bxs
    outside = alive & (np.linalg.norm(p_mxs, axis=1) > problem.tol.zero)
    peeled = peel_span(
      p_mxs[outside],
      problem.tol.zero / 10,
      known_kxs=(known_kxb @ basis_bxs)[inside],
      seed=seed + i,
    )
    parts.append(peeled[inside.sum() :] @ basis_bxs.T)
    if dim <= max_dim:
      parts.append(
        _split_small(problem, basis_bxs, p_mxs, row_norm_m, rng, max_dim)
      )
  return np.concatenate(parts)


def _indivisible(p_rx2: np.ndarray, tol: float) -> bool:
  """Whether no direction of a plane vanishes on two of these rows.

  Such a direction exists exactly when two rows of ``P`` (the plane's
  coordinates of ``L``'s rows) are parallel: ``|p_i x p_j| <= tol`` for the
  unit direction orthogonal to the longer one. Parallel rows are adjacent
  in angle (mod ``pi``), so sorting the angles suffices.
  """
  if p_rx2.shape[0] < 2:
    return True
  norm = np.linalg.norm(p_rx2, axis=1)
  angle = np.arctan2(p_rx2[:, 1], p_rx2[:, 0]) % np.pi
  order = np.argsort(angle)
  gap = np.diff(np.append(angle[order], angle[order[0]] + np.pi))
  shorter = np.minimum(norm[order], np.roll(norm[order], -1))
  return bool(np.all(np.abs(np.sin(gap)) * shorter > tol))


def _indivisible_pairs(
  problem: Problem, spans: list[np.ndarray], known_kxb: np.ndarray
) -> np.ndarray:
  """Directions completing the twin planes no direction can split (rows).

  Two samples whose zero sets agree up to at most one row each span a plane
  ``V`` of ``Q`` in which every direction vanishes on their shared zeros
  and none on two more rows (no two rows of ``L V`` are parallel): the
  gradient cannot tell their columns apart (both are reported not
  identifiable, :func:`spear_jax.attack.identifiable_inputs`), and the
  search can never find them. Any basis of ``V`` completes a selection in
  which every other sample is exact; the pair's own inputs are then affine
  combinations ``a x_1 + (1 - a) x_2`` of the twins' (close estimates for
  near-duplicates). Planes holding a known direction get the orthogonal
  complement of it. Spans of three or more dimensions are left to peeling.
  """
  l_np, alive = np.asarray(problem.l_mxb), np.asarray(problem.alive)
  parts = [np.zeros((0, l_np.shape[1]), l_np.dtype)]
  for basis_bx2 in (s for s in spans if s.shape[1] == 2):
    inside = _inside(known_kxb, basis_bx2)
    known_here = known_kxb[inside] @ basis_bx2
    if known_here.shape[0] >= 2 or any(
      np.linalg.norm(part @ basis_bx2) >= 1.0 - 1e-8 for part in parts[1:]
    ):
      continue
    p_rx2 = l_np[alive] @ basis_bx2
    p_rx2 = p_rx2[np.linalg.norm(p_rx2, axis=1) > problem.tol.screen]
    if not _indivisible(p_rx2, problem.tol.screen):
      continue  # its columns have zeros of their own: the search finds them
    plane = np.eye(2) if not known_here.shape[0] else known_here[:1]
    if known_here.shape[0]:
      plane = np.array([[-plane[0, 1], plane[0, 0]]])
    parts.append(plane @ basis_bx2.T)
  return np.concatenate(parts)


def _split_small(problem, basis_bxs, p_mxs, row_norm_m, rng, max_dim):
  """:func:`split_span` of a span of at most ``max_dim`` dimensions."""
  b, dim = basis_bxs.shape
  padded_bxs = np.zeros((b, max_dim), basis_bxs.dtype)
  padded_bxs[:, :dim] = basis_bxs
  padded_mxs = np.zeros((p_mxs.shape[0], max_dim), p_mxs.dtype)
  padded_mxs[:, :dim] = p_mxs
  usable = np.asarray(problem.alive) & (
    np.linalg.norm(p_mxs, axis=1) >= 1e-4 * row_norm_m
  )
  directions, counts = _split_span(
    jnp.asarray(padded_bxs),
    problem.l_mxb,
    problem.alive,
    jnp.asarray(_anchor_sets(rng, padded_mxs, usable, dim, max_dim)),
    dim,
  )
  # Every anchor in a twin's own zero set finds that twin again.
  return distinct_directions(
    np.asarray(directions)[np.asarray(counts) >= 2], 1e-8
  )


def absorb(
  problem: Problem,
  pool: CandidatePool,
  raw_kxb: np.ndarray,
  config: AttackConfig,
  *,
  split: int = 0,
  mixture_test: bool = True,
) -> tuple[CandidatePool, int]:
  """The filter stage: polish new directions and merge the sparse ones.

  Mixtures of several columns of ``Q`` are recognisable by their leverage
  (see :func:`polish_direction`) and never enter the pool. With ``split``
  (SPEAR++) the sparsest of them are split into their columns
  (:func:`_split`: near-twin samples share most of their zero sets, so
  mixtures of them look almost as sparse as their columns), which are
  absorbed in turn.

  Args:
    problem: the problem.
    pool: the current pool.
    raw_kxb: raw unit directions, one per row.
    config: the attack's settings (pool capacity).
    split: the largest twin span (in dimensions) whose sparse mixtures
      are split; ``0`` (or below 2) splits none.
    mixture_test: whether to refuse directions with a pinning row. Off for
      directions read off the layer's ReLU pattern: a true column whose
      near-twin vanishes on all but one row of its zero set has exactly one
      such row (leverage one) and is, by its zero set alone,
      indistinguishable from a mixture of the two; the certificate judges
      it instead.

  Returns:
    ``(pool, num_new)``: the new pool and how many distinct directions it
    gained.
  """
  raw_kxb = np.asarray(raw_kxb, problem.dtype).reshape(-1, problem.b)
  pool, raw_kxb = _count_known(pool, raw_kxb, problem.tol.screen)
  if not raw_kxb.shape[0]:
    return pool, 0
  polished, zeros, leverage = _polish(problem, raw_kxb)
  sparse = zeros >= problem.floor
  keep = sparse & ((leverage < 1.0 - problem.tol.leverage) | (not mixture_test))
  if problem.next_weight is not None and np.any(keep):
    # A mixture the next layer rules out is no candidate (and may split).
    grad_z_mxk = np.asarray(problem.l_mxb) @ polished[keep].T
    keep[np.flatnonzero(keep)] = fits_next_layer(problem, grad_z_mxk)
  pool, num_new = merge_candidates(
    pool,
    polished[keep],
    zeros[keep],
    problem.tol.dedup,
    config.pool_capacity,
  )
  mixtures = np.flatnonzero(sparse & ~keep)
  if not mixtures.size:
    return pool, num_new
  sparsest = mixtures[np.argsort(-zeros[mixtures], kind="stable")]
  spans = _twin_spans_of(problem, polished[sparsest], pool.directions)
  pairs = _indivisible_pairs(problem, spans, pool.directions)
  if pairs.shape[0]:
    count = np.sum(
      (np.abs(pairs @ np.asarray(problem.l_mxb).T) <= problem.tol.zero)
      & np.asarray(problem.alive),
      axis=1,
    )
    pool, num_pairs = merge_candidates(
      pool, pairs, count, problem.tol.dedup, config.pool_capacity
    )
    num_new += num_pairs
  if split >= 2 and spans:
    parts = _split(problem, spans, pool.directions, split, pool.zeros.size)
    pool, num_split = absorb(problem, pool, parts, config)
    num_new += num_split
  return pool, num_new
