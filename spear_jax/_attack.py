"""The attack's driver: prepare, one search loop, finalize.

:func:`invert` builds the immutable :class:`~spear_jax._problem.Problem`,
then runs one loop for every strategy (SPEAR's sampler, SPEAR++'s learner,
or a user's): the strategy's step proposes raw directions, :func:`absorb`
returns the new candidate pool, :func:`select` the new selection, and the
budgets, progress log, checkpoints and Ctrl-C are handled here, once. The
loop's state is an immutable :class:`SearchState`; no stage mutates
another's data.
"""

from collections.abc import Callable
import functools
import time
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _noisy
from spear_jax._config import AttackConfig
from spear_jax._distributed import agree
from spear_jax._distributed import attack_devices
from spear_jax._endgame import with_endgame
from spear_jax._endgame import with_sampling_fallback
from spear_jax._hidden import Peel
from spear_jax._hidden import hidden_partial_result
from spear_jax._hidden import hidden_refit
from spear_jax._hidden import lift_directions
from spear_jax._hidden import peel_found
from spear_jax._pool import CandidatePool
from spear_jax._pool import absorb
from spear_jax._pool import empty_pool
from spear_jax._problem import Problem
from spear_jax._problem import prepare_problem
from spear_jax._proposals import spear_sampler
from spear_jax._selection import Selection
from spear_jax._selection import balance_twin_pairs
from spear_jax._selection import coupled_flags
from spear_jax._selection import empty_selection
from spear_jax._selection import identified_samples
from spear_jax._selection import reconstruct
from spear_jax._selection import select
from spear_jax._selection import zero_mask
from spear_jax._spearpp import fill_missing_columns
from spear_jax._spearpp import spearpp_learner
from spear_jax._strategy import Strategy
from spear_jax._timing import PhaseClock
from spear_jax._types import ArrayLike
from spear_jax._types import InversionResult
from spear_jax._types import InversionStats
from spear_jax._types import PRNGKeyArray
from spear_jax._validation import FullRankError

__all__ = [
  "METHODS",
  "SearchState",
  "default_max_proposals",
  "invert",
  "make_strategy",
]

METHODS = ("spear", "spearpp", "spear++")

CheckpointFn = Callable[[np.ndarray, int], None]


def default_max_proposals(b: int) -> int:
  r"""Automatic sampling budget: ``100 * 2^(b-1) * H_b``, at least ``10^6``.

  ``2^(b-1) H_b`` is the coupon-collector expectation of the number of
  proposals when every column of ``D`` is half zeros (SPEAR Lemma 5.2, as
  reconstructed in the notes); the factor 100 leaves room for columns with
  fewer zeros.
  """
  harmonic = sum(1.0 / k for k in range(1, b + 1))
  return int(max(1e6, 100 * 2.0 ** (b - 1) * harmonic))


def make_strategy(method: str | Strategy, config: AttackConfig) -> Strategy:
  """The strategy of a method name (a :class:`Strategy` is returned as is)."""
  if isinstance(method, Strategy):
    return method
  if method not in METHODS:
    raise ValueError(
      f"Unknown method {method!r}; available: {', '.join(METHODS)}."
    )
  learner, patience = spearpp_learner(config), config.endgame_patience
  if patience is None:
    return spear_sampler(config) if method == "spear" else learner
  if method == "spear":
    return with_endgame(spear_sampler(config), learner, patience)
  if config.stall_sampling_max is None:
    return learner
  return with_sampling_fallback(
    learner, spear_sampler(config), patience, config.stall_sampling_max
  )


class SearchState(NamedTuple):
  """The driver's loop state (each iteration returns a new one).

  Attributes:
    pool: the distinct candidate directions found so far.
    selection: the current selection and its reconstruction.
    proposals: proposals drawn so far.
    blocks: blocks (SPEAR) or rounds (SPEAR++) completed.
    stop_reason: why the search stopped, or ``None`` while it runs.
    peel: found samples taken out of the gradient (stop reason
      ``"peel"``), whose rest :func:`_peeled_search` searches.
  """

  pool: CandidatePool
  selection: Selection
  proposals: int = 0
  blocks: int = 0
  stop_reason: str | None = None
  peel: Peel | None = None


