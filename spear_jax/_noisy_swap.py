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

from typing import NamedTuple

import numpy as np

# Selected columns tried per sweep, worst mismatch first (bounds the cost
# at large b: each tried position evaluates the whole pool).
_POSITIONS = 8
_MAX_SWEEPS = 16
_CHUNK_ENTRIES = 4_000_000


class _Model(NamedTuple):
  """What every candidate set shares (host arrays)."""

  near_kxm: np.ndarray  # near-zero rows of each pooled direction
  a_mxb: np.ndarray  # W V_b
  gamma_b: np.ndarray  # M^+ g
  bias_m: np.ndarray
  inv_sv_b: np.ndarray  # 1 / singular values
  cutoff: float  # independence beyond the noise, as in _select


def _evaluate(model, sets_txb, directions_kxb, pos=None):
  """Per set: the per-column mismatch (``t x b``; ``-1`` rows: invalid).

  With ``pos`` the column there must be independent of the others beyond
  the noise. In chunks of about ``_CHUNK_ENTRIES`` pre-activations.
  """
  m, b = model.a_mxb.shape
  step = max(1, _CHUNK_ENTRIES // (m * b))
  return np.concatenate(
    [
      _evaluate_chunk(model, sets_txb[i : i + step], directions_kxb, pos)
      for i in range(0, sets_txb.shape[0], step)
    ]
  )


def _evaluate_chunk(model, sets_txb, directions_kxb, pos):
  y_txbxb = np.swapaxes(directions_kxb[sets_txb], 1, 2)
  t, b = sets_txb.shape
  out = np.full((t, b), -1, np.int64)
  sv_t = np.linalg.svd(y_txbxb, compute_uv=False)
  ok = sv_t[:, -1] > 1e-12 * sv_t[:, 0]
  if not ok.any():
    return out
  p_txbxb = np.linalg.inv(y_txbxb[ok])
  alpha_txb = p_txbxb @ model.gamma_b
  scale = np.abs(alpha_txb).max(axis=1, keepdims=True)
  valid = np.all(np.abs(alpha_txb) > 1e-9 * scale, axis=1)
  if pos is not None:
    # Residual of the column off the others' span: 1 / |row of (M Y)^+|.
    residual = 1.0 / np.linalg.norm(p_txbxb[:, pos] * model.inv_sv_b, axis=1)
    valid &= residual >= model.cutoff
  z_txbxm = p_txbxb @ model.a_mxb.T  # batched BLAS, not an einsum loop
  z_txbxm = z_txbxm / alpha_txb[:, :, None] + model.bias_m[None, None, :]
  near_txbxm = model.near_kxm[sets_txb[ok]]
  mismatch = np.sum(near_txbxm != (z_txbxm <= 0), axis=2)
  rows = np.flatnonzero(ok)
  out[rows[valid]] = mismatch[valid]
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
    sets = np.repeat(chosen_b[None], others.size, axis=0)
    sets[:, pos] = others
    scores = _evaluate(model, sets, units_kxb, pos)
    sums = np.where(scores.min(axis=1) >= 0, scores.sum(axis=1), np.inf)
    i = int(np.argmin(sums))
    if np.isfinite(sums[i]) and (best is None or sums[i] < best[0]):
      best = (int(sums[i]), sets[i], scores[i])
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
    cutoff=4.0 * noise_std * np.sqrt(m_mxb.shape[0]),
  )
  chosen = np.asarray(chosen_b, np.int64).copy()
  current = _evaluate(model, chosen[None], units)[0]
  before = int(current.sum()) if current.min() >= 0 else -1
  if before < 0:
    return chosen, before, before
  total = before
  for _ in range(_MAX_SWEEPS):
    swap = _best_swap(model, chosen, current, units)
    if swap is None or swap[0] >= total:
      break
    total, chosen, current = swap
  return chosen, before, total
