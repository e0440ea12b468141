"""SPEAR end to end: factorise, sample, filter, select, rescale, certify.

:func:`invert` is the entry point. The sampling loop runs in Python over
jitted blocks of proposals so that it can stop as soon as a selection is
certified, respect budgets, log progress and be interrupted.
"""

from collections.abc import Callable
import functools
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _validation
from spear_jax._certificate import relu_certificate
from spear_jax._config import AttackConfig
from spear_jax._dictionary import complete_last_column
from spear_jax._dictionary import estimate_found_rows
from spear_jax._dictionary import learn_directions
from spear_jax._dictionary import learn_directions_constrained
from spear_jax._dictionary import round_direction
from spear_jax._dictionary import round_with_pattern
from spear_jax._linalg import (
  factorize,
  polish_direction,
  resolve_tolerances,
  split_mixture,
)
from spear_jax._proposals import propose_block
from spear_jax._selection import (
  CandidatePool,
  empty_pool,
  merge_candidates,
  recover_batch,
  select_independent,
)
from spear_jax._types import (
  ArrayLike,
  InversionResult,
  InversionStats,
  PRNGKeyArray,
)

__all__ = ["default_max_proposals", "invert", "structure_floor"]

METHODS = ("spear", "spearpp", "spear++")
_POLISH_CHUNK = 32


def structure_floor(b: int, num_alive: int) -> int:
  """Fewest zeros a candidate must have to be more than a generic proposal.

  A generic (wrong) proposal has exactly the ``b - 1`` forced zeros of its
  sampled rows; the floor asks for ``max(3, 2%`` of the alive rows``)`` more.
  """
  return (b - 1) + max(3, math.ceil(0.02 * num_alive))


def default_max_proposals(b: int) -> int:
  r"""Automatic sampling budget: ``100 * 2^(b-1) * H_b``, at least ``10^6``.

  ``2^(b-1) H_b`` is the coupon-collector expectation of the number of
  proposals when every column of ``D`` is half zeros (SPEAR Lemma 5.2, as
  reconstructed in the notes); the factor 100 leaves room for columns with
  fewer zeros.
  """
  harmonic = sum(1.0 / k for k in range(1, b + 1))
  return int(max(1e6, 100 * 2.0 ** (b - 1) * harmonic))


@functools.lru_cache(maxsize=None)
def _screen_block_fn(devices, block_size, chunk_size, max_out):
  """Jitted block of proposals, compacted to (a random subset of) passers.

  Returns ``screen(keys, ...) -> (directions, valid)`` (one key per
  device) where the rows flagged ``valid`` are the filter-passing
  proposals. With several
  local devices (for example ``--xla_force_host_platform_device_count`` on a
  multi-core CPU host) the block is split evenly across them with
  ``shard_map``; each device samples and compacts its own share, so the
  devices never communicate (no collectives, which on CPU hosts could
  deadlock with several blocks in flight).
  """
  num_devices = len(devices)
  local_max_out = max_out // num_devices

  def local(keys, l_mxb, alive_rows_m, alive_m, num_alive, tol, floor):
    directions, zeros = propose_block(
      keys[0], l_mxb, alive_rows_m, alive_m, num_alive, tol,
      block_size=block_size // num_devices, chunk_size=chunk_size,
    )
    passed = zeros >= floor
    (index,) = jnp.nonzero(passed, size=local_max_out, fill_value=0)
    valid = jnp.arange(local_max_out) < jnp.sum(passed)
    return directions[index], valid

  if num_devices == 1:
    return jax.jit(local)

  mesh = jax.sharding.Mesh(np.array(devices), ("proposals",))
  spec = jax.sharding.PartitionSpec("proposals")
  rep = jax.sharding.PartitionSpec()
  return jax.jit(jax.shard_map(
    local, mesh=mesh, in_specs=(spec, rep, rep, rep, rep, rep, rep),
    out_specs=(spec, spec),
  ))


