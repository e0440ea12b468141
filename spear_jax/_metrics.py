"""Matching reconstructions to the ground truth, and per-sample errors.

A gradient does not reveal the order of the batch, so reconstructions are
first matched to the true samples by the Hungarian algorithm on relative
L2 distances.
"""

import numpy as np

__all__ = ["hungarian", "match_and_score"]


def hungarian(cost: np.ndarray) -> np.ndarray:
  """Minimum-cost perfect matching of a square cost matrix.

  Shortest augmenting paths with row/column potentials (Kuhn-Munkres in
  ``O(b^3)``).

  Args:
    cost: ``(b, b)`` costs; ``cost[i, j]`` of assigning row ``i`` to ``j``.

  Returns:
    ``assignment`` with ``assignment[i]`` the column of row ``i``.
  """
  cost = np.asarray(cost, np.float64)
  n = cost.shape[0]
  if cost.shape != (n, n):
    raise ValueError(f"cost must be square, got {cost.shape}.")
  u = np.zeros(n + 1)
  v = np.zeros(n + 1)
  owner = np.zeros(n + 1, int)  # owner[j]: row matched to column j (1-based)
  way = np.zeros(n + 1, int)
  for i in range(1, n + 1):
    owner[0] = i
    j0 = 0
    minv = np.full(n + 1, np.inf)
    used = np.zeros(n + 1, bool)
    while True:
      used[j0] = True
      i0 = owner[j0]
      free = ~used[1:]
      reduced = cost[i0 - 1] - u[i0] - v[1:]
      better = free & (reduced < minv[1:])
      minv[1:][better] = reduced[better]
      way[1:][better] = j0
      candidates = np.where(free, minv[1:], np.inf)
      j1 = int(np.argmin(candidates)) + 1
      delta = candidates[j1 - 1]
      u[owner[used]] += delta
      v[used] -= delta
      minv[1:][free] -= delta
      j0 = j1
      if owner[j0] == 0:
        break
    while j0:
      j1 = way[j0]
      owner[j0] = owner[j1]
      j0 = j1
  assignment = np.zeros(n, int)
  for j in range(1, n + 1):
    assignment[owner[j] - 1] = j - 1
  return assignment


def match_and_score(recovered_bxn, truth_bxn, exact_rtol: float = 1e-8):
  """Matches recovered samples to the truth and scores each one.

  Args:
    recovered_bxn: reconstructions, one per row, in any order.
    truth_bxn: ground truth, one per row.
    exact_rtol: a sample is exact if its relative L2 error is below this.

  Returns:
    A dict with ``order`` (the truth row of each reconstruction),
    ``relative_error`` and ``max_abs_error`` per reconstruction, and
    ``exact`` flags.
  """
  rec = np.asarray(recovered_bxn, np.float64)
  true = np.asarray(truth_bxn, np.float64)
  if rec.shape != true.shape:
    raise ValueError(f"shape mismatch: {rec.shape} vs {true.shape}.")
  norms = np.linalg.norm(true, axis=1)
  diff = rec[:, None, :] - true[None, :, :]
  rel = np.linalg.norm(diff, axis=2) / np.maximum(norms[None, :], 1e-300)
  order = hungarian(np.where(np.isfinite(rel), rel, 1e300))
  relative_error = rel[np.arange(rec.shape[0]), order]
  max_abs = np.max(np.abs(rec - true[order]), axis=1)
  return {
    "order": order,
    "relative_error": relative_error,
    "max_abs_error": max_abs,
    "exact": relative_error < exact_rtol,
  }