def _update(problem, strategy, config, state, clock, directions, pinned=None):
  """Absorbs raw directions and, when the pool grew, selects again."""
  with clock("absorb"):
    pool, num_new = absorb(
      problem, state.pool, directions, config, split=strategy.split_mixtures
    )
    if pinned is not None and pinned.shape[0]:
      pool, num_pinned = absorb(
        problem, pool, pinned, config, mixture_test=False
      )
      num_new += num_pinned
  state = state._replace(pool=pool)
  if not num_new:
    return state
  with clock("select"):
    selection, stop = select(
      problem, pool, state.selection, config, search=strategy.search
    )
  return state._replace(selection=selection, stop_reason=stop)


def _budget_stop(config, state, max_proposals, elapsed):
  if state.proposals >= max_proposals:
    return "max_proposals"
  if config.time_budget_s is not None and elapsed >= config.time_budget_s:
    return "time_budget"
  return None


def _log(problem, strategy, state, elapsed):
  logging.info(
    "%s b=%d: %d proposals (%.0f/s), %d blocks, %d candidates, %d/%d "
    "directions, threshold %d/%d zeros",
    strategy.name,
    problem.b,
    state.proposals,
    state.proposals / max(elapsed, 1e-9),
    state.blocks,
    state.pool.zeros.shape[0],
    state.selection.chosen.shape[0],
    problem.b,
    state.selection.threshold,
    problem.num_alive,
  )


def _search(
  key, problem, strategy, config, initial, checkpoint_fn, start, clock
):
  """The one loop: strategy step, absorb, select, budget, log, checkpoint."""
  state = SearchState(
    empty_pool(problem.b, problem.dtype), empty_selection(problem)
  )
  max_proposals = config.max_proposals or default_max_proposals(problem.b)
  devices = attack_devices(
    config.num_devices, across_processes=config.across_processes
  )
  last_log = start
  quiet = chosen = 0
  tried = -1  # the selection size at a peel that took nothing out
  try:
    if initial is not None:
      state = _update(problem, strategy, config, state, clock, initial)
    search_state = strategy.init(key, problem)
    while state.stop_reason is None:
      with clock() as label:
        out = strategy.step(search_state, problem, state.pool, state.selection)
        label[0] = out.stage
      search_state = out.state
      state = state._replace(
        proposals=state.proposals + out.proposals,
        blocks=state.blocks + out.blocks,
      )
      state = _update(
        problem, strategy, config, state, clock, out.directions, out.pinned
      )
      now = time.perf_counter()
      # Several processes stop on process 0's clock, at the same step.
      elapsed = agree(now - start, devices)
      stop = (
        state.stop_reason
        or out.stop_reason
        or _budget_stop(config, state, max_proposals, elapsed)
      )
      quiet = quiet + 1 if state.selection.chosen.shape[0] <= chosen else 0
      chosen = state.selection.chosen.shape[0]
      if stop is None and chosen != tried and _peel_due(problem, config, quiet):
        with clock("peel"):
          peel = peel_found(
            problem, state.pool.directions[state.selection.chosen], config
          )
        tried = -1 if peel else chosen  # retried once the selection changes
        stop, state = (
          ("peel", state._replace(peel=peel)) if peel else (None, state)
        )
      state = state._replace(stop_reason=stop)
      if now - last_log >= config.log_every_s:
        last_log = now
        _log(problem, strategy, state, now - start)
        if checkpoint_fn is not None:
          checkpoint_fn(state.pool.directions.copy(), state.proposals)
  except KeyboardInterrupt:
    state = state._replace(stop_reason="interrupted")
    logging.warning("SPEAR interrupted; returning the best partial result.")
  return state


def _search_and_peel(
  key, problem, strategy, config, initial, checkpoint_fn, start, clock
):
  """:func:`_search`, then the rest of each peel (:func:`_peeled_search`)."""
  state = _search(
    key, problem, strategy, config, initial, checkpoint_fn, start, clock
  )
  return _peeled_search(
    key, problem, strategy, config, state, checkpoint_fn, start, clock
  )


def _peel_due(problem, config, quiet):
  return (
    problem.hidden_span is not None
    and config.peel_patience is not None
    and quiet >= config.peel_patience
  )


