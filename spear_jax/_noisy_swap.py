"""Choosing the noisy attack's ``b`` columns by their ReLU patterns.

Under DP-SGD (a FedSGD gradient plus noise) the support of each column
``d_i`` of ``D`` is exactly the set of neurons its sample ``x_i`` switches
on at the server's weights. The noisy search's pool holds, beside the true
columns, mixtures with as many near-zero rows: near-twins (faces with input
cosine 0.96 and more) have columns of nearly equal values, so their
difference is small on almost every row and passes the near-zero test on
more rows than either twin. Picking the ``b`` columns with the most near
zeros then takes such a difference, and the coupled solve ``X^T = D^+ G``
spreads it over both twins (faces, b = 8, sigma = 1e-4: 25.5 and 15.8 dB
where the true support gives 53 and 56 dB).

A set of ``b`` directions ``Y`` (whitened coordinates, ``M = U_b S_b``)
fixes every input of the rank-``b`` model: ``D = M Y diag(alpha)`` with
``alpha = Y^{-1} M^+ g`` from the bias gradient ``g``, and
``x_i = V_b (Y^{-1})_i^T / alpha_i``, so its pre-activations are
``Z = W V_b Y^{-T} diag(1/alpha) + beta``. The *pattern mismatch* of the
set is the number of (neuron, sample) pairs where the column's near-zero
test and the sample's inactivity disagree; the true set scores about one
per column (rows near the noise floor or the ReLU's kink), a set holding a
twin difference tens per twin. Starting from the greedy selection, single
swaps of a selected direction for a pooled one are taken while they lower
the mismatch (best swap first), keeping every column independent beyond
the noise as :func:`spear_jax._noisy._select` does.
"""

import time
from typing import NamedTuple

import numpy as np

# Selected columns tried per sweep, worst mismatch first (bounds the cost
# at large b: each tried position evaluates the whole pool).
_POSITIONS = 8
_MAX_SWEEPS = 16
# Each accepted swap lowers the mismatch, so stopping early is safe; this
# bounds the cost on pools of 10^4 directions (b = 16: 5-10 s a sweep on
# two cores).
_TIME_LIMIT_S = 60.0
_CHUNK_ENTRIES = 4_000_000


def independence_cutoff(noise_std: float, m: int) -> float:
  """Residual a column needs off the others' span to count as independent
  beyond the noise: a mixture's residual is the noise alone, about
  ``s sqrt(m)``."""
  return 4.0 * noise_std * np.sqrt(m)


class _Model(NamedTuple):
  """What every candidate set shares (host arrays)."""

  near_kxm: np.ndarray  # near-zero rows of each pooled direction
  a_mxb: np.ndarray  # W V_b
  gamma_b: np.ndarray  # M^+ g
  bias_m: np.ndarray
  inv_sv_b: np.ndarray  # 1 / singular values
  cutoff: float  # independence beyond the noise, as in _select


def _evaluate(model, y_bxb, near_bxm):
  """Per-column mismatch of one set (``None`` when it is singular or a
  scale vanishes): ``Z = A Y^{-T} diag(1/alpha) + beta``."""
  try:
    p_bxb = np.linalg.inv(y_bxb)
  except np.linalg.LinAlgError:
    return None
  alpha_b = p_bxb @ model.gamma_b
  if np.any(np.abs(alpha_b) <= 1e-9 * np.abs(alpha_b).max()):
    return None
  z_bxm = (p_bxb @ model.a_mxb.T) / alpha_b[:, None] + model.bias_m[None]
  return np.sum(near_bxm != (z_bxm <= 0), axis=1)