def _devices(config: AttackConfig):
  """Devices that share a block: all local ones, unless the config says."""
  devices = jax.local_devices()
  if config.num_devices is not None:
    if not 1 <= config.num_devices <= len(devices):
      raise ValueError(
        f"num_devices={config.num_devices} but {len(devices)} local devices."
      )
    devices = devices[: config.num_devices]
  # Each device needs a whole number of chunks.
  while config.block_size % (len(devices) * min(config.chunk_size,
                                                config.block_size)):
    devices = devices[:-1]
  return tuple(devices)


@jax.jit
def _polish_many(directions_kxb, l_mxb, alive_m, screen_tol, zero_tol):
  return jax.vmap(polish_direction, in_axes=(0, None, None, None, None))(
    directions_kxb, l_mxb, alive_m, screen_tol, zero_tol
  )


@jax.jit
def _split_many(directions_kxb, l_mxb, alive_m, screen_tol):
  return jax.vmap(split_mixture, in_axes=(0, None, None, None))(
    directions_kxb, l_mxb, alive_m, screen_tol
  )


def _threshold(config, pool, b, num_alive, floor, search=False):
  """Adaptive sparsity threshold of the selection (see ``AttackConfig``).

  With ``search`` (SPEAR++) the default fraction of the typical zero count
  is at most ``config.learner.tau_relative``: the search reaches columns
  with fewer zeros just as easily, so the sampling argument behind
  ``min_hit_ratio`` (0.93 at b = 100) must not make it stricter; at small
  ``b`` that argument gives the lower value (0.46 at b = 10) and is kept.
  """
  if config.tau is not None:
    return max(floor, math.ceil(config.tau * num_alive))
  if pool.zeros.shape[0] == 0:
    return floor
  top = np.sort(pool.zeros)[::-1][:b]
  relative = config.tau_relative
  if relative is None:
    relative = config.min_hit_ratio ** (1.0 / (b - 1))
    if search:
      relative = min(relative, config.learner.tau_relative)
  return max(floor, math.ceil(relative * float(np.median(top))))


def _selection(pool, threshold, tol, b, capacity):
  """Stage 1: sparsest first, keep the independent ones.

  The pool is padded to the power of two at or above ``max(2 b, size)``
  (at most ``capacity``); after the mixture test the pool rarely outgrows
  ``2 b``, so one compilation of :func:`select_independent` serves a run.
  """
  order = np.argsort(-pool.zeros, kind="stable")
  size = order.shape[0]
  padded = max(2 * b, size)
  padded = min(capacity, 1 << (padded - 1).bit_length())
  directions = np.zeros((padded, b), pool.directions.dtype)
  directions[:size] = pool.directions[order]
  eligible = np.zeros((padded,), bool)
  eligible[:size] = pool.zeros[order] >= threshold
  selected, count = select_independent(
    jnp.asarray(directions), jnp.asarray(eligible),
    jnp.asarray(tol.independence, pool.directions.dtype),
  )
  count = int(count)
  return order[np.asarray(selected)[:count]]


def _complete(directions_sxb: np.ndarray, b: int) -> np.ndarray:
  """Completes ``s < b`` independent directions to a basis (columns)."""
  s = directions_sxb.shape[0]
  if s == b:
    return directions_sxb.T
  rng = np.random.default_rng(0)
  filler = rng.standard_normal((b - s, b)).astype(directions_sxb.dtype)
  basis, _ = np.linalg.qr(np.concatenate([directions_sxb, filler]).T)
  return np.concatenate([directions_sxb.T, basis[:, s:]], axis=1)


class _Problem:
  """Arrays and tolerances shared by the steps of one inversion."""

  def __init__(self, l_mxb, r_bxn, bias_grad, weight, bias, tol, alive):
    self.l_mxb, self.r_bxn, self.bias_grad = l_mxb, r_bxn, bias_grad
    self.weight, self.bias, self.tol, self.alive = weight, bias, tol, alive
    self.dtype = l_mxb.dtype

  def scalar(self, value):
    return jnp.asarray(value, self.dtype)

  def reconstruct(self, directions_bxb):
    inputs, grad_z, q = recover_batch(
      jnp.asarray(directions_bxb), self.l_mxb, self.r_bxn, self.bias_grad
    )
    if self.weight is None:
      verified = jnp.zeros((q.shape[0],), bool)
    else:
      verified = relu_certificate(
        inputs, grad_z, self.weight, self.bias, self.scalar(self.tol.zero),
        self.scalar(self.tol.certificate),
      )
    return inputs, grad_z, q, verified