def _peeled_search(
  key, problem, strategy, config, state, checkpoint_fn, start, clock
):
  """Searches what each peel left and merges the finds back, innermost
  first: the taken-out columns and the rest's pool, lifted, are absorbed
  and selected in the outer problem as one pool (its certificate and
  flags decide, as for any search)."""
  chain = []
  while state.peel is not None:
    chain.append((problem, state))
    problem, outer = state.peel.problem, problem
    checkpoint_fn = checkpoint_fn and _lifted_checkpoint(
      checkpoint_fn, outer, state.peel
    )
    state = (
      _single_sample(problem)
      if problem.b == 1
      else _search(
        jax.random.fold_in(key, problem.b),
        problem,
        strategy,
        config,
        None,
        checkpoint_fn,
        start,
        clock,
      )
    )
  for outer, peeled in reversed(chain):
    directions = np.concatenate(
      [
        peeled.peel.columns,
        lift_directions(outer, problem, state.pool.directions),
      ]
    )
    merged = SearchState(
      empty_pool(outer.b, outer.dtype),
      empty_selection(outer),
      proposals=peeled.proposals + state.proposals,
      blocks=peeled.blocks + state.blocks,
    )
    merged = _update(outer, strategy, config, merged, clock, directions)
    inner = state.stop_reason
    if inner in ("certified", "recovered", "not_identifiable"):
      inner = "not_certified"  # the rest's success, not the whole batch's
    problem, state = (
      outer,
      merged._replace(stop_reason=merged.stop_reason or inner),
    )
  return state


def _lifted_checkpoint(checkpoint_fn, outer, peel):
  """A peeled search's checkpoints in the outer problem's coordinates."""

  def save(candidates, proposals):
    lifted = lift_directions(outer, peel.problem, candidates)
    checkpoint_fn(np.concatenate([peel.columns, lifted]), proposals)

  return save


def _single_sample(problem: Problem) -> SearchState:
  """``b = 1``: ``Q`` is ``1 x 1`` and only its scale (the bias) is unknown."""
  pool = CandidatePool(
    np.ones((1, 1), problem.dtype),
    np.zeros((1,), np.int64),
    np.ones((1,), np.int64),
  )
  result = reconstruct(problem, pool.directions.T)
  selection = empty_selection(problem)._replace(
    chosen=np.zeros((1,), int), result=result
  )
  if not problem.certifiable:
    stop = "recovered"
  else:
    stop = (
      "certified" if np.all(np.asarray(result.verified)) else "not_certified"
    )
  return SearchState(pool, selection, stop_reason=stop)


def _finalize(
  problem: Problem, state: SearchState, start: float, config: AttackConfig
) -> InversionResult:
  """The best (possibly partial) reconstruction and honest flags."""
  pool, selection = state.pool, state.selection
  if selection.chosen.shape[0] < problem.b and selection.fallback:
    chosen, fallback = selection.fallback  # a full set under the threshold
    selection = selection._replace(chosen=chosen, result=fallback)
  result = selection.result
  recovered = selection.chosen.shape[0] == problem.b
  if result is None or not recovered:
    # A full selection is its own basis; a partial one is filled.
    basis = fill_missing_columns(
      problem, pool.directions[selection.chosen], config.learner
    )
    result = reconstruct(problem, basis)
  if not recovered:
    # The missing columns are only estimated, and X^T = Q^-1 R then
    # corrupts every x_i (a filler column enters every row of Q^-1); at a
    # small width such an x_i can still pass the ReLU certificate by chance
    # (found by the property test), so nothing of an incomplete selection
    # is verified, except samples the hidden span fixes on their own.
    result = hidden_partial_result(
      problem, result, pool.directions[selection.chosen]
    )
    identifiable = np.ones((problem.b,), bool)
    verified = np.asarray(result.verified)
  else:
    identifiable = identified_samples(problem, result)
    if not identifiable.all():
      result = balance_twin_pairs(problem, result, identifiable)
    verified = coupled_flags(
      problem, result, np.asarray(result.verified) & identifiable, identifiable
    )
    # Inputs the span fixes are their own (no other column enters them).
    result, refitted, certified = hidden_refit(problem, result)
    verified = np.where(refitted, certified, verified)
    identifiable = identifiable | certified
  result = result._replace(verified=jnp.asarray(verified))
  stop_reason = str(state.stop_reason)
  if recovered and not verified.all() and np.all(verified | ~identifiable):
    # Everything the gradient determines is certified; the rest cannot be.
    stop_reason = "not_identifiable"
  success = bool(recovered and (not problem.certifiable or verified.all()))
  if success and stop_reason == "not_identifiable":
    stop_reason = "certified"  # the hidden span fixed what zero sets did not
  # On the host: eager jnp ops here would compile eight tiny programs.
  zero = zero_mask(problem, np.asarray(result.grad_z))
  sparsity = jnp.asarray(np.sum(zero, axis=0).astype(np.int32))
  stats = InversionStats(
    proposals=state.proposals,
    candidates=int(pool.zeros.shape[0]),
    blocks=state.blocks,
    seconds=time.perf_counter() - start,
    rank=problem.b,
    alive_rows=problem.num_alive,
    threshold=int(selection.threshold),
    tau=selection.threshold / problem.num_alive,
    stop_reason=stop_reason,
    check=problem.check,
  )
  return InversionResult(
    inputs=result.inputs,
    grad_z=result.grad_z,
    verified=result.verified,
    success=success,
    directions=result.q,
    sparsity=sparsity,
    candidates=pool.directions,
    stats=stats,
    identifiable=identifiable,
  )


