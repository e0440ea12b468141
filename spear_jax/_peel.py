"""Splitting a span of many near-twin columns by peeling parallel rows.

A twin span ``V`` (``s`` dimensions, orthonormal basis ``B``) holds the
columns ``q_t = B c_t`` of ``s`` near-twin samples. In the coordinates
``P = L B`` (rows outside the twins' shared zero set) row ``j`` is
``P_j = sum_t D[j, t] a_t``, with ``a_t`` the rows of ``C^-1``
(``C = [c_1 .. c_s]``) and ``D[j, t] = 0`` wherever twin ``t`` is
inactive. So:

* a row where only twin ``u`` is active is parallel to ``a_u``; modulo the
  span of ``a_K`` (a set ``K`` of twins), the rows where every active twin
  but ``u`` lies in ``K`` are all parallel. Adding such groups one after
  the other (*peeling*) builds a flag of subspaces; once it has
  ``s - 1`` dimensions it is the hyperplane spanned by the ``a_u`` of all
  twins but one, ``t``, and its normal is ``c_t``: that twin's column,
  exactly. Rows in general position (every twin active) are never parallel.
* With a column ``c_u`` known, the rows where twin ``u`` is inactive lie in
  the hyperplane ``c_u^perp``: the same problem for the other ``s - 1``
  twins, one dimension down. A column ``f`` of it extends to the full span
  as ``f + gamma c_u``, and every row where twin ``t`` is inactive but
  ``u`` is active gives the same ``gamma``.

Nothing here needs the ReLU pattern or sampling luck (the anchor sampling
of :func:`~spear_jax._linalg.split_span` hits a column with probability
about ``(|E_t| / m)^(s - 2)``): measured on batches of washed-out
photographs and shifted frames, it splits twin spans of 10 to 22
dimensions (BUILD_NOTES.md, "Issue 12: peeling"). What it returns are
proposals: the filter polishes them on their zero sets and refuses
mixtures, like every other direction.
"""

import numpy as np

__all__ = ["peel_span"]

# Two unit rows are parallel when they differ by at most this many times
# the sum of their estimated angular errors (delta over the residual norm).
_PARALLEL_SLACK = 10.0
# Rows whose residual modulo the flag is below this fraction of their norm
# (or below 100 delta) carry no reliable direction and are skipped.
_RESIDUAL_FLOOR = 1e-3


def _canonical(u_rxs: np.ndarray) -> np.ndarray:
  """Unit rows signed so that their largest coordinate is positive."""
  idx = np.argmax(np.abs(u_rxs), axis=1)
  return u_rxs * np.sign(u_rxs[np.arange(u_rxs.shape[0]), idx])[:, None]


def _parallel_groups(
  res_rxs: np.ndarray, delta: float
) -> tuple[list[np.ndarray], np.ndarray]:
  """Groups of at least two mutually parallel rows, and the unit rows.

  Candidates come from the Gram matrix (``|cos| >= 1 - 1e-6``); the test
  itself compares the unit rows directly, since ``1 - cos`` cannot resolve
  angles below ``1e-8``.
  """
  norm_r = np.linalg.norm(res_rxs, axis=1)
  u_rxs = _canonical(res_rxs / norm_r[:, None])
  err_r = delta / norm_r
  i, j = np.nonzero(np.triu(np.abs(u_rxs @ u_rxs.T) >= 1.0 - 1e-6, 1))
  gap = np.minimum(
    np.linalg.norm(u_rxs[i] - u_rxs[j], axis=1),
    np.linalg.norm(u_rxs[i] + u_rxs[j], axis=1),
  )
  near = gap <= _PARALLEL_SLACK * (err_r[i] + err_r[j])
  adjacent = np.zeros((norm_r.size, norm_r.size), bool)
  adjacent[i[near], j[near]] = True
  adjacent |= adjacent.T
  left = np.ones(norm_r.size, bool)
  groups = []
  for k in range(norm_r.size):
    if left[k]:
      group = np.union1d([k], np.flatnonzero(adjacent[k] & left))
      left[group] = False
      if group.size >= 2:
        groups.append(group)
  return groups, u_rxs


def _normal(w_sxk: np.ndarray) -> np.ndarray:
  """The unit normal of the hyperplane spanned by the columns of ``w``."""
  return np.linalg.svd(w_sxk.T)[2][-1]


