"""Selection: ``b`` independent candidates, their scales, the certificate.

After the filter (:mod:`spear_jax._pool`) every correct direction is in
the pool, together with a few wrong ones (sparse mixtures of several
columns of ``Q``). :func:`select` picks ``b`` independent candidates
(sparsest first, then swaps while more samples verify), turns them into
``Q`` with the bias gradient and certifies every sample. A
:class:`Selection` is an immutable value: :func:`select` returns a new one.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._certificate import drift_certificate
from spear_jax._certificate import identifiable_inputs
from spear_jax._certificate import relu_certificate
from spear_jax._config import AttackConfig
from spear_jax._pool import CandidatePool
from spear_jax._problem import Problem
from spear_jax._problem import fits_next_layer
from spear_jax._problem import zero_mask
from spear_jax._types import Array
from spear_jax._types import ArrayLike
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "Reconstruction",
  "Selection",
  "complete_basis",
  "empty_selection",
  "reconstruct",
  "recover_batch",
  "select",
  "select_independent",
  "threshold",
]


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


class Reconstruction(NamedTuple):
  """A batch rebuilt from ``b`` directions (columns of ``Q`` up to scale)."""

  inputs: Float[Array, "b n"]
  grad_z: Float[Array, "m b"]
  q: Float[Array, "b b"]
  verified: Bool[Array, " b"]


def reconstruct(problem: Problem, directions_bxb: ArrayLike) -> Reconstruction:
  """Scales the directions with the bias gradient, rebuilds and certifies.

  Args:
    problem: the problem.
    directions_bxb: ``b`` independent unit directions as columns.

  Returns:
    The batch, ``D``, ``Q`` and, with the layer's weight and bias, the ReLU
    certificate of every sample (all ``False`` without them).
  """
  inputs, grad_z, q = recover_batch(
    jnp.asarray(directions_bxb),
    problem.l_mxb,
    problem.r_bxn,
    problem.bias_grad,
  )
  if problem.weight is None or problem.bias is None:
    verified = jnp.zeros((q.shape[0],), bool)
  elif problem.check == "drift":
    verified = drift_certificate(
      inputs,
      grad_z,
      problem.weight,
      problem.bias,
      problem.l_mxb,
      problem.alive,
      jnp.asarray(problem.floor, jnp.int32),
      problem.scalar(problem.tol.zero),
      problem.scalar(problem.tol.leverage),
      problem.scalar(problem.drift[0]),
      problem.scalar(problem.drift[1]),
      problem.r_bxn,
      problem.bias_grad,
    )
  else:
    verified = relu_flags(problem, inputs, grad_z)
  if problem.next_weight is not None:
    fits = fits_next_layer(problem, np.asarray(grad_z))
    verified = jnp.asarray(np.asarray(verified) & fits)
  return Reconstruction(inputs, grad_z, q, verified)


def relu_flags(
  problem: Problem,
  inputs_bxn: Float[Array, "b n"],
  grad_z_mxb: Float[Array, "m b"],
) -> Bool[Array, " b"]:
  """The ReLU certificate (:func:`relu_certificate`) at the problem's
  weights and tolerances."""
  return relu_certificate(
    inputs_bxn,
    grad_z_mxb,
    problem.weight,
    problem.bias,
    problem.scalar(problem.tol.zero),
    problem.scalar(problem.tol.certificate),
  )


class Selection(NamedTuple):
  """The current choice of ``b`` (or fewer) pool entries.

  Attributes:
    chosen: indices into the pool's directions, at most ``b``.
    result: the reconstruction of the last complete selection, or ``None``.
    threshold: the sparsity threshold (zeros over alive rows) it used.
    signature: the last complete selection evaluated (its directions'
      bytes and the pool's size), so that an unchanged selection is not
      evaluated again until the pool grows (a new candidate that the
      greedy stage ranks below a sparse mixture still gets its swap: a
      shifted-frames batch at b = 20, m = 200 kept a mixture whose zeros
      tie its true column's, 18/20 certified, with the column in the
      pool).
    tried: selections already evaluated by the swap stage (and top-ups).
    fallback: the best full top-up that did not certify every sample
      (its pool indices and reconstruction), or ``None``: the final result
      when the selection above the threshold stays short (a short
      selection's filler columns enter every row of ``Q^{-1}``, a full set
      of candidates at worst its own mixed samples).
  """

  chosen: np.ndarray
  result: Reconstruction | None
  threshold: int
  signature: bytes | None
  tried: frozenset[frozenset[int]]
  fallback: tuple[np.ndarray, Reconstruction] | None = None


def empty_selection(problem: Problem) -> Selection:
  """Nothing selected yet."""
  return Selection(np.zeros((0,), int), None, problem.floor, None, frozenset())


def threshold(
  problem: Problem, pool: CandidatePool, config: AttackConfig, search: bool
) -> int:
  """Adaptive sparsity threshold of the selection (see ``AttackConfig``).

  With ``search`` (SPEAR++) the default fraction of the typical zero count
  is at most ``config.learner.tau_relative``: the search reaches columns
  with fewer zeros just as easily, so the sampling argument behind
  ``min_hit_ratio`` (0.93 at b = 100) must not make it stricter; at small
  ``b`` that argument gives the lower value (0.46 at b = 10) and is kept.
  """
  b, floor = problem.b, problem.floor
  if config.tau is not None:
    return max(floor, math.ceil(config.tau * problem.num_alive))
  if pool.zeros.shape[0] == 0:
    return floor
  top = np.sort(pool.zeros)[::-1][:b]
  relative = config.tau_relative
  if relative is None:
    relative = config.min_hit_ratio ** (1.0 / (b - 1))
    if search:
      relative = min(relative, config.learner.tau_relative)
  return max(floor, math.ceil(relative * float(np.median(top))))


def greedy_selection(
  problem: Problem, pool: CandidatePool, threshold: int, capacity: int
) -> np.ndarray:
  """Stage 1: sparsest first, keep the independent ones.

  The pool is padded to the power of two at or above ``max(2 b, size)``
  (at most ``capacity``); after the mixture test the pool rarely outgrows
  ``2 b``, so one compilation of :func:`select_independent` serves a run.
  """
  b = problem.b
  order = np.argsort(-pool.zeros, kind="stable")
  size = order.shape[0]
  padded = min(capacity, 1 << (max(2 * b, size) - 1).bit_length())
  directions = np.zeros((padded, b), pool.directions.dtype)
  directions[:size] = pool.directions[order]
  eligible = np.zeros((padded,), bool)
  eligible[:size] = pool.zeros[order] >= threshold
  selected, count = select_independent(
    jnp.asarray(directions),
    jnp.asarray(eligible),
    jnp.asarray(problem.tol.independence, pool.directions.dtype),
  )
  return order[np.asarray(selected)[: int(count)]]


def _num_verified(result: Reconstruction) -> int:
  return int(np.sum(np.asarray(result.verified)))


def _swap(
  problem: Problem,
  pool: CandidatePool,
  chosen: np.ndarray,
  threshold: int,
  tried: frozenset[frozenset[int]],
) -> tuple[np.ndarray, Reconstruction, frozenset[frozenset[int]]]:
  """Stage 2: swap in unselected candidates while more samples verify.

  A sparse mixture of two columns of ``Q`` can outrank a true column in
  stage 1 when their zero sets are nearly nested; it then spoils the
  samples it mixes. For each unverified sample we try replacing its
  direction by another eligible candidate (sparsest first); of the swaps
  tried in one sweep the one that verifies the most samples is kept, and
  sweeps repeat while that number grows. Taking the first swap that
  helped kept wrong ones: with near-twins ``x_0, x_1`` selected as the
  true ``q_1`` and a mixture of ``q_0, q_1``, replacing ``q_1`` by another
  mixture made the two mixtures' in-between input pass the raw ReLU
  check (7 of 8 verified) before the swap that gives the truth (8 of 8)
  was tried, and no single swap led back. Selections already evaluated
  (``tried``) are skipped, and at most ``2 b`` new selections are
  evaluated per call.

  Returns:
    The chosen indices, their reconstruction and the selections tried.
  """
  b, budget = chosen.shape[0], 2 * chosen.shape[0]
  best = reconstruct(problem, pool.directions[chosen].T)
  seen = set(tried) | {frozenset(chosen.tolist())}
  in_selection = set(chosen.tolist())
  others = [
    int(c)
    for c in np.argsort(-pool.zeros, kind="stable")
    if pool.zeros[c] >= threshold and int(c) not in in_selection
  ]
  trials, improved = 0, True
  while improved and _num_verified(best) < b and trials < budget:
    improved = False
    failing = np.flatnonzero(~np.asarray(best.verified))
    for slot, c in ((s, c) for s in failing for c in others):
      trial = chosen.copy()
      trial[slot] = c
      signature = frozenset(trial.tolist())
      if signature in seen:
        continue
      seen.add(signature)
      basis = pool.directions[trial]
      if np.linalg.matrix_rank(basis, tol=problem.tol.independence) < b:
        continue
      trials += 1
      result = reconstruct(problem, basis.T)
      if _num_verified(result) > _num_verified(best):
        swapped, best, improved = (slot, c), result, True
      if _num_verified(best) == b or trials >= budget:
        break
    if improved:
      slot, c = swapped
      others = [o for o in others if o != c] + [int(chosen[slot])]
      chosen = chosen.copy()
      chosen[slot] = c
  return chosen, best, frozenset(seen)


def select(
  problem: Problem,
  pool: CandidatePool,
  previous: Selection,
  config: AttackConfig,
  *,
  search: bool = False,
) -> tuple[Selection, str | None]:
  """Two-stage greedy selection and the certificate.

  Args:
    problem: the problem.
    pool: the candidate pool.
    previous: the selection before the pool changed.
    config: the attack's settings.
    search: whether the pool comes from a search (SPEAR++; see
      :func:`threshold`).

  Returns:
    ``(selection, stop_reason)``: the stop reason is ``"certified"`` when
    every sample verifies, ``"recovered"`` when ``b`` directions are
    selected and no weights were given to certify, else ``None``.
  """
  tau = threshold(problem, pool, config, search)
  chosen = greedy_selection(problem, pool, tau, config.pool_capacity)
  selection = previous._replace(chosen=chosen, threshold=tau)
  signature = pool.directions[np.sort(chosen)].tobytes() + bytes(
    str(pool.zeros.shape[0]), "ascii"
  )
  if chosen.shape[0] < problem.b:
    return _topped_up(problem, pool, selection, config)
  if signature == previous.signature:
    return selection, None
  result = reconstruct(problem, pool.directions[chosen].T)
  selection = selection._replace(signature=signature, result=result)
  if not problem.certifiable:
    return selection, "recovered"
  if _num_verified(result) < problem.b:
    chosen, result, tried = _swap(problem, pool, chosen, tau, previous.tried)
    selection = selection._replace(chosen=chosen, result=result, tried=tried)
  if _num_verified(result) == problem.b:
    return selection, "certified"
  if problem.check == "relu":
    identified = identified_samples(problem, result)
    if np.all(np.asarray(result.verified) | ~identified):
      return selection, "not_identifiable"
  return selection, None


def _topped_up(
  problem: Problem,
  pool: CandidatePool,
  selection: Selection,
  config: AttackConfig,
) -> tuple[Selection, str | None]:
  """A short selection, filled from the candidates under the threshold.

  The threshold ranks; it should not shut a true column out. After
  FedAvg's local steps the zero counts spread (the sparsest true column
  of a b = 32, m = 400 update had 125 zeros, 0.79 of the median: under
  SPEAR++'s 0.8), and the pool held all 32 columns while the selection
  stayed at 31. When the threshold leaves the selection short, the
  greedy selection over every candidate (all passed the floor and the
  mixture test) is evaluated once per distinct set; it replaces the
  short one only if every sample is certified, so the search keeps
  building on the columns above the threshold otherwise; the full set is
  kept as ``fallback`` for the final result.
  """
  if not problem.certifiable or pool.zeros.shape[0] < problem.b:
    return selection, None
  chosen = greedy_selection(problem, pool, problem.floor, config.pool_capacity)
  key = frozenset(chosen.tolist())
  if chosen.shape[0] < problem.b or key in selection.tried:
    return selection, None
  selection = selection._replace(tried=selection.tried | {key})
  result = reconstruct(problem, pool.directions[chosen].T)
  if _num_verified(result) < problem.b:
    best = selection.fallback
    if best is None or _num_verified(result) >= _num_verified(best[1]):
      selection = selection._replace(fallback=(chosen, result))
    return selection, None
  return selection._replace(chosen=chosen, result=result), "certified"


def identified_samples(problem: Problem, result: Reconstruction) -> np.ndarray:
  """Which inputs of a full reconstruction the gradient determines.

  See :func:`spear_jax.attack.identifiable_inputs` (near-twins).
  """
  return np.asarray(
    identifiable_inputs(
      result.grad_z,
      result.q,
      problem.l_mxb,
      problem.alive,
      problem.scalar(problem.tol.zero),
      problem.scalar(float(np.sqrt(np.finfo(problem.dtype).eps))),
      problem.scalar(problem.tol.leverage),
    )
  )


# In :func:`coupled_flags`, a singular value of ``L`` on an unverified
# column's zero set at most ``tol.screen`` times the largest is a kernel
# direction; one between that and _COUPLING_MARGIN times the largest makes
# the zero set ambiguous. The margin is measured, not derived: the two
# mixtures that motivated the rule had 2.3e-3 and 1.1e-3, the true columns
# of the same layer 0.17 to 0.47.
_COUPLING_MARGIN = 1e-2


def coupled_flags(
  problem: Problem,
  result: Reconstruction,
  verified_b: np.ndarray,
  identifiable_b: np.ndarray,
) -> np.ndarray:
  """The ReLU certificate's flags, withdrawn where a failing column may
  move the samples that passed.

  ``X^T = Q^{-1} R`` couples the samples: if a selected column ``w`` is a
  mixture ``sum_j c_j q_j`` of true columns, every sample ``i`` with
  ``c_i != 0`` is off by ``-(c_i / c_w) x_w`` (row ``i`` of ``Q^{-1}``
  must be orthogonal to ``w`` instead of the true column), which can be too
  small to flip any neuron: on the second layer of an MLP with 10 classes
  (b = 40, m = 1000) two samples passed at relative errors 2.5e-3 and
  9e-3. There ``dL/dZ`` on rows where all of ``S = {j : c_j != 0}`` are
  active is ``W_2^T (softmax - onehot)``, of rank 9 < ``|S| = 10``, so the
  mixture vanished on 455 rows, nearly as many as a true column (473
  to 532).

  Which samples a failing identifiable column ``k`` can mix: the kernel of
  ``L`` on its zero set ``Z_k`` holds every true column that vanishes on
  ``Z_k``, and a wrong column lies in their span. So with ``K`` the sum of
  those kernels, the samples whose columns lie in ``K`` lose their flags
  and the others keep them when the selected columns inside ``K`` span it
  (then the columns outside it are true and orthogonal rows of ``Q^{-1}``
  are exact). A mixture whose zero set holds rows where only a
  combination vanishes has a one-dimensional kernel (itself) and this
  argument fails. Such zero sets were often nearly singular (the margin
  above), and then, or when the selected columns do not span ``K``,
  nothing is verified. Otherwise (a kernel of one dimension) the mixed
  samples are bounded by the zeros: ``w = sum_{j in S} c_j q_j`` vanishes
  on the rows where all of ``S`` vanish and, generically, on at most
  ``|S| - 1 <= b - 1`` rows more (one linear condition on ``c`` each), so
  a sample whose zero set misses more than ``|S| - 1`` rows of ``Z_k`` is
  not in ``S``; the others lose their flags (:func:`_pinned_partners`
  bounds ``|S|``). Near-twins with one and two own zeros showed the need:
  a mixture of the pair pinned by one row, and the twin with the true
  column verified at relative error 3.5e-4.
  """
  b = verified_b.shape[0]
  suspects = np.flatnonzero(~verified_b & identifiable_b)
  if suspects.size == 0 or not verified_b.any():
    return verified_b
  l_mxb = np.asarray(problem.l_mxb)
  zero_mxb = zero_mask(problem, np.asarray(result.grad_z))
  kernels, pinned = [], np.zeros(b, bool)
  for k in suspects:
    sigma = np.zeros(b)
    _, top, vt = np.linalg.svd(l_mxb[zero_mxb[:, k]], full_matrices=True)
    sigma[: top.shape[0]] = top / (top[0] if top.size else 1.0)
    kernel = sigma <= problem.tol.screen
    if np.any(~kernel & (sigma <= _COUPLING_MARGIN)):
      return np.zeros_like(verified_b)
    kernels.append(vt[kernel].T)
    if np.sum(kernel) == 1:
      pinned |= _pinned_partners(zero_mxb, int(k), verified_b)
  verified_b = verified_b & ~pinned
  basis, weight, _ = np.linalg.svd(np.concatenate(kernels, axis=1), False)
  basis = basis[:, weight > problem.tol.screen * weight[0]]
  q_bxb = np.asarray(result.q)
  unit = q_bxb / np.maximum(np.linalg.norm(q_bxb, axis=0), 1e-300)
  off = np.linalg.norm(unit - basis @ (basis.T @ unit), axis=0)
  inside = off <= np.sqrt(problem.tol.screen)
  if basis.shape[1] != np.sum(inside) or not inside[suspects].all():
    return np.zeros_like(verified_b)
  return verified_b & ~inside


def _pinned_partners(
  zero_mxb: np.ndarray, k: int, verified_b: np.ndarray
) -> np.ndarray:
  """The verified samples a pinned failing column ``k`` may mix.

  A mixture of the samples ``S`` vanishes off their common zeros on at
  most ``|S| - 1`` rows (generically), so every member of ``S`` misses at
  most ``|S| - 1`` rows of ``Z_k``. ``S`` lies in the verified samples
  within that distance plus the unverified ones (their true zero sets are
  unknown), so with ``d`` the bound so far, ``|S| - 1 <= |{verified
  within d}| + #unverified - 1``: iterated from ``d = b - 1`` until it
  stops shrinking. On shifted frames at b = 100 the plain ``b - 1``
  withdrew 12 exact samples whose zero sets are within 99 rows of a
  failing column's.
  """
  b = verified_b.shape[0]
  outside = np.sum(zero_mxb[:, k, None] & ~zero_mxb, axis=0)
  unverified = int(np.sum(~verified_b))
  bound = b - 1
  while True:
    within = verified_b & (outside <= bound)
    tighter = int(np.sum(within)) + unverified - 1
    if tighter >= bound:
      return within
    bound = tighter


def balance_twin_pairs(
  problem: Problem, result: Reconstruction, identifiable: np.ndarray
) -> Reconstruction:
  r"""Even estimates for pairs of samples the gradient cannot tell apart.

  Two not identifiable columns with one zero set span a plane in which any
  basis explains both gradients: with ``U + W = s`` (their sum, fixed by
  the bias gradient) every basis gives inputs ``a x_1 + (1 - a) x_2`` of
  the true twins', with ``a`` unbounded for a basis nearly along ``s``.
  The basis ``s / 2 \pm t`` (``t`` orthogonal to ``s`` in the plane,
  ``|t| = |s| / 2``) is the choice that assumes nothing about the twins;
  it is exact for twins whose ``dL/dZ`` columns differ orthogonally to
  their sum with equal norms, and otherwise within ``O(|x_1 - x_2|)`` of
  them. ``D X^T`` and ``D 1`` are unchanged; nothing here is verified.
  """
  d_mxb = np.array(result.grad_z)
  x_bxn = np.array(result.inputs)
  zero_mxb = zero_mask(problem, d_mxb)
  groups: dict[bytes, list[int]] = {}
  for i in np.flatnonzero(~identifiable):
    groups.setdefault(np.packbits(zero_mxb[:, i]).tobytes(), []).append(int(i))
  for pair in (g for g in groups.values() if len(g) == 2):
    old_mx2 = d_mxb[:, pair]
    s_m = old_mx2.sum(axis=1)
    t_m = old_mx2[:, 0] - (old_mx2[:, 0] @ s_m) / (s_m @ s_m) * s_m
    t_m *= 0.5 * np.linalg.norm(s_m) / (np.linalg.norm(t_m) + 1e-300)
    new_mx2 = np.stack([s_m / 2 + t_m, s_m / 2 - t_m], axis=1)
    m_2x2 = np.linalg.lstsq(new_mx2, old_mx2, rcond=None)[0]
    x_bxn[pair] = m_2x2 @ x_bxn[pair]
    d_mxb[:, pair] = new_mx2
  q_bxb = np.asarray(problem.l_mxb).T @ d_mxb
  return result._replace(
    inputs=jnp.asarray(x_bxn), grad_z=jnp.asarray(d_mxb), q=jnp.asarray(q_bxb)
  )


def complete_basis(directions_sxb: np.ndarray, b: int) -> np.ndarray:
  """Completes ``s <= b`` independent directions to a basis (columns)."""
  s = directions_sxb.shape[0]
  if s == b:
    return directions_sxb.T
  rng = np.random.default_rng(0)
  filler = rng.standard_normal((b - s, b)).astype(directions_sxb.dtype)
  basis, _ = np.linalg.qr(np.concatenate([directions_sxb, filler]).T)
  return np.concatenate([directions_sxb.T, basis[:, s:]], axis=1)