def _swap_stage(problem, pool, chosen, threshold, budget, tried):
  """Stage 2: swap in unselected candidates while more samples verify.

  A sparse mixture of two columns of ``Q`` can outrank a true column in
  stage 1 when their zero sets are nearly nested; it then spoils the
  samples it mixes. For each unverified sample we try replacing its
  direction by another eligible candidate (sparsest first) and keep a swap
  that increases the number of verified samples. Selections already
  evaluated (``tried``, shared across calls) are skipped, and at most
  ``budget`` new selections are evaluated per call.
  """
  b = chosen.shape[0]
  dirs = pool.directions
  best = problem.reconstruct(dirs[chosen].T)
  best_count = int(np.sum(np.asarray(best[3])))
  tried.add(frozenset(chosen.tolist()))
  in_selection = set(chosen.tolist())
  others = [
    int(c) for c in np.argsort(-pool.zeros, kind="stable")
    if pool.zeros[c] >= threshold and int(c) not in in_selection
  ]
  trials = 0
  improved = True
  while improved and best_count < b and trials < budget:
    improved = False
    failing = np.flatnonzero(~np.asarray(best[3]))
    for slot, c in ((s, c) for s in failing for c in others):
      trial = chosen.copy()
      trial[slot] = c
      signature = frozenset(trial.tolist())
      if signature in tried:
        continue
      tried.add(signature)
      basis = dirs[trial]
      if np.linalg.matrix_rank(basis, tol=problem.tol.independence) < b:
        continue
      trials += 1
      result = problem.reconstruct(basis.T)
      count = int(np.sum(np.asarray(result[3])))
      if count > best_count:
        others = [o for o in others if o != c] + [int(chosen[slot])]
        chosen, best, best_count, improved = trial, result, count, True
        break
      if trials >= budget:
        break
  return chosen, best


@functools.partial(jax.jit, static_argnames=("tries", "pool"))
def _round_many(keys, approx_kxb, l_mxb, alive_m, screen_tol, *, tries, pool):
  return jax.vmap(
    functools.partial(round_direction, tries=tries, pool=pool),
    in_axes=(0, 0, None, None, None),
  )(keys, approx_kxb, l_mxb, alive_m, screen_tol)


