"""SPEAR++'s strategy: l1 dictionary learning from restarts, then rounding.

One round of :func:`spearpp_learner` is three named stages, each one step
of the :class:`~spear_jax._strategy.Strategy` (the driver absorbs and
selects between them):

1. ``search``: restarts of the sphere-constrained l1 search
   (:func:`learn_directions`; deflated by :func:`learn_directions_constrained`
   once columns are selected), each end point rounded to an exact column
   (:func:`round_direction`).
2. ``pattern``: with the layer's weights and at most
   ``learner.pattern_max_missing`` columns missing, the end points the plain
   rounding missed are rounded through the ReLU pattern of the missing
   samples (:func:`round_with_pattern`).
3. ``complete``: with one column missing, it is read off the ReLU pattern
   (:func:`complete_last_column`).

Sparse mixtures of near-twin columns are split by the filter
(``Strategy.split_mixtures``, :func:`spear_jax.attack.peel_span`). A round that adds no distinct direction
counts towards ``learner.patience``; the strategy stops as ``"stalled"``
after that many, or as ``"max_rounds"``.
"""

import dataclasses
import functools
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._config import AttackConfig
from spear_jax._config import LearnerConfig
from spear_jax._dictionary import PATTERN_FRACTIONS
from spear_jax._dictionary import complete_from_bias
from spear_jax._dictionary import complete_last_column
from spear_jax._dictionary import estimate_found_rows
from spear_jax._dictionary import learn_directions
from spear_jax._dictionary import learn_directions_constrained
from spear_jax._dictionary import nested_twin_columns
from spear_jax._dictionary import pattern_problem
from spear_jax._dictionary import relu_guided_direction
from spear_jax._dictionary import round_direction
from spear_jax._dictionary import round_with_pattern_rows
from spear_jax._dictionary import sample_last_column
from spear_jax._distributed import attack_devices
from spear_jax._distributed import lapack_safe
from spear_jax._distributed import map_rows
from spear_jax._linalg import BLOCKED_QR_FROM
from spear_jax._pool import CandidatePool
from spear_jax._pool import twin_spans
from spear_jax._problem import Problem
from spear_jax._problem import hidden_span_rows
from spear_jax._selection import Selection
from spear_jax._selection import complete_basis
from spear_jax._selection import greedy_selection
from spear_jax._strategy import StepOutput
from spear_jax._strategy import Strategy
from spear_jax._types import PRNGKeyArray

__all__ = ["LearnerRoundState", "fill_missing_columns", "spearpp_learner"]

_SEARCH, _PATTERN, _COMPLETE = range(3)


def _round_rows(rows, shared, *, tries, pool):
  keys, approx_kxb = rows
  return jax.vmap(
    functools.partial(round_direction, tries=tries, pool=pool),
    in_axes=(0, 0, None, None, None),
  )(keys, approx_kxb, *shared)


def _guided_rows(rows, shared, *, tries, pool):
  keys, guesses_kxb = rows
  return jax.vmap(
    functools.partial(relu_guided_direction, tries=tries, pool=pool),
    in_axes=(0, 0) + (None,) * 6,
  )(keys, guesses_kxb, *shared)


def _learn_rows(rows, shared, *, config):
  (initial_kxb,) = rows
  return learn_directions(initial_kxb, *shared, config=config)


def _learn_constrained_rows(rows, shared, *, config):
  return learn_directions_constrained(*rows, *shared, config=config)


# Per device, a batched stage holds at most about this much at a time: its
# rows run in chunks (lax.map) sized by an estimate of their working set.
_CHUNK_BYTES = 1 << 28