def _flag_normals(
  p_rxs: np.ndarray, delta: float, rng: np.random.Generator
) -> list[np.ndarray]:
  """Columns found by peeling parallel groups up to a hyperplane.

  Each step adds about half of the groups found (in random order, so
  repeated calls end on different twins); the step that completes
  ``s - 1`` dimensions gives the normal of each hyperplane it can close.
  Empty when the peeling stalls.
  """
  s = p_rxs.shape[1]
  flag_sxk = np.zeros((s, 0))
  norm_r = np.linalg.norm(p_rxs, axis=1)
  while True:
    res_rxs = p_rxs - (p_rxs @ flag_sxk) @ flag_sxk.T
    res_norm = np.linalg.norm(res_rxs, axis=1)
    live = np.flatnonzero(
      (res_norm > _RESIDUAL_FLOOR * norm_r) & (res_norm > 100 * delta)
    )
    groups, u_rxs = (
      _parallel_groups(res_rxs[live], delta) if live.size >= 2 else ([], None)
    )
    if not groups:
      return []
    k = flag_sxk.shape[1]
    take = min(len(groups), s - k)
    if k + take < s - 1:
      take = max(1, (take + 1) // 2)
    directions, orthonormal = [], []
    for g in rng.permutation(len(groups)):
      d = u_rxs[groups[g]].mean(axis=0)
      e = d - sum((o @ d) * o for o in orthonormal)
      if np.linalg.norm(e) > 1e-6 * np.linalg.norm(d):
        directions.append(d / np.linalg.norm(d))
        orthonormal.append(e / np.linalg.norm(e))
      if len(directions) == take:
        break
    if k + len(directions) == s:
      return [
        _normal(np.column_stack([flag_sxk, *directions[:i], *directions[i + 1 :]]))
        for i in range(len(directions))
      ]
    flag_sxk = np.column_stack([flag_sxk, *orthonormal])
    if flag_sxk.shape[1] == s - 1:
      return [_normal(flag_sxk)]


def _shared_ratio(num_r: np.ndarray, den_r: np.ndarray, delta: float):
  """The value of ``num / den`` that most rows (at least two) share."""
  if num_r.size < 2:
    return None
  ratio = num_r / den_r
  err = delta * (1.0 + np.abs(ratio)) / np.abs(den_r)
  close = np.abs(ratio[:, None] - ratio[None, :]) <= _PARALLEL_SLACK * (
    err[:, None] + err[None, :]
  )
  counts = close.sum(axis=1)
  best = int(np.argmax(counts))
  return None if counts[best] < 2 else float(np.median(ratio[close[best]]))


def _is_new(columns: list[np.ndarray], c_s: np.ndarray) -> bool:
  return not columns or np.max(np.abs(np.array(columns) @ c_s)) < 1.0 - 1e-8


def _peel(p_rxs, delta, known, rng, budget, tries):
  """:func:`peel_span` on the rows ``p_rxs``; ``budget`` (a one-element
  list) bounds the calls of the whole recursion."""
  s = p_rxs.shape[1]
  budget[0] -= 1
  if budget[0] < 0 or p_rxs.shape[0] < s - 1:
    return []
  if s == 1:
    return [np.ones(1)]
  columns = [c / np.linalg.norm(c) for c in known]
  for _ in range(tries):
    for c in _flag_normals(p_rxs, delta, rng):
      if _is_new(columns, c):
        columns.append(c)
  i = 0
  while i < len(columns) < s and budget[0] > 0:
    c = columns[i]
    i += 1
    on = np.abs(p_rxs @ c) <= 10 * delta  # the rows where this twin is off
    perp_sxs1 = np.linalg.svd(c[None, :])[2][1:].T
    off_rxs = p_rxs[~on]
    sub = _peel(p_rxs[on] @ perp_sxs1, delta, (), rng, budget, tries)
    for f in sub:
      v = perp_sxs1 @ f
      gamma = _shared_ratio(-(off_rxs @ v), off_rxs @ c, delta)
      if gamma is not None:
        column = (v + gamma * c) / np.linalg.norm(v + gamma * c)
        if _is_new(columns, column):
          columns.append(column)
  return columns


def peel_span(
  p_rxs: np.ndarray,
  delta: float,
  *,
  known_kxs: np.ndarray | None = None,
  seed: int = 0,
  tries: int = 2,
) -> np.ndarray:
  """Columns of a twin span, by peeling parallel rows (module docstring).

  Args:
    p_rxs: the rows ``L_j B`` of the span's coordinates outside the twins'
      shared zero set (host array, float64).
    delta: the absolute error of those rows; a coordinate ``P_j c`` counts
      as zero up to ``10 delta``.
    known_kxs: unit columns of the span already known (coordinates); they
      seed the recursion.
    seed: seeds the order in which parallel groups are added.
    tries: peelings per subproblem.

  Returns:
    ``(k, s)`` unit coordinate vectors, the known ones first. Proposals:
    they are exact columns when the span's rows are generic, but the
    caller must check them (zero count, leverage, certificate).
  """
  p_rxs = np.asarray(p_rxs, np.float64)
  s = p_rxs.shape[1]
  known = [] if known_kxs is None else list(np.asarray(known_kxs))
  rng = np.random.default_rng(seed)
  columns = _peel(p_rxs, float(delta), known, rng, [min(8 * s * s, 2048)], tries)
  return np.array(columns, np.float64).reshape(-1, s)