def _pad_dependent(result: InversionResult, dependent: int) -> InversionResult:
  """Pads a rank-``r`` result to the requested ``r + dependent`` samples.

  Inputs that are linear combinations of the others leave the gradient's
  rank below ``b``: the gradient fixes the distinct samples but not which
  of them repeat. The commonest cause is an exact duplicate, whose column
  of ``D`` is the sum of its copies' columns, so each extra row repeats the
  sample whose ``D`` column is largest per copy, and every copy gets an
  equal share of that column (``D X^T`` and ``D 1`` stay exact). The extra
  rows are a guess: never verified nor identifiable, and ``success`` is
  ``False``.
  """
  grad_z = np.asarray(result.grad_z)
  norms = np.linalg.norm(grad_z, axis=0)
  copies = np.ones(norms.shape, int)
  for _ in range(dependent):
    copies[np.argmax(norms / copies)] += 1
  extra = np.repeat(np.arange(norms.shape[0]), copies - 1)
  grad_z = grad_z / copies[None, :]
  identifiable = result.identifiable
  if identifiable is None:
    identifiable = np.ones(norms.shape, bool)
  stop = result.stats.stop_reason
  if result.success:
    stop = "not_identifiable"
  return result._replace(
    inputs=jnp.concatenate([result.inputs, result.inputs[extra]]),
    grad_z=jnp.asarray(np.concatenate([grad_z, grad_z[:, extra]], axis=1)),
    verified=jnp.concatenate([result.verified, jnp.zeros((dependent,), bool)]),
    success=False,
    sparsity=jnp.concatenate([result.sparsity, result.sparsity[extra]]),
    identifiable=np.concatenate([identifiable, np.zeros((dependent,), bool)]),
    stats=result.stats._replace(stop_reason=stop, dependent=dependent),
  )