def _chunk(bytes_per_row: int) -> int:
  """Rows per chunk under :data:`_CHUNK_BYTES` (a power of two)."""
  rows = max(1, _CHUNK_BYTES // max(bytes_per_row, 1))
  return 1 << (rows.bit_length() - 1)


def _rounding_chunk(problem, learner):
  """Rows per chunk of a rounding: each try gathers ``b - 1`` rows of ``L``
  and eliminates them; it also screens."""
  b = problem.b
  return _chunk(
    learner.rounding_tries * (4 * b * b + 2 * problem.l_mxb.shape[0]) * 8
  )


@functools.cache
def _row_fn(fn, **static):
  """One ``functools.partial`` per setting, so compilations are reused."""
  return functools.partial(fn, **static)


def _found_and_layer(problem, found_kxb, layer):
  """The found columns padded to ``b`` (one compilation per run), their
  validity mask, and the layer data of the pattern-based kernels (with
  ``layer``'s weight and bias)."""
  b, k = problem.b, found_kxb.shape[0]
  padded = np.zeros((b, b), problem.dtype)
  padded[:k] = found_kxb
  return (
    jnp.asarray(padded),
    jnp.asarray(np.arange(b) < k),
    problem.l_mxb,
    problem.r_bxn,
    *layer,
    problem.alive,
    problem.scalar(problem.tol.screen),
  )


def _pattern_layer(problem, found_kxb, learner):
  """The weight and bias whose ReLU pattern the pattern stages read.

  The server's, unless the drift check applies: then the midpoint of the
  server's and the client's last weights, ``W - s G / 2`` and ``beta - s
  g / 2`` (``G = L R`` and ``g`` the received update). Measured on FedAvg
  updates (E = 3, B = 8, lr = 0.05, m = 400): among the rows deepest on
  the inactive side, the midpoint's pattern has a tenth of the server's
  wrong rows. The update's sign ``s`` (``+1``: server minus client, as a
  gradient; ``-1``: the reverse) is not given: it is the one whose
  midpoint agrees better with the signs of the first (at most 8) found
  columns, their samples estimated at the server's weights.
  """
  server = (problem.weight, problem.bias)
  k = min(found_kxb.shape[0], 8)
  if problem.check != "drift" or not (k and learner.drift_midpoint):
    return server
  l_mxb, r_bxn = np.asarray(problem.l_mxb), np.asarray(problem.r_bxn)
  x_kxn = _estimated_rows(problem, found_kxb[:k], learner, server) @ r_bxn
  active_kxm = np.abs(found_kxb[:k] @ l_mxb.T) > problem.tol.screen
  alive = np.asarray(problem.alive)
  z_kxm = x_kxn @ np.asarray(problem.weight).T + np.asarray(problem.bias)
  half_kxm = 0.5 * ((x_kxn @ r_bxn.T) @ l_mxb.T + np.asarray(problem.bias_grad))
  agree = [
    np.mean(((z_kxm - s * half_kxm) > 0)[:, alive] == active_kxm[:, alive])
    for s in (1.0, -1.0)
  ]
  s = 1.0 if agree[0] >= agree[1] else -1.0
  return (
    problem.weight - (0.5 * s) * jnp.dot(problem.l_mxb, problem.r_bxn),
    problem.bias - (0.5 * s) * problem.bias_grad,
  )


def _estimated_rows(problem, found_kxb, learner, layer=None):
  """The found samples' rows of ``Q^{-1}`` (:func:`estimate_found_rows`
  with ``learner``'s settings), one per found column; ``layer``: the
  weight and bias (default :func:`_pattern_layer`).

  With the hidden span (:attr:`Problem.hidden_span`) the rows of columns
  that fit it are exact (:func:`hidden_span_rows`); only the others are
  estimated from their ReLU cells.
  """
  fits = np.zeros(found_kxb.shape[0], bool)
  if problem.hidden_span is not None:
    fitted = hidden_span_rows(problem, found_kxb)
    exact, fits = fitted.rows, fitted.exact(problem.tol)
    if fits.all():
      return exact
  if layer is None:
    layer = _pattern_layer(problem, found_kxb, learner)
  rows = np.array(  # a writable copy
    estimate_found_rows(
      *_found_and_layer(problem, found_kxb, layer),
      steps=learner.row_estimate_steps,
      temperature=learner.row_estimate_temperature,
      learning_rate=learner.row_estimate_learning_rate,
      robust_temperature=(
        learner.pattern_temperature if problem.check == "drift" else None
      ),
    )
  )[: found_kxb.shape[0]]
  if fits.any():
    rows[fits] = exact[fits]
  return rows


def fill_missing_columns(
  problem: Problem, found_kxb: np.ndarray, learner: LearnerConfig
) -> np.ndarray:
  """A basis of ``Q`` (columns) from ``k`` found columns: the found ones
  themselves when ``k = b``, else filled for a partial result.

  ``X^T = Q^{-1} R`` puts every filler column into every sample's row of
  ``Q^{-1}``, so the fill decides how wrong the found samples come out.
  With the layer's weights, the missing columns are taken orthogonal to
  the found samples' rows of ``Q^{-1}`` as their ReLU patterns estimate
  them (:func:`estimate_found_rows`: the true missing columns are exactly
  orthogonal to the true rows), which is as close to the true rows as the
  estimate; without them, or if that basis is singular, the orthogonal
  complement of the found columns (:func:`complete_basis`). Not exact
  either way: nothing of an incomplete selection is verified.
  """
  b, k = problem.b, found_kxb.shape[0]
  fallback = complete_basis(found_kxb, b)
  if not (problem.certifiable and 0 < k < b):
    return fallback
  rows = _estimated_rows(problem, found_kxb, learner)
  if not np.all(np.isfinite(rows)):
    return fallback
  complement = np.linalg.svd(rows)[2][k:]
  basis = np.concatenate([found_kxb, complement]).T
  smallest = np.linalg.svd(basis, compute_uv=False)[-1]
  return basis if smallest > problem.tol.independence else fallback


def _found_columns(problem, pool, selection):
  """The selected columns the search may build on.

  A full selection that does not certify holds directions that are not
  columns of ``Q`` (sparse mixtures of twins whose columns the pool lacks
  outrank nothing then, and the span is full): deflating by all of them
  leaves the search no room, and no column counts as missing. Only the
  columns of certified samples are kept then; the others count as missing
  (for the deflated search, the pattern rounding and the completion).
  """
  found = pool.directions[selection.chosen]
  result = selection.result
  if found.shape[0] < problem.b or result is None or not problem.certifiable:
    return found
  q = np.asarray(result.q)
  cosine = np.abs(found @ (q / np.linalg.norm(q, axis=0)))
  match = np.argmax(cosine, axis=1)
  trusted = np.asarray(result.verified)[match] & (
    cosine[np.arange(found.shape[0]), match] > 1.0 - 1e-9
  )
  return found if trusted.all() else found[trusted]


def _host_rng(key):
  """A numpy generator seeded by a JAX key (host-side start selection)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def _rows_where_all_vanish(zero_mxk, alive_m):
  """Alive rows on which every given column vanishes (else all alive rows)."""
  vanish = np.all(zero_mxk, axis=1) & alive_m
  return np.flatnonzero(vanish if vanish.any() else alive_m)


def _initial_directions(key, problem, found_pxb, count, targeted_fraction):
  """Random points of the sphere and rows of ``L`` (deflation).

  The targeted starts are rows ``L_j`` on which every column found so far
  vanishes: they lie in the span of the missing columns' rows, so the
  search is pushed towards columns not found yet.
  """
  l_np = np.asarray(problem.l_mxb)
  b = l_np.shape[1]
  rng = _host_rng(key)
  targeted = round(targeted_fraction * count)
  candidates = _rows_where_all_vanish(
    np.abs(l_np @ found_pxb.T) <= problem.tol.screen, np.asarray(problem.alive)
  )
  rows = rng.choice(candidates, size=targeted, replace=True)
  starts = np.concatenate(
    [l_np[rows], rng.standard_normal((count - targeted, b))]
  )
  return starts / np.linalg.norm(starts, axis=1, keepdims=True)


def _pivot_bases(found_kxb, zero_mxk, learner):
  """Per found column, ``(1 + pivot_twins)`` orthonormal rows: the column
  itself, then its found near-twins (zero-set Jaccard index above
  ``learner.twin_jaccard``, most similar first) orthogonalised against
  it and each other; zero rows pad. See ``LearnerConfig.pivot_twins``."""
  k, b = found_kxb.shape
  bases = np.zeros((k, 1 + learner.pivot_twins, b), found_kxb.dtype)
  bases[:, 0] = found_kxb
  if not learner.pivot_twins or k < 2:
    return bases
  zeros = zero_mxk.astype(np.float64)
  shared = zeros.T @ zeros
  count = np.diag(shared)
  jaccard = shared / np.maximum(count[:, None] + count[None] - shared, 1.0)
  np.fill_diagonal(jaccard, 0.0)
  for f in range(k):
    order = np.argsort(-jaccard[f], kind="stable")[: learner.pivot_twins]
    twins = order[jaccard[f, order] > learner.twin_jaccard]
    if not twins.size:
      continue
    rest = found_kxb[twins] - np.outer(
      found_kxb[twins] @ found_kxb[f], found_kxb[f]
    )
    u, s, _ = np.linalg.svd(rest.T, full_matrices=False)
    u = u[:, s > s[0] * 1e-8] if s[0] > 0 else u[:, :0]
    bases[f, 1 : 1 + u.shape[1]] = u.T
  return bases


def _constrained_starts(key, problem, found_kxb, count, learner):
  """Starts, pivots, subspace flags and the excluded block of a round.

  ``found_kxb`` are the selected (independent) columns. With the layer's
  ``weight`` and ``bias``, a ``subspace_fraction`` of the restarts (all of
  them once at most ``focus_missing`` columns are missing) search the
  orthogonal complement of the found samples' estimated rows of ``Q^-1``;
  they start from rows of ``L`` on which every found column vanishes
  (combinations of the missing samples' rows only). The others are
  restricted to the zero set of one random found column (the pivot) and
  start from a row of ``L`` in that zero set. The excluded block is padded
  to ``b`` rows and the found columns to ``b``, so one compilation serves
  a run.
  """
  l_np = np.asarray(problem.l_mxb)
  b = l_np.shape[1]
  k = found_kxb.shape[0]
  dtype = l_np.dtype
  rng = _host_rng(key)
  alive = np.asarray(problem.alive)
  zero_mxk = np.abs(l_np @ found_kxb.T) <= problem.tol.screen
  exclude = np.zeros((b, b), dtype)
  subspace = 0
  if problem.certifiable:
    fraction = (
      1.0 if b - k <= learner.focus_missing else learner.subspace_fraction
    )
    subspace = round(fraction * count)
  if subspace:
    rows = _estimated_rows(problem, found_kxb, learner)
    u, s, _ = np.linalg.svd(rows.T, full_matrices=False)
    basis = u[:, s > s[0] * b * np.finfo(dtype).eps].T
    exclude[: basis.shape[0]] = basis
  starts = np.empty((count, b), dtype)
  bases = _pivot_bases(found_kxb, zero_mxk & alive[:, None], learner)
  pivots = np.zeros((count, *bases.shape[1:]), dtype)
  candidates = _rows_where_all_vanish(zero_mxk, alive)
  starts[:subspace] = l_np[rng.choice(candidates, subspace)]
  fraction = learner.pivot_twin_fraction
  twins = np.full((count,), fraction >= 1.0)
  if 0.0 < fraction < 1.0:
    twins = rng.random(count) < fraction
  for r, f in zip(range(subspace, count), rng.integers(0, k, count)):
    zero_rows = np.flatnonzero(zero_mxk[:, f] & alive)
    zero_rows = zero_rows if zero_rows.size else np.flatnonzero(alive)
    starts[r] = l_np[rng.choice(zero_rows)]
    rows = bases.shape[1] if twins[r] else 1  # pivot (and its twins)
    pivots[r, :rows] = bases[f, :rows]
  in_subspace = np.arange(count) < subspace
  return starts, pivots, in_subspace, exclude


def _pattern_round(
  key, problem, found_kxb, approx_kxb, rounded_kxb, zeros_k, learner, devices
):
  """Re-rounds, through the ReLU pattern, the end points rounding missed.

  An end point counts as missed when its plain rounding has fewer than
  ``problem.floor`` zeros or moved it (|cos| < 0.999): typically an approximate
  column next to a near-twin's, whose shared zero set pulls the plain
  rounding onto a mixture. Duplicates (|cos| > 1 - 1e-6) are dropped and
  the rest padded to a power of two (few compilations).
  """
  b = problem.b
  cos_k = np.abs(np.sum(approx_kxb * rounded_kxb, axis=1))
  missed = approx_kxb[(zeros_k < problem.floor) | (cos_k < 0.999)]
  kept = []
  for v in missed:
    if not kept or np.max(np.abs(np.asarray(kept) @ v)) < 1.0 - 1e-6:
      kept.append(v)
    if len(kept) == 2 * b:
      break
  if not kept:
    return np.zeros((0, b), approx_kxb.dtype), np.zeros((0,), np.int64)
  size = max(8, 1 << (len(kept) - 1).bit_length())
  batch = np.zeros((size, b), approx_kxb.dtype)
  batch[: len(kept)] = kept
  batch[len(kept) :] = kept[0]
  shared = pattern_problem(
    *_found_and_layer(
      problem, found_kxb, _pattern_layer(problem, found_kxb, learner)
    ),
    max_missing=learner.pattern_max_missing,
    temperature=learner.pattern_temperature,
    label_margin=learner.pattern_label_margin,
  )
  # Each row forms a masked copy of L per fraction for its Gram matrix.
  bytes_per_row = 2 * len(PATTERN_FRACTIONS) * problem.l_mxb.size * 8
  # Sampled kernels (8 per pass) only under drift: with an exact pattern
  # the deepest rows are zeros, and at b = 210 they would cost more than
  # the rest of the rounding.
  tries = learner.pattern_tries if problem.check == "drift" else 0
  directions, zeros = map_rows(
    _row_fn(round_with_pattern_rows, tries=tries),
    lapack_safe(devices),  # eigh
    (jnp.asarray(batch), jax.random.split(key, size)),
    (shared,),
    chunk=_chunk(bytes_per_row),
  )
  return directions[: len(kept)], zeros[: len(kept)]


class LearnerRoundState(NamedTuple):
  """SPEAR++ state between stages.

  Attributes:
    key: the PRNG key of the next round.
    stage: the next stage (search, pattern or complete).
    rounds: rounds started so far.
    stalled: consecutive finished rounds that added no distinct direction.
    flipped: whether the search has stalled once and now runs with the
      other pivot restarts (``1 - pivot_twin_fraction``).
    pool_size: pool size when the current round started.
    approx: the current round's search end points (for pattern rounding).
    rounded: their plain roundings.
    zeros: the roundings' zero counts.
  """

  key: PRNGKeyArray
  stage: int
  rounds: int
  stalled: int
  pool_size: int
  approx: np.ndarray | None = None
  rounded: np.ndarray | None = None
  zeros: np.ndarray | None = None
  flipped: bool = False


def _second_wind(problem, learner):
  """The search's settings after its first stall.

  The other kind of pivot restart finds other columns. Under the drift
  check the restarts in the complement of the found samples' estimated
  rows stop too: after many local steps those rows come from ReLU cells
  at weights no sample saw, and every restart then misses the last
  columns (a b = 32, m = 1000 update after 8 steps at lr = 0.1 stalled at
  30 of 32 with them; pivot restarts alone found all 32).
  """
  learner = dataclasses.replace(
    learner, pivot_twin_fraction=1.0 - learner.pivot_twin_fraction
  )
  if problem.check == "drift":
    learner = dataclasses.replace(
      learner, subspace_fraction=0.0, focus_missing=0
    )
  return learner


def _guided_proposals(key, problem, found_kxb, learner, devices):
  """Columns proposed through the layer's ReLU from random input guesses.

  ``learner.guided_proposals`` (``None``: ``b``) guesses ``y ~ N(0, I)``
  for :func:`relu_guided_direction`, each scaled so that the median
  ``|A_j y|`` is ``2^u`` (``u`` uniform in ``[-2, 8]``) times the median
  ``|beta_j|``: the pattern depends on how the input's part compares with
  the bias's, which the gradient does not tell (natural images under
  PyTorch's init: 16 to 21; on a faces batch at b = 150, guesses at the
  bias's level gave no column, guesses at the true inputs' scale hit a
  sample 67 times in 400). With columns found, the guesses lie in their
  orthogonal complement ``C``: the missing samples' rows of ``Q^{-1}``
  (their inputs ``x = R^T y``) span exactly ``C`` (``Q^{-1} Q = I``), so a
  guess is an input made of missing samples only; kernels inside the
  found columns' span do not count. Nothing without the layer's weight.
  Returns ``(directions, zeros)``.
  """
  b = problem.b
  count = b if learner.guided_proposals is None else learner.guided_proposals
  if not count or not problem.certifiable:
    return np.zeros((0, b), problem.dtype), np.zeros((0,), np.int64)
  alive = np.asarray(problem.alive)
  bias = np.zeros(alive.shape, problem.dtype)
  if problem.bias is not None:
    bias = np.asarray(problem.bias)
  a_mxb = np.asarray(problem.weight) @ np.asarray(problem.r_bxn).T
  away = np.eye(b, dtype=problem.dtype)
  if found_kxb.shape[0]:
    u, s, _ = np.linalg.svd(found_kxb.T)
    rank = int(np.sum(s > b * np.finfo(problem.dtype).eps * s[0]))
    away[:, :rank] = 0.0
    away[:, rank:] = u[:, rank:]
  rng = _host_rng(key)
  guesses = rng.standard_normal((count, b)) @ away.T
  typical = np.median(np.abs(a_mxb[alive] @ guesses.T), axis=0)
  level = np.median(np.abs(bias[alive]))
  scale = level / np.maximum(typical, np.finfo(problem.dtype).tiny)
  scale = np.where(level > 0, scale, 1.0) * 2.0 ** rng.uniform(-2, 8, count)
  return map_rows(
    _row_fn(
      _guided_rows,
      tries=learner.rounding_tries,
      pool=learner.rounding_pool or 2 * b,
    ),
    lapack_safe(devices) if b >= BLOCKED_QR_FROM else devices,
    (
      jax.random.split(key, count),
      jnp.asarray(guesses * scale[:, None], problem.dtype),
    ),
    (
      jnp.asarray(a_mxb, problem.dtype),
      jnp.asarray(bias),
      problem.l_mxb,
      problem.alive,
      problem.scalar(problem.tol.screen),
      jnp.asarray(away),
    ),
    chunk=_rounding_chunk(problem, learner),
  )


def _search_stage(state, problem, pool, selection, learner, devices):
  """Stage 1: restarts of the l1 search, each end point rounded."""
  b = problem.b
  key, init_key, round_key = jax.random.split(state.key, 3)
  restarts = learner.restarts or 2 * b
  if state.flipped:
    learner = _second_wind(problem, learner)
  found = _found_columns(problem, pool, selection)
  if learner.constrained and found.shape[0]:
    starts, pivots, in_subspace, exclude = _constrained_starts(
      init_key, problem, found, restarts, learner
    )
    stage1, approx = map_rows(
      _row_fn(_learn_constrained_rows, config=learner),
      devices,
      (
        jnp.asarray(starts, problem.dtype),
        jnp.asarray(pivots, problem.dtype),
        jnp.asarray(in_subspace),
      ),
      (
        jnp.asarray(exclude, problem.dtype),
        problem.l_mxb,
        problem.alive,
        problem.scalar(problem.tol.screen),
      ),
    )
    # A stage-1 end point near a missing column may round exactly where
    # the full search from it drifts to a known one: round both.
    approx = np.concatenate([approx, stage1])
  else:
    starts = _initial_directions(
      init_key, problem, pool.directions, restarts, learner.targeted_fraction
    )
    approx, _ = map_rows(
      _row_fn(_learn_rows, config=learner),
      devices,
      (jnp.asarray(starts, problem.dtype),),
      (problem.l_mxb, problem.alive),
    )
  rounded, zeros = map_rows(
    _row_fn(
      _round_rows,
      tries=learner.rounding_tries,
      pool=learner.rounding_pool or 2 * b,
    ),
    # From b = 33 on, the null vectors are LAPACK QRs.
    lapack_safe(devices) if b >= BLOCKED_QR_FROM else devices,
    (jax.random.split(round_key, approx.shape[0]), jnp.asarray(approx)),
    (problem.l_mxb, problem.alive, problem.scalar(problem.tol.screen)),
    chunk=_rounding_chunk(problem, learner),
  )
  guided, guided_zeros = _guided_proposals(
    jax.random.fold_in(state.key, 7), problem, found, learner, devices
  )
  state = state._replace(
    key=key,
    stage=_PATTERN,
    rounds=state.rounds + 1,
    pool_size=pool.zeros.shape[0],
    approx=np.asarray(approx),
    rounded=rounded,
    zeros=zeros,
  )
  return StepOutput(
    np.concatenate(
      [rounded[zeros >= problem.floor], guided[guided_zeros >= problem.floor]]
    ),
    state,
    proposals=(approx.shape[0] + guided.shape[0]) * learner.rounding_tries,
    blocks=1,
    stage="search",
  )


def _pattern_stage(state, problem, pool, selection, learner, devices):
  """Stage 2: pattern rounding of the end points plain rounding missed."""
  found = _found_columns(problem, pool, selection)
  missing = problem.b - found.shape[0]
  directions = np.zeros((0, problem.b), problem.dtype)
  if (
    problem.certifiable
    and learner.pattern_rounding
    and 0 < missing <= learner.pattern_max_missing
  ):
    snapped, zeros = _pattern_round(
      jax.random.fold_in(state.key, 2),
      problem,
      found,
      state.approx,
      state.rounded,
      state.zeros,
      learner,
      devices,
    )
    directions = snapped[zeros >= problem.floor]
  return StepOutput(
    directions, state._replace(stage=_COMPLETE), stage="pattern"
  )


def _missing_span(problem, found_kxb, rounded_kxb, zeros_k):
  """A twin group's span among the missing columns, when a zero set shows it.

  Among this round's sparse roundings (the sparsest 64), a zero set that,
  without its pinning rows, annihilates ``s >= 2`` dimensions independent of
  the found columns (:func:`twin_span`) spans ``s`` missing columns. Only
  ``s = d`` and ``s = d - 1`` (``d = b - k`` missing) are used, ``s = d``
  first. ``None`` if there is none.
  """
  b, k = problem.b, found_kxb.shape[0]
  order = np.argsort(-zeros_k, kind="stable")
  order = order[zeros_k[order] >= problem.floor][:64]
  if not order.size:
    return None
  batch = np.repeat(rounded_kxb[order[:1]], 64, axis=0)
  batch[: order.size] = rounded_kxb[order]
  bases, dims = twin_spans(
    jnp.asarray(batch),
    problem.l_mxb,
    problem.alive,
    problem.scalar(problem.tol.screen),
    problem.scalar(problem.tol.zero),
  )
  bases, dims = np.asarray(bases), np.asarray(dims)[: order.size]
  for s in (b - k, b - k - 1):
    for i in np.flatnonzero(dims == s) if s >= 2 else ():
      span_bxs = bases[i][:, :s]
      smallest = np.linalg.svd(
        np.concatenate([found_kxb.T, span_bxs], axis=1), compute_uv=False
      )[-1]
      if smallest > problem.tol.independence:
        return span_bxs
  return None


def _complete_twins(problem, found_kxb, span_bxs):
  """Pinned proposals from the span of ``s`` missing near-twin columns.

  With ``s = d - 1`` (one other column missing): that column, by
  :func:`complete_last_column` on the found columns plus the span (the
  missing sample's row of ``Q^{-1}`` is orthogonal to both). With
  ``s = d``: the span's basis itself (then ``Q^{-1}``'s rows of the found
  samples are exact whatever the twins do) and, for each basis vector left
  out, :func:`complete_last_column` on the found columns plus the others:
  when a twin's zero set sits inside another's (``s = 2``) that reads off
  the column of the twin with the larger zero set, and the other twin's
  input is then exact too (:func:`spear_jax.attack.identifiable_inputs`).
  The certificate and that test judge what is selected.
  """
  b, s = problem.b, span_bxs.shape[1]
  if found_kxb.shape[0] + s < b:
    direction, _ = complete_last_column(
      jnp.asarray(np.concatenate([found_kxb.T, span_bxs], axis=1)),
      problem.l_mxb,
      problem.r_bxn,
      problem.weight,
      problem.bias,
      problem.alive,
      problem.bias_grad,
    )
    return np.asarray(direction, problem.dtype)[None]
  proposals = [span_bxs.T]
  if s == 2:
    proposals.append(
      nested_twin_columns(
        found_kxb.T,
        span_bxs,
        np.asarray(problem.l_mxb),
        np.asarray(problem.r_bxn),
        np.asarray(problem.bias_grad),
        np.asarray(problem.weight),
        np.asarray(problem.bias),
        np.asarray(problem.alive),
        problem.tol.screen,
      )[:8]
    )
  return np.concatenate(proposals).astype(problem.dtype)


def _trajectory_layers(problem, found_kxb, learner):
  """The weights along the local trajectory at which the last sample may
  have been seen: the server's, the midpoint (:func:`_pattern_layer`) and
  the client's last, ``W - s G``.

  One sample's zero set is exact at the weights of the steps that saw it,
  which vary by sample: on a b = 32, m = 400 update after 8 steps at
  lr = 0.1 the midpoint's pattern was off on 107 of 400 rows per sample
  (median) and the last column was found only at another point.
  """
  server = (problem.weight, problem.bias)
  middle = _pattern_layer(problem, found_kxb, learner)
  if middle[0] is server[0]:
    return [server]
  end = tuple(2.0 * m - s for m, s in zip(middle, server))
  return [server, middle, end]


def _complete_stage(state, problem, pool, selection, learner, devices):
  """Stage 3: one column missing, read it off the bias gradient (always)
  and off the layer's ReLU pattern (with the weights: strict check, or
  sampled from its deepest rows under drift, :func:`sample_last_column`);
  a few missing near-twins, through the span their shared zero set annihilates
  (:func:`_missing_span`, with the weights)."""
  del devices
  directions = pinned = np.zeros((0, problem.b), problem.dtype)
  found = _found_columns(problem, pool, selection)
  missing = problem.b - found.shape[0]
  if problem.check == "drift" and missing > 1:
    # Drift spreads the zero counts: a true column under the threshold
    # (0.8 of the median) leaves two missing where the pool lacks one.
    wide = greedy_selection(problem, pool, problem.floor, 1 << 30)
    if wide.shape[0] == problem.b - 1:
      found, missing = pool.directions[wide], 1
  strict = problem.certifiable and problem.check == "relu"
  if strict and 2 <= missing <= learner.pattern_max_missing:
    span = _missing_span(problem, found, state.rounded, state.zeros)
    if span is not None:
      pinned = _complete_twins(problem, found, span)
  if missing == 1:
    found_bxk = found.T
    directions = complete_from_bias(
      found_bxk,
      np.asarray(problem.l_mxb),
      np.asarray(problem.bias_grad),
      np.asarray(problem.alive),
    )[None].astype(problem.dtype)
    if problem.check == "drift":  # only set with the weights
      sampled = [
        sample_last_column(
          jax.random.fold_in(state.key, 3 + i),
          jnp.asarray(found_bxk),
          problem.l_mxb,
          problem.r_bxn,
          *layer,
          problem.alive,
          problem.scalar(problem.tol.screen),
        )[0]
        for i, layer in enumerate(_trajectory_layers(problem, found, learner))
      ]
      directions = np.concatenate(
        [directions, np.asarray(sampled, problem.dtype)]
      )
    if strict:
      direction, _ = complete_last_column(
        jnp.asarray(found_bxk),
        problem.l_mxb,
        problem.r_bxn,
        problem.weight,
        problem.bias,
        problem.alive,
        problem.bias_grad,
      )
      pinned = np.asarray(direction, problem.dtype)[None]
  return StepOutput(
    directions, state._replace(stage=_SEARCH), pinned=pinned, stage="complete"
  )


_STAGES = (_search_stage, _pattern_stage, _complete_stage)


def _round_stop(
  state: LearnerRoundState, pool: CandidatePool, learner: LearnerConfig
) -> tuple[LearnerRoundState, str | None]:
  """Before a new round: patience and the round limit."""
  if not state.rounds:
    return state, None
  grew = pool.zeros.shape[0] > state.pool_size
  state = state._replace(stalled=0 if grew else state.stalled + 1)
  if (
    state.stalled >= learner.patience
    and not state.flipped
    and learner.pivot_twins
  ):
    # A second wind: the other kind of pivot restart finds other columns.
    logging.info("SPEAR++ stalled; flipping the pivot restarts' twins")
    state = state._replace(stalled=0, flipped=True)
  if state.stalled >= learner.patience:
    return state, "stalled"
  if state.rounds >= learner.max_rounds:
    return state, "max_rounds"
  return state, None


def spearpp_learner(config: AttackConfig | None = None) -> Strategy:
  """SPEAR++'s strategy (see the module docstring for its stages).

  Args:
    config: the attack's settings; ``config.learner`` configures the search.

  Returns:
    A :class:`Strategy` whose state is a :class:`LearnerRoundState`.
  """
  config = AttackConfig() if config is None else config
  learner = config.learner
  devices = attack_devices(
    config.num_devices, across_processes=config.across_processes
  )

  def init(key: PRNGKeyArray, problem: Problem) -> LearnerRoundState:
    del problem
    return LearnerRoundState(key, _SEARCH, 0, 0, 0)

  def step(
    state: LearnerRoundState,
    problem: Problem,
    pool: CandidatePool,
    selection: Selection,
  ) -> StepOutput:
    if state.stage == _SEARCH:
      state, stop = _round_stop(state, pool, learner)
      if stop is not None:
        return StepOutput(
          np.zeros((0, problem.b), problem.dtype), state, stop_reason=stop
        )
    return _STAGES[state.stage](
      state, problem, pool, selection, learner, devices
    )

  return Strategy(
    "SPEAR++",
    init,
    step,
    split_mixtures=learner.split_max_dim if learner.split_mixtures else 0,
    search=True,
  )