def _initial_directions(key, problem, found_pxb, count, targeted_fraction):
  """Random points of the sphere and rows of ``L`` (deflation).

  The targeted starts are rows ``L_j`` on which every column found so far
  vanishes: they lie in the span of the missing columns' rows, so the
  search is pushed towards columns not found yet.
  """
  l_np = np.asarray(problem.l_mxb)
  b = l_np.shape[1]
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  alive = np.asarray(problem.alive)
  targeted = int(round(targeted_fraction * count))
  candidates = alive.copy()
  if found_pxb.shape[0]:
    vanish = np.all(np.abs(l_np @ found_pxb.T) <= problem.tol.screen, axis=1)
    if np.any(vanish & alive):
      candidates = vanish & alive
  rows = rng.choice(np.flatnonzero(candidates), size=targeted, replace=True)
  starts = np.concatenate([l_np[rows],
                           rng.standard_normal((count - targeted, b))])
  return starts / np.linalg.norm(starts, axis=1, keepdims=True)


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
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  alive = np.asarray(problem.alive)
  zero_mxk = np.abs(l_np @ found_kxb.T) <= problem.tol.screen
  exclude = np.zeros((b, b), dtype)
  subspace = 0
  if problem.weight is not None:
    fraction = (1.0 if b - k <= learner.focus_missing
                else learner.subspace_fraction)
    subspace = int(round(fraction * count))
  if subspace:
    padded = np.zeros((b, b), dtype)
    padded[:k] = found_kxb
    rows = np.asarray(estimate_found_rows(
      jnp.asarray(padded), jnp.asarray(np.arange(b) < k), problem.l_mxb,
      problem.r_bxn, problem.weight, problem.bias, problem.alive,
      problem.scalar(problem.tol.screen), steps=learner.row_estimate_steps,
      temperature=learner.row_estimate_temperature,
      learning_rate=learner.row_estimate_learning_rate,
    ))[:k]
    u, s, _ = np.linalg.svd(rows.T, full_matrices=False)
    basis = u[:, s > s[0] * b * np.finfo(dtype).eps].T
    exclude[: basis.shape[0]] = basis
  starts = np.empty((count, b), dtype)
  pivots = np.zeros((count, b), dtype)
  vanish = np.all(zero_mxk, axis=1) & alive
  candidates = np.flatnonzero(vanish if vanish.any() else alive)
  starts[:subspace] = l_np[rng.choice(candidates, subspace)]
  for r, f in zip(range(subspace, count), rng.integers(0, k, count)):
    zero_rows = np.flatnonzero(zero_mxk[:, f] & alive)
    zero_rows = zero_rows if zero_rows.size else np.flatnonzero(alive)
    starts[r] = l_np[rng.choice(zero_rows)]
    pivots[r] = found_kxb[f]
  in_subspace = np.arange(count) < subspace
  return starts, pivots, in_subspace, exclude


def _pattern_round(problem, found_kxb, approx_kxb, rounded_kxb, zeros_k,
                   floor, learner):
  """Re-rounds, through the ReLU pattern, the end points rounding missed.

  An end point counts as missed when its plain rounding has fewer than
  ``floor`` zeros or moved it (|cos| < 0.999): typically an approximate
  column next to a near-twin's, whose shared zero set pulls the plain
  rounding onto a mixture. Duplicates (|cos| > 1 - 1e-6) are dropped and
  the rest padded to a power of two (few compilations).
  """
  b = problem.l_mxb.shape[1]
  k = found_kxb.shape[0]
  cos_k = np.abs(np.sum(approx_kxb * rounded_kxb, axis=1))
  missed = approx_kxb[(zeros_k < floor) | (cos_k < 0.999)]
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
  batch[len(kept):] = kept[0]
  padded = np.zeros((b, b), approx_kxb.dtype)
  padded[:k] = found_kxb
  directions, zeros = round_with_pattern(
    jnp.asarray(batch), jnp.asarray(padded), jnp.asarray(np.arange(b) < k),
    problem.l_mxb, problem.r_bxn, problem.weight, problem.bias,
    problem.alive, problem.scalar(problem.tol.screen),
    max_missing=learner.pattern_max_missing,
    temperature=learner.pattern_temperature,
    label_margin=learner.pattern_label_margin,
  )
  return (np.asarray(directions)[: len(kept)],
          np.asarray(zeros)[: len(kept)])


