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
* A finished flag gives more: the columns of the twins added from step
  ``k`` on lie in ``V_k^perp``, where only those twins act; with the later
  twins' columns known there, the step's own follow (back-substitution).
* With columns ``c_u`` known (``u`` in ``F``), each row is
  ``sum_F D_ju a_u + sum_missing D_jt a_t`` with ``D_ju = P_j c_u`` known
  and ``a_u`` known up to an offset ``w_u`` in the complement of the
  known columns; the rows where ``u`` is the only active known twin and
  no missing twin acts all give the same ``w_u``. Subtracting the known
  twins leaves the missing twins' own, smaller problem (completion).
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


def _probe(s: int) -> np.ndarray:
  """A fixed unit vector of ``R^s``: unit rows that are close have close
  projections on it (``|<u - v, probe>| <= ||u - v||``), so sorting the
  projections finds every close pair among few candidates."""
  probe = np.cos(1.618 * np.arange(1, s + 1) + 0.5)
  return probe / np.linalg.norm(probe)


def _candidate_pairs(
  key_r: np.ndarray, radius_r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Every pair ``i < j`` with ``|key_i - key_j| <= radius_i + radius_j``.

  One sort and a sweep: ``O(r log r + pairs)`` instead of the ``r x r``
  comparison (these sets hold hundreds of rows and are tested thousands of
  times per span).
  """
  order = np.argsort(key_r, kind="stable")
  sorted_r, rad_r = key_r[order], radius_r[order]
  reach = np.searchsorted(sorted_r, sorted_r + rad_r + rad_r.max(), "right")
  count = reach - np.arange(key_r.size) - 1
  first = np.repeat(np.arange(key_r.size), count)
  offset = np.arange(first.size) - np.repeat(np.cumsum(count) - count, count)
  second = first + 1 + offset
  close = np.abs(sorted_r[second] - sorted_r[first]) <= (
    rad_r[first] + rad_r[second]
  )
  i, j = order[first[close]], order[second[close]]
  return np.minimum(i, j), np.maximum(i, j)


def _parallel_groups(
  res_rxs: np.ndarray, delta: float
) -> tuple[list[np.ndarray], np.ndarray]:
  """Groups of at least two mutually parallel rows, and the unit rows.

  Rows ``i`` and ``j`` are parallel when ``|cos| >= 1 - 1e-6`` and their
  unit rows differ (up to sign) by at most ``slack (e_i + e_j)``: the test
  compares the unit rows directly, since ``1 - cos`` cannot resolve
  angles below ``1e-8``. Rows are taken in index order; each row still
  ungrouped forms a group with every ungrouped row parallel to it.
  Candidates come from :func:`_candidate_pairs` on sign-free projections,
  and only a group's first row is compared with its candidates, so a
  group of ``c`` rows costs ``O(c)`` comparisons, not ``O(c^2)``.
  """
  r = res_rxs.shape[0]
  norm_r = np.linalg.norm(res_rxs, axis=1)
  u_rxs = _canonical(res_rxs / norm_r[:, None])
  err_r = delta / norm_r
  key_r = np.abs(u_rxs @ _probe(u_rxs.shape[1]))
  i, j = _candidate_pairs(key_r, _PARALLEL_SLACK * err_r)
  groups: list[np.ndarray] = []
  if not i.size:
    return groups, u_rxs
  first, other = np.concatenate([i, j]), np.concatenate([j, i])
  order = np.argsort(first, kind="stable")
  first, other = first[order], other[order]
  bounds = np.searchsorted(first, np.arange(r + 1))
  left = np.zeros(r, bool)
  left[first] = True  # rows with no candidate join no group
  for k in np.flatnonzero(left):
    if not left[k]:
      continue
    left[k] = False
    cand = other[bounds[k] : bounds[k + 1]]
    cand = cand[left[cand]]
    if not cand.size:
      continue
    cosine = np.abs(u_rxs[cand] @ u_rxs[k])
    gap = np.minimum(
      np.linalg.norm(u_rxs[cand] - u_rxs[k], axis=1),
      np.linalg.norm(u_rxs[cand] + u_rxs[k], axis=1),
    )
    members = cand[
      (cosine >= 1.0 - 1e-6)
      & (gap <= _PARALLEL_SLACK * (err_r[cand] + err_r[k]))
    ]
    if members.size:
      left[members] = False
      groups.append(np.sort(np.append(members, k)))
  return groups, u_rxs


def _normal(w_sxk: np.ndarray) -> np.ndarray:
  """The unit normal of the hyperplane spanned by the columns of ``w``."""
  return np.linalg.svd(w_sxk.T)[2][-1]


def _flag_normals(
  p_rxs: np.ndarray,
  delta: float,
  rng: np.random.Generator,
  greedy: bool = True,
) -> tuple[list[np.ndarray], np.ndarray, list[int]]:
  """Columns found by peeling parallel groups up to a hyperplane.

  Each step adds the groups found (with ``greedy=False`` about half of
  them, in random order, so that repeated calls end on different twins);
  the step that completes ``s - 1`` dimensions gives the normal of each
  hyperplane it can close.

  Returns:
    ``(normals, flag, starts)``: the normals (empty when the peeling
    stalls), the flag's orthonormal basis in peeling order and the flag's
    dimension before each step.
  """
  s = p_rxs.shape[1]
  flag_sxk = np.zeros((s, 0))
  starts: list[int] = []
  norm_r = np.linalg.norm(p_rxs, axis=1)
  while True:
    res_rxs = p_rxs - (p_rxs @ flag_sxk) @ flag_sxk.T
    res_norm = np.linalg.norm(res_rxs, axis=1)
    live = np.flatnonzero(
      (res_norm > _RESIDUAL_FLOOR * norm_r) & (res_norm > 100 * delta)
    )
    if live.size < 2:
      return [], flag_sxk, starts
    groups, u_rxs = _parallel_groups(res_rxs[live], delta)
    if not groups:
      return [], flag_sxk, starts
    k = flag_sxk.shape[1]
    starts.append(k)
    take = min(len(groups), s - k)
    if not greedy and k + take < s - 1:
      take = max(1, (take + 1) // 2)
    directions: list[np.ndarray] = []
    orthonormal: list[np.ndarray] = []
    for g in rng.permutation(len(groups)):
      d = u_rxs[groups[g]].mean(axis=0)
      e = d - sum((o @ d) * o for o in orthonormal)
      if np.linalg.norm(e) > 1e-6 * np.linalg.norm(d):
        directions.append(d / np.linalg.norm(d))
        orthonormal.append(e / np.linalg.norm(e))
      if len(directions) == take:
        break
    flag_sxk = np.column_stack([flag_sxk, *orthonormal])
    if k + len(directions) == s:
      return (
        [
          _normal(
            np.column_stack(
              [flag_sxk[:, :k], *directions[:i], *directions[i + 1 :]]
            )
          )
          for i in range(len(directions))
        ],
        flag_sxk,
        starts,
      )
    if flag_sxk.shape[1] == s - 1:
      normal = _normal(flag_sxk)
      return [normal], np.column_stack([flag_sxk, normal]), starts


def _back_substitute(
  p_rxs, columns, flag_sxs, starts, delta, rng, budget, tries
):
  """More columns from a completed flag: the columns of the twins added
  from step ``k`` on lie in ``W = V_k^perp``, where the rows' projections
  involve only those twins; with the later twins' columns known there,
  :func:`_complete` finds the step's own."""
  found = list(columns)
  for k in reversed(starts[1:]):
    w_sxd = flag_sxs[:, k:]
    inside = [
      w_sxd.T @ c for c in found if np.linalg.norm(w_sxd.T @ c) > 1 - 1e-8
    ]
    if not inside or len(inside) >= w_sxd.shape[1] or budget[0] <= 0:
      continue
    for f in _complete(p_rxs @ w_sxd, inside, delta, rng, budget, tries):
      column = w_sxd @ f
      if _is_new(found, column):
        found.append(column)
  return found[len(columns) :]


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
  return not columns or bool(
    np.max(np.abs(np.array(columns) @ c_s)) < 1.0 - 1e-8
  )


def _shared_vector(y_rxd: np.ndarray, scale_r: np.ndarray, delta: float):
  """The vector ``y_j / scale_j`` that most rows (at least two) share.

  Rows ``i`` and ``j`` share it when ``|c_i - c_j| <= slack (e_i + e_j)``
  (``c = y / scale``, ``e`` its error); the row with the most such
  partners (the first on ties) picks them, and their median is returned.
  """
  if y_rxd.shape[0] < 2:
    return None
  cand_rxd = y_rxd / scale_r[:, None]
  err = delta * (1.0 + np.linalg.norm(cand_rxd, axis=1)) / np.abs(scale_r)
  radius = _PARALLEL_SLACK * err
  i, j = _candidate_pairs(cand_rxd @ _probe(cand_rxd.shape[1]), radius)
  close = np.linalg.norm(cand_rxd[i] - cand_rxd[j], axis=1) <= (
    radius[i] + radius[j]
  )
  i, j = i[close], j[close]
  counts = (
    1 + np.bincount(i, minlength=err.size) + np.bincount(j, minlength=err.size)
  )
  best = int(np.argmax(counts))
  if counts[best] < 2:
    return None
  partners = np.concatenate([[best], j[i == best], i[j == best]])
  return np.median(cand_rxd[np.sort(partners)], axis=0)


def _known_offsets(y_rxd, d_rxk, active_rxk, delta):
  """The known twins' rows of ``C^-1`` in the complement (``w_u``): the
  rows where ``u`` is the only active known twin whose ``w`` is open give
  ``w_u`` wherever no missing twin is active (a shared value)."""
  k = d_rxk.shape[1]
  w_kxd = np.zeros((k, y_rxd.shape[1]))
  solved = np.zeros(k, bool)
  progress = True
  while progress and not solved.all():
    progress = False
    for u in np.flatnonzero(~solved):
      others = active_rxk & ~solved & (np.arange(k) != u)
      rows = active_rxk[:, u] & ~others.any(axis=1)
      rest = y_rxd[rows] - d_rxk[rows][:, solved] @ w_kxd[solved]
      w = _shared_vector(rest, d_rxk[rows, u], delta)
      if w is not None:
        w_kxd[u], solved[u], progress = w, True, True
  return w_kxd, solved


def _independent(columns: list[np.ndarray]) -> np.ndarray:
  """The columns, each dropped that the earlier ones nearly span."""
  kept: list[np.ndarray] = []
  basis: list[np.ndarray] = []
  for c in columns:
    e = c - sum((o @ c) * o for o in basis)
    if np.linalg.norm(e) > 1e-6:
      kept.append(c)
      basis.append(e / np.linalg.norm(e))
  return np.array(kept).reshape(len(kept), -1)


def _complete(p_rxs, columns, delta, rng, budget, tries):
  """Columns missing from ``columns`` (the known ``c_u``, ``u`` in ``F``).

  Each row is ``sum_F D_ju a_u + sum_missing D_jt a_t``; ``D_ju = P_j c_u``
  is known, and ``a_u`` is known up to ``w_u`` in the complement ``N`` of
  the known columns (where the missing ``a_t`` lie). With the ``w_u``
  (:func:`_known_offsets`), subtracting the known twins leaves the
  missing twins' own problem in ``N``; its columns ``f`` extend to
  ``N f - sum_u (f . w_u) c_u``.
  """
  c_kxs = _independent(columns)
  while c_kxs.shape[0]:
    k = c_kxs.shape[0]
    n_sxd = np.linalg.svd(c_kxs)[2][k:].T
    d_rxk = p_rxs @ c_kxs.T
    active = np.abs(d_rxk) > 10 * delta
    dual_kxs = np.linalg.solve(c_kxs @ c_kxs.T, c_kxs)
    y_rxd = (p_rxs - d_rxk @ dual_kxs) @ n_sxd
    w_kxd, solved = _known_offsets(y_rxd, d_rxk, active, delta)
    if solved.all():
      break
    # A known twin active only beside missing ones joins them.
    c_kxs = c_kxs[solved]
  if not c_kxs.shape[0]:
    return []
  found = []
  for f in _flags(y_rxd - d_rxk @ w_kxd, delta, rng, budget, tries):
    column = n_sxd @ f - (w_kxd @ f) @ c_kxs
    found.append(column / np.linalg.norm(column))
  return found


def _extend(p_rxs, c_s, delta, rng, budget, tries):
  """Columns from the rows where the twin of column ``c`` is inactive (a
  problem one dimension down), each extended by its shared ``gamma``."""
  on = np.abs(p_rxs @ c_s) <= 10 * delta
  perp_sxs1 = np.linalg.svd(c_s[None, :])[2][1:].T
  off_rxs = p_rxs[~on]
  found = []
  for f in _flags(p_rxs[on] @ perp_sxs1, delta, rng, budget, tries):
    v = perp_sxs1 @ f
    gamma = _shared_ratio(-(off_rxs @ v), off_rxs @ c_s, delta)
    if gamma is not None:
      found.append((v + gamma * c_s) / np.linalg.norm(v + gamma * c_s))
  return found


def _flags(p_rxs, delta, rng, budget, tries):
  """Distinct normals of ``tries`` random peelings (each one of
  ``budget``); a one-dimensional problem is its own column."""
  if p_rxs.shape[1] == 1:
    return [np.ones(1)] if p_rxs.shape[0] else []
  found: list[np.ndarray] = []
  for t in range(tries):
    if budget[0] <= 0 or p_rxs.shape[0] < p_rxs.shape[1] - 1:
      break
    budget[0] -= 1
    normals, flag_sxs, starts = _flag_normals(p_rxs, delta, rng, t == 0)
    if normals and flag_sxs.shape[1] == p_rxs.shape[1]:
      normals += _back_substitute(
        p_rxs, normals, flag_sxs, starts, delta, rng, budget, tries
      )
    found += [c for c in normals if _is_new(found, c)]
  return found


def _peel(p_rxs, delta, known, rng, budget, tries):
  """:func:`peel_span`: peelings of the whole span, then, until nothing
  new comes, completion from all known columns (:func:`_complete`) and,
  when that stalls, the hyperplane of one more known column
  (:func:`_extend`)."""
  s = p_rxs.shape[1]
  columns = [c / np.linalg.norm(c) for c in known]
  columns += [
    c for c in _flags(p_rxs, delta, rng, budget, tries) if _is_new(columns, c)
  ]
  extended = 0
  while 0 < len(columns) < s and budget[0] > 0:
    new = [
      c
      for c in _complete(p_rxs, columns, delta, rng, budget, tries)
      if _is_new(columns, c)
    ]
    while not new and extended < len(columns) and budget[0] > 0:
      extended += 1
      new = [
        c
        for c in _extend(
          p_rxs, columns[extended - 1], delta, rng, budget, tries
        )
        if _is_new(columns, c)
      ]
    if not new:
      break
    for c in new:
      if _is_new(columns, c):
        columns.append(c)
  return columns


def peel_span(
  p_rxs: np.ndarray,
  delta: float,
  *,
  known_kxs: np.ndarray | None = None,
  seed: int = 0,
  tries: int = 6,
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
  columns = _peel(p_rxs, float(delta), known, rng, [64 + 16 * s], tries)
  return np.array(
    columns[: len(known)]
    + [
      c
      for c in (_refit(c, p_rxs, delta) for c in columns[len(known) :])
      if c is not None
    ],
    np.float64,
  ).reshape(-1, s)


def _refit(c_s, p_rxs, delta):
  """The null vector of the rows on which ``c`` vanishes, if they have
  rank ``s - 1`` (else ``c`` is a mixture of several twins: ``None``)."""
  rows = np.abs(p_rxs @ c_s) <= 10 * delta
  if rows.sum() < c_s.size - 1:
    return None
  _, sv, vt = np.linalg.svd(p_rxs[rows])
  if sv.size < c_s.size or sv[-2] <= 1e-8 * sv[0]:
    return None
  return vt[-1]