def _swap_scores(model, chosen_b, pos, cands_t, units_kxb):
  """Per-column mismatch (``t x b``; ``-1`` rows: invalid) of the sets
  with ``cands_t`` at ``pos``, by rank-one updates of ``P = Y^{-1}``.

  With ``u = y_c - y_pos`` and ``w = P u``: ``P' = P - w P_pos / (1 +
  w_pos)``, so the pre-activations and scales move along one direction
  each, and ``P'_pos = P_pos / (1 + w_pos)`` gives the new column's
  residual off the others' span, ``|1 + w_pos| / |P_pos S^{-1}|``, which
  must exceed the noise cutoff. In chunks of ``_CHUNK_ENTRIES``.
  """
  y_bxb = units_kxb[chosen_b].T
  t, b = cands_t.shape[0], y_bxb.shape[0]
  out = np.full((t, b), -1, np.int64)
  try:
    p_bxb = np.linalg.inv(y_bxb)
  except np.linalg.LinAlgError:
    return out
  zp_bxm = p_bxb @ model.a_mxb.T
  alpha_b = p_bxb @ model.gamma_b
  row_b = p_bxb[pos]
  w_txb = (units_kxb[cands_t] - y_bxb[:, pos][None]) @ p_bxb.T
  denom_t = 1.0 + w_txb[:, pos]
  residual_t = np.abs(denom_t) / np.linalg.norm(row_b * model.inv_sv_b)
  near_bxm = model.near_kxm[chosen_b]
  step = max(1, _CHUNK_ENTRIES // zp_bxm.size)
  for i in range(0, t, step):
    sl = slice(i, i + step)
    f_txb = w_txb[sl] / np.where(denom_t[sl] == 0, np.inf, denom_t[sl])[:, None]
    alpha_txb = alpha_b[None] - f_txb * (row_b @ model.gamma_b)
    z_txbxm = zp_bxm[None] - f_txb[:, :, None] * zp_bxm[pos][None, None]
    z_txbxm = z_txbxm / alpha_txb[:, :, None] + model.bias_m[None, None]
    near_txbxm = np.repeat(near_bxm[None], f_txb.shape[0], axis=0)
    near_txbxm[:, pos] = model.near_kxm[cands_t[sl]]
    mismatch = np.sum(near_txbxm != (z_txbxm <= 0), axis=2)
    scale = np.abs(alpha_txb).max(axis=1, keepdims=True)
    valid = (
      (residual_t[sl] >= model.cutoff)
      & (denom_t[sl] != 0)
      & np.all(np.abs(alpha_txb) > 1e-9 * scale, axis=1)
    )
    out[sl][valid] = mismatch[valid]
  return out


def _best_swap(model, chosen_b, current_b, units_kxb):
  """The single swap of lowest total mismatch over the ``_POSITIONS``
  worst columns: ``(total, chosen, per-column)``, or ``None``."""
  best = None
  others = np.setdiff1d(np.arange(units_kxb.shape[0]), chosen_b)
  if not others.size:
    return None
  for pos in np.argsort(-current_b, kind="stable")[:_POSITIONS]:
    if current_b[pos] == 0:
      continue
    scores = _swap_scores(model, chosen_b, pos, others, units_kxb)
    sums = np.where(scores.min(axis=1) >= 0, scores.sum(axis=1), np.inf)
    i = int(np.argmin(sums))
    if np.isfinite(sums[i]) and (best is None or sums[i] < best[0]):
      chosen = chosen_b.copy()
      chosen[pos] = others[i]
      best = (int(sums[i]), chosen, scores[i])
  return best


def swap_by_pattern(
  chosen_b: np.ndarray,
  directions_kxb: np.ndarray,
  m_mxb: np.ndarray,
  vt_bxn: np.ndarray,
  sv_b: np.ndarray,
  bias_grad_m: np.ndarray,
  weight_mxn: np.ndarray,
  bias_m: np.ndarray,
  noise_std: float,
  near_zero: float,
) -> tuple[np.ndarray, int, int]:
  """Swaps pooled directions into the selection while the mismatch drops.

  Args:
    chosen_b: indices into the pool of the ``b`` selected directions.
    directions_kxb: the pool's directions (whitened coordinates).
    m_mxb: the whitened gradient ``U_b S_b``.
    vt_bxn: its right singular vectors ``V_b^T``.
    sv_b: its singular values.
    bias_grad_m: the (noisy) bias gradient.
    weight_mxn: the layer's ``W`` at the server.
    bias_m: its ``beta``.
    noise_std: ``s``.
    near_zero: the near-zero threshold in units of ``s``.

  Returns:
    ``(chosen, before, after)``: the new indices and the set's total
    mismatch before and after the swaps.
  """
  units = directions_kxb / np.linalg.norm(directions_kxb, axis=1)[:, None]
  model = _Model(
    near_kxm=np.abs(units @ m_mxb.T) < near_zero * noise_std,
    a_mxb=weight_mxn @ vt_bxn.T,
    gamma_b=(m_mxb.T @ bias_grad_m) / sv_b**2,
    bias_m=bias_m,
    inv_sv_b=1.0 / sv_b,
    cutoff=independence_cutoff(noise_std, m_mxb.shape[0]),
  )
  chosen = np.asarray(chosen_b, np.int64).copy()
  current = _evaluate(model, units[chosen].T, model.near_kxm[chosen])
  if current is None:
    return chosen, -1, -1
  before = int(current.sum())
  total, start = before, time.perf_counter()
  for _ in range(_MAX_SWEEPS):
    if time.perf_counter() - start > _TIME_LIMIT_S:
      break
    swap = _best_swap(model, chosen, current, units)
    if swap is None or swap[0] >= total:
      break
    total, chosen, current = swap
  return chosen, before, total