def _spearpp_rounds(key, problem, state, absorb, select, save, config, floor,
                    start, max_proposals):
  """SPEAR++ rounds: search from restarts, round, absorb, select.

  Round one starts from rows of ``L`` and random points; once columns are
  selected (and ``learner.constrained``), the restarts are deflated by
  :func:`_constrained_starts` and both end points of
  :func:`learn_directions_constrained` are rounded.
  """
  learner = config.learner
  b = problem.l_mxb.shape[1]
  restarts = learner.restarts or 2 * b
  pool = learner.rounding_pool or 2 * b
  proposals = rounds = stalled = 0
  for _ in range(learner.max_rounds):
    key, init_key, round_key = jax.random.split(key, 3)
    found = state["pool"].directions[state["chosen"]]
    if learner.constrained and found.shape[0]:
      starts, pivots, in_subspace, exclude = _constrained_starts(
        init_key, problem, found, restarts, learner)
      stage1, approx = learn_directions_constrained(
        jnp.asarray(starts), jnp.asarray(pivots), jnp.asarray(in_subspace),
        jnp.asarray(exclude), problem.l_mxb, problem.alive,
        problem.scalar(problem.tol.screen), config=learner,
      )
      # A stage-1 end point near a missing column may round exactly where
      # the full search from it drifts to a known one: round both.
      approx = jnp.concatenate([approx, stage1])
    else:
      starts = _initial_directions(init_key, problem,
                                   state["pool"].directions, restarts,
                                   learner.targeted_fraction)
      approx, _ = learn_directions(jnp.asarray(starts, problem.dtype),
                                   problem.l_mxb, problem.alive,
                                   config=learner)
    rounded, zeros = _round_many(
      jax.random.split(round_key, approx.shape[0]), approx, problem.l_mxb,
      problem.alive, problem.scalar(problem.tol.screen),
      tries=learner.rounding_tries, pool=pool,
    )
    proposals += approx.shape[0] * learner.rounding_tries
    rounds += 1
    rounded, zeros = np.asarray(rounded), np.asarray(zeros)
    found_before = state["pool"].zeros.shape[0]
    if absorb(rounded[zeros >= floor]):
      done = select()
      if done is not None:
        return done, proposals, rounds
    chosen = state["chosen"]
    missing = b - chosen.shape[0]
    if (problem.weight is not None and learner.pattern_rounding
        and 0 < missing <= learner.pattern_max_missing):
      snapped, snapped_zeros = _pattern_round(
        problem, state["pool"].directions[chosen], np.asarray(approx),
        rounded, zeros, floor, learner)
      if absorb(snapped[snapped_zeros >= floor]):
        done = select()
        if done is not None:
          return done, proposals, rounds
      chosen = state["chosen"]
    if problem.weight is not None and chosen.shape[0] == b - 1:
      # One column missing: read it off the ReLU pattern of the layer.
      found = state["pool"].directions[chosen].T
      direction, _ = complete_last_column(
        jnp.asarray(found), problem.l_mxb, problem.r_bxn, problem.weight,
        problem.bias, problem.alive,
      )
      if absorb(np.asarray(direction)[None, :]):
        done = select()
        if done is not None:
          return done, proposals, rounds
    stalled = 0 if state["pool"].zeros.shape[0] > found_before else stalled + 1
    if stalled >= learner.patience:
      return "stalled", proposals, rounds
    save(proposals)
    logging.info(
      "SPEAR++ b=%d: round %d, %d distinct directions, %d/%d selected",
      b, rounds, state["pool"].zeros.shape[0], state["chosen"].shape[0], b,
    )
    if proposals >= max_proposals or (
      config.time_budget_s is not None
      and time.perf_counter() - start >= config.time_budget_s
    ):
      return ("max_proposals" if proposals >= max_proposals
              else "time_budget"), proposals, rounds
  return "max_rounds", proposals, rounds