def invert(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  *,
  key: PRNGKeyArray,
  method: str | Strategy = "spear",
  batch_size: int | None = None,
  weight: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  config: AttackConfig | None = None,
  initial_candidates: ArrayLike | None = None,
  checkpoint_fn: CheckpointFn | None = None,
  noise_std: float | None = None,
  next_weight: ArrayLike | None = None,
  next_weight_grad: ArrayLike | None = None,
) -> InversionResult:
  r"""Recovers the private batch from one linear layer's gradients (SPEAR).

  For ``Z = W X + beta`` followed by ReLU, the shared gradients are
  ``weight_grad = D X^T`` and ``bias_grad = D 1`` with ``D = dL/dZ``.
  SPEAR factorises ``weight_grad = L R``, samples ``(b-1)``-row submatrices
  of ``L`` whose kernels propose columns of ``Q`` (``D = L Q``), keeps the
  proposals whose ``L q`` is sparse, selects ``b`` independent ones, fixes
  their scales with ``bias_grad`` and returns ``X^T = Q^{-1} R``. When the
  layer's ``weight`` and ``bias`` are given, every sample is certified by
  the ReLU pattern and the search stops at the first certified selection.
  SPEAR++ (``method="spearpp"``) replaces the sampler by an l1
  dictionary-learning search; both run in the same loop (prepare, then
  strategy step, absorb, select, budget/log/checkpoint until a stop, then
  finalize), so any :class:`Strategy` can be passed as ``method``.

  Inputs are validated here (not by type annotations) so that every bad
  input gets one clear ``ValueError``.

  Args:
    weight_grad: ``dL/dW``, shape ``(m, n)`` in the paper's layout (use
      :func:`spear_jax.paper_layout` for flax's ``(n, m)`` kernels).
    bias_grad: ``dL/dbeta``, shape ``(m,)``.
    key: PRNG key of the sampler.
    method: ``"spear"`` (:func:`spear_sampler`), ``"spearpp"``
      (:func:`spearpp_learner`) or any :class:`Strategy`.
    batch_size: ``b``; ``None`` estimates it as the numerical rank of
      ``weight_grad``. A ``b`` above the rank (duplicated or linearly
      dependent inputs) recovers the rank's worth of distinct samples and
      pads the result to ``b`` rows, the extra rows repeating the samples
      most likely duplicated (``stats.dependent``; never verified).
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
    noise_std: the known standard deviation of i.i.d. noise on every
      gradient entry (DP-SGD: ``sigma C / b``). A positive value, or a
      gradient of full numerical rank whose spectrum shows ``b`` values
      above the Marchenko-Pastur edge of its noise, runs the noise-aware
      attack (:func:`spear_jax.attack.invert_noisy`): the best
      reconstruction, ``stats.check == "noise"``, nothing ``verified``.
    next_weight: the weight ``V`` (``c x m``, paper layout) of the dense
      layer that reads this layer's ReLU output directly, e.g. the
      classifier after the last hidden layer. Every true column of ``D`` is
      then ``1[z_i > 0] * (V^T g_i)``, which rules out mixtures of samples
      whenever ``c`` is below a column's nonzero count
      (:func:`spear_jax.attack.next_layer_residuals`): directions that
      fail never enter the pool and samples whose column fails are not
      verified. FedSGD only (ignored under the drift check and noise).
    next_weight_grad: that layer's weight gradient ``Delta H^T`` (``c x
      m``, paper layout), which a FedSGD server receives with this one.
      With ``c >= b`` its rows span the batch's ReLU outputs ``H``, and
      every found column then gives its sample's input exactly, without
      the other columns (:func:`spear_jax.attack.hidden_span_rows`): the
      deflated search restarts in the exact complement of the found
      samples, and a partial result's found samples come out exact
      (still unverified). Ignored (logged) when its rank is not ``b``, and
      under the drift check and noise.

  Returns:
    An :class:`InversionResult`. ``success`` is ``True`` when ``b``
    independent directions were found and (with ``weight`` and ``bias``)
    every sample is verified. Otherwise the best partial reconstruction is
    returned with honest ``verified`` flags.

  Raises:
    ValueError: on invalid input: wrong shapes or ndim, non-finite or
      all-zero gradients, a gradient without low-rank structure (not even
      above its noise), or a ``batch_size`` below its rank.

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
  clock = PhaseClock()
  config = AttackConfig() if config is None else config
  strategy = make_strategy(method, config)
  noisy = functools.partial(
    _noisy.invert_noisy,
    weight_grad,
    bias_grad,
    key=key,
    batch_size=batch_size,
    weight=weight,
    bias=bias,
    config=config,
    method="spear" if strategy.name == "SPEAR" else "spearpp",
  )
  if strategy.name not in ("SPEAR", "SPEAR++") and noise_std:
    raise ValueError("the noise-aware attack runs SPEAR or SPEAR++ only.")
  if noise_std is not None and noise_std > 0:
    return noisy(noise_std=noise_std)
  try:
    with clock("prepare"):
      problem = prepare_problem(
        weight_grad,
        bias_grad,
        batch_size=batch_size,
        weight=weight,
        bias=bias,
        config=config,
        next_weight=next_weight,
        next_weight_grad=next_weight_grad,
      )
  except FullRankError:
    if strategy.name not in ("SPEAR", "SPEAR++"):
      raise
    logging.info("full-rank gradient: trying the noise-aware attack")
    return noisy(noise_std=None)
  if problem.b == 1:
    state = _single_sample(problem)
  else:
    if initial_candidates is not None:
      initial_candidates = np.asarray(initial_candidates, problem.dtype)
    state = _search_and_peel(
      key,
      problem,
      strategy,
      config,
      initial_candidates,
      checkpoint_fn,
      start,
      clock,
    )
  if checkpoint_fn is not None:
    checkpoint_fn(state.pool.directions.copy(), state.proposals)
  with clock("finalize"):
    result = _finalize(problem, state, start, config)
    if problem.dependent:
      result = _pad_dependent(result, problem.dependent)
  stats = result.stats._replace(
    seconds=time.perf_counter() - start, timings=clock.summary()
  )
  return result._replace(stats=stats)