def invert(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  *,
  key: PRNGKeyArray,
  method: str = "spear",
  batch_size: int | None = None,
  weight: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  config: AttackConfig | None = None,
  initial_candidates: ArrayLike | None = None,
  checkpoint_fn: Callable[[np.ndarray, int], None] | None = None,
) -> InversionResult:
  r"""Recovers the private batch from one linear layer's gradients (SPEAR).

  For ``Z = W X + beta`` followed by ReLU, the shared gradients are
  ``weight_grad = D X^T`` and ``bias_grad = D 1`` with ``D = dL/dZ``.
  SPEAR factorises ``weight_grad = L R``, samples ``(b-1)``-row submatrices
  of ``L`` whose kernels propose columns of ``Q`` (``D = L Q``), keeps the
  proposals whose ``L q`` is sparse, selects ``b`` independent ones, fixes
  their scales with ``bias_grad`` and returns ``X^T = Q^{-1} R``. When the
  layer's ``weight`` and ``bias`` are given, every sample is certified by
  the ReLU pattern and sampling stops at the first certified selection.

  Inputs are validated here (not by type annotations) so that every bad
  input gets one clear ``ValueError``.

  Args:
    weight_grad: ``dL/dW``, shape ``(m, n)`` in the paper's layout (use
      :func:`spear_jax.paper_layout` for flax's ``(n, m)`` kernels).
    bias_grad: ``dL/dbeta``, shape ``(m,)``.
    key: PRNG key of the sampler.
    method: ``"spear"``.
    batch_size: ``b``; ``None`` estimates it as the numerical rank of
      ``weight_grad``.
    weight: the layer's weight ``W`` (``m x n``), for the certificate.
    bias: the layer's bias ``beta``, for the certificate.
    config: an :class:`AttackConfig`; ``None`` uses the defaults.
    initial_candidates: directions found by an earlier, interrupted run on
      the same gradient (its ``result.candidates``); they are re-polished,
      re-filtered and tried before any new sampling, so resuming loses no
      finished work.
    checkpoint_fn: called as ``checkpoint_fn(candidates, proposals)`` every
      ``config.log_every_s`` seconds and at the end, e.g. to save
      ``candidates`` for a later ``initial_candidates``.

  Returns:
    An :class:`InversionResult`. ``success`` is ``True`` when ``b``
    independent directions were found and (with ``weight`` and ``bias``)
    every sample is verified. Otherwise the best partial reconstruction is
    returned with honest ``verified`` flags.

  Raises:
    ValueError: on invalid input: wrong shapes or ndim, non-finite or
      all-zero gradients, a gradient without low-rank structure, or a
      ``batch_size`` that its rank contradicts.

  Examples:
    >>> import jax, numpy as np, spear_jax
    >>> rng = np.random.default_rng(0)
    >>> m, n, b = 40, 30, 3
    >>> x = rng.standard_normal((n, b)); w = rng.standard_normal((m, n))
    >>> d = (w @ x > 0) * rng.standard_normal((m, b))
    >>> res = spear_jax.invert(jax.numpy.asarray(d @ x.T),
    ...                        jax.numpy.asarray(d.sum(1)),
    ...                        key=jax.random.key(0))
    >>> bool(res.success), res.inputs.shape
    (True, (3, 30))

  References:
    Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
    Batches in Federated Learning. NeurIPS 2024.
    https://arxiv.org/abs/2403.03945
  """
  start = time.perf_counter()
  config = AttackConfig() if config is None else config
  if method not in METHODS:
    raise ValueError(
      f"Unknown method {method!r}; available: {', '.join(METHODS)}."
    )
  weight_grad, bias_grad, weight, bias = _validation.check_inputs(
    weight_grad, bias_grad, weight, bias, batch_size
  )
  m, n = weight_grad.shape
  dtype = weight_grad.dtype
  tol = resolve_tolerances(config, dtype, m, n)
  l_mxb, r_bxn, rank, _ = factorize(weight_grad, batch_size, tol.rank_rtol)
  b = _validation.check_rank(rank, batch_size, m, n)
  if batch_size is None:
    l_mxb, r_bxn = l_mxb[:, :b], r_bxn[:b]

  row_scale = np.max(np.abs(np.asarray(weight_grad)), axis=1)
  alive_np = row_scale > float(jnp.finfo(dtype).eps) * row_scale.max()
  num_alive = int(alive_np.sum())
  if num_alive < b:
    raise ValueError(
      f"only {num_alive} neurons have a nonzero gradient, fewer than the "
      f"batch size {b}."
    )
  alive = jnp.asarray(alive_np)
  alive_rows = jnp.asarray(
    np.concatenate([np.flatnonzero(alive_np), np.zeros(m - num_alive, int)])
    .astype(np.int32)
  )
  problem = _Problem(l_mxb, r_bxn, bias_grad, weight, bias, tol, alive)
  floor = structure_floor(b, num_alive)
  if config.tau is not None:
    floor = max(floor, math.ceil(config.tau * num_alive))
  max_proposals = (
    default_max_proposals(b) if config.max_proposals is None
    else config.max_proposals
  )
  block_size = config.block_size
  chunk_size = min(config.chunk_size, block_size)
  max_out = max(1, min(config.max_candidates_per_block, block_size))

  pool = empty_pool(b, np.dtype(dtype))
  proposals = blocks = 0
  chosen = np.zeros((0,), int)
  result = None
  stop_reason = "max_proposals"
  last_log = start
  threshold = floor
  tried = set()
  if b == 1:
    # One sample: Q is 1 x 1 and only its scale, fixed by bias_grad, is
    # unknown. There is nothing to sample.
    pool = CandidatePool(np.ones((1, 1), np.dtype(dtype)),
                         np.zeros((1,), np.int64), np.ones((1,), np.int64))
    chosen = np.zeros((1,), int)
    result = problem.reconstruct(pool.directions.T)
    verified_all = bool(np.all(np.asarray(result[3])))
    stop_reason = "recovered" if weight is None else (
      "certified" if verified_all else "not_certified")
  devices = _devices(config)
  screen_block = _screen_block_fn(devices, block_size, chunk_size, max_out)

  num_devices = len(devices)

  def dispatch(key):
    """Starts a block asynchronously; returns (next key, block outputs)."""
    key, block_key = jax.random.split(key)
    keys = jax.random.split(block_key, num_devices)
    return key, screen_block(
      keys, l_mxb, alive_rows, alive, jnp.asarray(num_alive),
      problem.scalar(tol.screen), jnp.asarray(floor),
    )

  state = {"pool": pool, "chosen": chosen, "result": result,
           "threshold": threshold, "signature": None}

  split = method != "spear" and config.learner.split_mixtures

  def absorb(raw, split=split):
    """Polishes new passers, drops (or splits) mixtures; returns #new."""
    pool = state["pool"]
    if raw.shape[0] and pool.zeros.shape[0]:
      # Most passers re-find a known column: count those as hits without
      # polishing them (the raw null vectors are accurate to O(eps cond)).
      similarity = np.abs(raw @ pool.directions.T)
      known = np.max(similarity, axis=1) >= 1.0 - tol.screen
      np.add.at(pool.hits, np.argmax(similarity[known], axis=1), 1)
      raw = raw[~known]
    num_valid = raw.shape[0]
    if not num_valid:
      return 0
    # Polish in chunks of one fixed size (one compilation, no recompiles).
    padded = np.zeros((-(-num_valid // _POLISH_CHUNK) * _POLISH_CHUNK, b),
                      np.dtype(dtype))
    padded[:num_valid] = raw
    outputs = [
      _polish_many(
        padded[start:start + _POLISH_CHUNK], l_mxb, alive,
        problem.scalar(tol.screen), problem.scalar(tol.zero),
      )
      for start in range(0, num_valid, _POLISH_CHUNK)
    ]
    polished, zeros, leverage = (
      np.concatenate([np.asarray(o[i]) for o in outputs])[:num_valid]
      for i in range(3)
    )
    # Mixtures of several columns of Q are recognisable (see
    # polish_direction) and never enter the pool.
    keep = (zeros >= floor) & (leverage < 1.0 - tol.leverage)
    state["pool"], num_new = merge_candidates(
      pool, polished[keep], zeros[keep], tol.dedup, config.pool_capacity
    )
    mixtures = np.flatnonzero((zeros >= floor) & ~keep)
    if split and mixtures.size:
      # SPEAR++: a sparse two-column mixture (near-twin samples) is split
      # into its columns (split_mixture); the sparsest chunk of them.
      mixtures = mixtures[np.argsort(-zeros[mixtures])][:_POLISH_CHUNK]
      batch = np.repeat(polished[mixtures[:1]], _POLISH_CHUNK, axis=0)
      batch[: mixtures.size] = polished[mixtures]
      parts, counts = _split_many(batch, l_mxb, alive,
                                  problem.scalar(tol.screen))
      parts = np.asarray(parts)[: mixtures.size].reshape(-1, b)
      counts = np.asarray(counts)[: mixtures.size].reshape(-1)
      num_new += absorb(parts[counts >= 2], split=False)
    return num_new

  def select():
    """Two-stage greedy + certificate; returns a stop reason or None."""
    pool = state["pool"]
    state["threshold"] = _threshold(config, pool, b, num_alive, floor,
                                    search=method != "spear")
    chosen = _selection(pool, state["threshold"], tol, b,
                        config.pool_capacity)
    state["chosen"] = chosen
    signature = pool.directions[np.sort(chosen)].tobytes()
    if chosen.shape[0] < b or signature == state["signature"]:
      return None
    state["signature"] = signature
    result = problem.reconstruct(pool.directions[chosen].T)
    state["result"] = result
    if weight is None:
      return "recovered"
    if not np.all(np.asarray(result[3])):
      state["chosen"], state["result"] = _swap_stage(
        problem, pool, chosen, state["threshold"], budget=2 * b, tried=tried
      )
    if np.all(np.asarray(state["result"][3])):
      return "certified"
    return None

  def save(proposals_so_far):
    if checkpoint_fn is not None:
      checkpoint_fn(state["pool"].directions.copy(), proposals_so_far)

  pending = None
  try:
    done = None
    if b > 1 and initial_candidates is not None:
      earlier = np.asarray(initial_candidates, np.dtype(dtype)).reshape(-1, b)
      if absorb(earlier):
        done = select()
    if done is not None:
      stop_reason = done
    if method in ("spearpp", "spear++") and b > 1 and done is None:
      done, proposals, blocks = _spearpp_rounds(
        key, problem, state, absorb, select, save, config, floor, start,
        max_proposals,
      )
      stop_reason = done
    while method == "spear" and b > 1 and done is None:
      # Keep one block in flight while the host merges the previous one.
      if pending is None:
        key, pending = dispatch(key)
      dirs, valid = pending
      key, pending = dispatch(key)
      proposals += block_size
      blocks += 1
      if absorb(np.asarray(dirs)[np.asarray(valid)]):
        done = select()
        if done is not None:
          stop_reason = done
          break
      now = time.perf_counter()
      if now - last_log >= config.log_every_s:
        last_log = now
        save(proposals)
        logging.info(
          "SPEAR b=%d: %d proposals (%.0f/s), %d candidates, %d/%d "
          "directions, threshold %d/%d zeros",
          b, proposals, proposals / (now - start),
          state["pool"].zeros.shape[0], state["chosen"].shape[0], b,
          state["threshold"], num_alive,
        )
      if proposals >= max_proposals:
        stop_reason = "max_proposals"
        break
      if (
        config.time_budget_s is not None
        and now - start >= config.time_budget_s
      ):
        stop_reason = "time_budget"
        break
  except KeyboardInterrupt:
    stop_reason = "interrupted"
    logging.warning("SPEAR interrupted; returning the best partial result.")
  pool, chosen, result = state["pool"], state["chosen"], state["result"]
  threshold = state["threshold"]
  save(proposals)

  if result is None or chosen.shape[0] < b:
    basis = _complete(pool.directions[chosen], b)
    result = problem.reconstruct(basis)
  inputs, grad_z, q, verified = result
  recovered = chosen.shape[0] == b
  success = bool(recovered and (weight is None or np.all(np.asarray(verified))))
  column_norm = jnp.linalg.norm(grad_z, axis=0)
  sparsity = jnp.sum(
    (jnp.abs(grad_z) <= tol.zero * column_norm[None, :]) & alive[:, None],
    axis=0,
  )
  stats = InversionStats(
    proposals=proposals,
    candidates=int(pool.zeros.shape[0]),
    blocks=blocks,
    seconds=time.perf_counter() - start,
    rank=b,
    alive_rows=num_alive,
    threshold=int(threshold),
    tau=threshold / num_alive,
    stop_reason=stop_reason,
  )
  return InversionResult(
    inputs=inputs,
    grad_z=grad_z,
    verified=verified,
    success=success,
    directions=q,
    sparsity=sparsity,
    candidates=pool.directions,
    stats=stats,
  )
