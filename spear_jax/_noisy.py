"""Noise-aware SPEAR for DP-SGD gradients.

A DP-SGD client shares ``weight_grad = D X^T + E`` and ``bias_grad = D 1 +
e`` with ``E``, ``e`` iid ``N(0, s^2)`` (``s = sigma C / b``: clipped
per-example gradients summed, Gaussian noise ``sigma C`` added, divided by
``b``). The rank is no longer ``b`` and no entry of ``D`` is exactly zero,
so the exact attack cannot run; the structure survives statistically.
:func:`estimate_noise` reads ``s`` and ``b`` off the singular values (the
noise bulk ends at the Marchenko-Pastur edge ``s (sqrt(m) + sqrt(n))``). In
whitened coordinates ``M = U_b S_b = weight_grad V_b`` every row carries
isotropic noise ``N(0, s^2 I_b)``, so for a unit direction ``y`` the
statistic ``|M_j y| / s`` is half-normal on the zero set of the column
``M y`` of ``D``: "near zero" (``< 3``) replaces SPEAR's exact zero test.
Proposals (SPEAR's ``(b-1)``-row kernels, or SPEAR++'s l1 search) are
refined by total least squares on their inferred zero sets, ``b``
independent ones are selected, their scales are fitted to the bias
gradient, and the batch is polished by alternating least squares of the
whole model ``(weight_grad, bias_grad) = D (X^T, 1)`` with ``D``'s zeros
fixed; with the layer's weights the zero set of each sample is also
intersected with its ReLU-inactive set at the server's weights (in DP-SGD
the support of ``d_i`` is exactly the active set).

References:
  Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
  Batches in Federated Learning. NeurIPS 2024.
  https://arxiv.org/abs/2403.03945
"""

import functools
import time
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._config import AttackConfig
from spear_jax._dictionary import learn_directions
from spear_jax._linalg import null_vector
from spear_jax._linalg import rows_gram_eigh
from spear_jax._noisy_swap import independence_cutoff
from spear_jax._noisy_swap import swap_by_pattern
from spear_jax._problem import structure_floor
from spear_jax._sampling import sample_rows
from spear_jax._selection import complete_basis
from spear_jax._types import Array
from spear_jax._types import ArrayLike
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int
from spear_jax._types import InversionResult
from spear_jax._types import InversionStats
from spear_jax._types import PRNGKeyArray

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "EDGE_FACTOR",
  "NEAR_ZERO",
  "NoStructureError",
  "NoiseEstimate",
  "NoiseReport",
  "estimate_noise",
  "invert_noisy",
  "invert_noisy_with_report",
  "marchenko_pastur_edge",
  "propose_noisy",
  "refine_direction",
]

# The noise bulk of an m x n Gaussian matrix ends at s (sqrt(m) + sqrt(n));
# 5% above it leaves room for its Tracy-Widom fluctuations.
EDGE_FACTOR = 1.05
# |M_j y| / s below this is "near zero" (a half-normal exceeds 3 w.p. 0.27%).
NEAR_ZERO = 3.0
# Variance of a standard normal truncated to [-3, 3].
_TRUNCATED_VARIANCE = 0.9733
_METHODS = ("spear", "spearpp", "spear++")


class NoiseEstimate(NamedTuple):
  """Noise level and rank of a noisy weight gradient.

  Attributes:
    noise_std: the entrywise noise ``s`` (estimated, or the given one).
    rank: ``b``, the singular values above the edge (or the given size).
    edge: the Marchenko-Pastur edge ``1.05 s (sqrt(m) + sqrt(n))``.
    singular_values: all singular values of the weight gradient.
  """

  noise_std: float
  rank: int
  edge: float
  singular_values: np.ndarray


class NoiseReport(NamedTuple):
  """What the noisy attack can say about its own reconstruction.

  Attributes:
    noise_std: the noise level ``s`` used.
    rank: the batch size ``b`` used.
    edge: the Marchenko-Pastur edge of ``s``.
    consistent: per sample, whether its column's residual on its zero set
      is consistent with pure noise (chi-square test) and its zero set has
      a plausible size (at least half the median of the batch's).
    near_zeros: per sample, the size of its zero set (near-zero rows).
    chi2: per sample, the residual on the zero set in units of ``s^2``.
    dof: per sample, the residual's degrees of freedom
      (``near_zeros - (b - 1)``).
  """

  noise_std: float
  rank: int
  edge: float
  consistent: np.ndarray
  near_zeros: np.ndarray
  chi2: np.ndarray
  dof: np.ndarray


def marchenko_pastur_edge(noise_std: float, m: int, n: int) -> float:
  r"""``1.05 s (\sqrt m + \sqrt n)``: above it, a singular value is signal."""
  return EDGE_FACTOR * noise_std * (np.sqrt(m) + np.sqrt(n))


@jax.jit
def _svd(grad_mxn):
  with jax.default_matmul_precision("highest"):
    return jnp.linalg.svd(grad_mxn, full_matrices=False)


def _tail_std(sv: np.ndarray, k: int, m: int, n: int) -> float:
  """``s`` from the singular values beyond ``k``: their energy per entry."""
  dof = max((m - k) * (n - k), 1)
  return float(np.sqrt(np.sum(np.square(sv[k:])) / dof))


def _estimate_from_values(sv, m, n, noise_std, batch_size, iterations=100):
  """The fixed point of ``k = #{sv > edge(s)}``, ``s = tail_std(k)``."""
  r = sv.shape[0]
  if noise_std is not None:
    s = float(noise_std)
  else:
    k = 0 if batch_size is None else batch_size
    s = _tail_std(sv, k, m, n)
    for _ in range(iterations if batch_size is None else 0):
      new_k = min(int(np.sum(sv > marchenko_pastur_edge(s, m, n))), r - 1)
      s = _tail_std(sv, new_k, m, n)
      if new_k == k:
        break
      k = new_k
  edge = marchenko_pastur_edge(s, m, n)
  above = int(np.sum(sv > edge))
  rank = above if batch_size is None else int(batch_size)
  if above == 0 or rank >= r // 2 or (batch_size is None and above >= r // 2):
    raise NoStructureError(
      "weight_grad has no low-rank structure above the noise: "
      f"{above} of {r} singular values exceed the Marchenko-Pastur edge "
      f"{edge:.3g} of the noise level {s:.3g} (the largest is "
      f"{sv[0]:.3g}); the noise is too large for any sample to be "
      "recovered."
    )
  return NoiseEstimate(s, rank, edge, sv)


class NoStructureError(ValueError):
  """The noise hides every sample: no singular value above its edge."""


def _as_matrix(weight_grad):
  array = jnp.asarray(weight_grad)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    array = array.astype(jnp.result_type(float))
  if array.ndim != 2 or min(array.shape) < 2:
    raise ValueError(
      f"weight_grad must be 2-D (m, n), got shape {tuple(array.shape)}."
    )
  if not np.isfinite(np.asarray(array)).all():
    raise ValueError("weight_grad contains NaN or infinite values.")
  return array


def estimate_noise(
  weight_grad: ArrayLike,
  *,
  noise_std: float | None = None,
  batch_size: int | None = None,
) -> NoiseEstimate:
  r"""Noise level ``s`` and batch size ``b`` of ``D X^T + E``.

  .. math:: k = \#\{i : \sigma_i > 1.05\, s (\sqrt m + \sqrt n)\},\quad
     s^2 = \frac{\sum_{i > k} \sigma_i^2}{(m - k)(n - k)}

  iterated from ``k = 0`` to a fixed point (the first ``s`` overestimates,
  so ``k`` grows and ``s`` falls until they agree). A given ``noise_std``
  or ``batch_size`` is used as is.

  Args:
    weight_grad: the noisy weight gradient (``m x n``).
    noise_std: the known ``s``, or ``None`` to estimate it.
    batch_size: the known ``b``, or ``None`` to count it.

  Returns:
    A :class:`NoiseEstimate`.

  Raises:
    ValueError: on a non-matrix or non-finite gradient, or when no singular
      value (or half of them or more) exceeds the edge: the noise is so
      large that no low-rank structure remains.
  """
  grad = _as_matrix(weight_grad)
  m, n = grad.shape
  if noise_std is not None and not noise_std > 0:
    raise ValueError(f"noise_std must be positive, got {noise_std}.")
  if batch_size is not None and not 1 <= batch_size < min(m, n):
    raise ValueError(f"batch_size {batch_size} out of range for {(m, n)}.")
  sv = np.asarray(_svd(grad)[1])
  return _estimate_from_values(sv, m, n, noise_std, batch_size)


def _near_zero(v_m, noise_std):
  return jnp.abs(v_m) < NEAR_ZERO * noise_std


def propose_noisy(
  key: PRNGKeyArray,
  m_mxb: Float[Array, "m b"],
  rows_m: Int[Array, " m"],
  num_rows: Int[Array, ""],
  noise_std: Float[Array, ""],
) -> tuple[Float[Array, " b"], Int[Array, ""]]:
  r"""One SPEAR proposal in whitened coordinates and its near-zero count.

  .. math:: y \in \ker(M_A),\ \|y\| = 1, \qquad
     c(y) = \#\{j : |M_j y| < 3 s\}

  Args:
    key: PRNG key of this proposal.
    m_mxb: whitened gradient ``M = U_b S_b``.
    rows_m: indices of the rows to sample from, padded to length ``m``.
    num_rows: how many of them are valid.
    noise_std: ``s``.

  Returns:
    ``(y, near_zeros)``.
  """
  b = m_mxb.shape[1]
  rows_k = sample_rows(key, rows_m, num_rows, b - 1)
  y_b = null_vector(m_mxb[rows_k])
  v_m = jnp.dot(m_mxb, y_b, precision=_HI)
  return y_b, jnp.sum(_near_zero(v_m, noise_std))


@functools.partial(
  jax.jit, static_argnames=("block_size", "chunk_size", "keep")
)
def _propose_block(
  key, m_mxb, rows_m, num_rows, noise_std, *, block_size, chunk_size, keep
):
  """``block_size`` proposals; ``keep`` of the hits, drawn at random.

  A hit has at least the structure floor of near zeros and at least half
  the block's best count. Taking the ``keep`` *best* instead lets the
  sparsest, most frequently proposed columns crowd out the rest: with the
  default block of 8192 and ``keep = 256`` a b = 4 problem then never
  found its third and fourth columns, even after 10^6 proposals; a purely
  uniform draw of the hits lost b = 16 at sigma = 1e-4 (13.7 dB on one
  gradient). Half the slots take the best counts, half a uniform draw of
  the remaining hits (as SPEAR's exact filter does).
  """
  pick_key, key = jax.random.split(key)
  keys = jax.random.split(key, block_size)
  keys = keys.reshape(block_size // chunk_size, chunk_size)
  batched = jax.vmap(propose_noisy, in_axes=(0, None, None, None, None))
  directions, near = jax.lax.map(
    lambda k: batched(k, m_mxb, rows_m, num_rows, noise_std), keys
  )
  b = m_mxb.shape[1]
  near = near.reshape(block_size)
  dtype = noise_std.dtype
  rows = num_rows.astype(dtype)
  floor = (b - 1) + jnp.maximum(3.0, jnp.ceil(0.02 * rows))
  counts = near.astype(dtype)
  hit = (counts >= floor) & (2.0 * counts >= jnp.max(counts))
  score = counts / (jnp.max(counts) + 1.0)
  draw = jax.random.uniform(pick_key, near.shape, dtype)
  # Half the slots go to the best counts (the old rule, strong at b = 16),
  # half to a uniform draw of the other hits (the columns the best crowd
  # out).
  best = keep // 2
  _, top = jax.lax.top_k(score, best)
  taken = jnp.zeros(near.shape, bool).at[top].set(True)
  priority = jnp.where(
    hit & ~taken, 1.0 + draw, jnp.where(taken, score - 2.0, score)
  )
  _, rest = jax.lax.top_k(priority, keep - best)
  index = jnp.concatenate([top, rest])
  return directions.reshape(block_size, b)[index], near[index]


class Refined(NamedTuple):
  """A direction refined by total least squares on its zero set."""

  direction: Float[Array, " b"]
  near_zeros: Int[Array, ""]
  chi2: Float[Array, ""]
  gap: Float[Array, ""]


def refine_direction(
  y_b: Float[Array, " b"],
  m_mxb: Float[Array, "m b"],
  noise_std: Float[Array, ""],
  allowed_m: Bool[Array, " m"],
  iterations: int = 4,
) -> Refined:
  r"""Total least squares of a column on its inferred zero set, iterated.

  With ``Z = {j allowed : |M_j y| < 3 s}`` the maximum-likelihood
  direction (isotropic noise on the rows of ``M``) is the eigenvector of
  ``M_Z^T M_Z`` with the smallest eigenvalue; ``Z`` is then recomputed.

  Args:
    y_b: a unit direction (a proposal or a search end point).
    m_mxb: whitened gradient ``M``.
    noise_std: ``s``.
    allowed_m: rows that may be in the zero set (e.g. the ReLU-inactive
      rows of the sample at the server's weights).
    iterations: refits.

  Returns:
    A :class:`Refined`: the unit direction, the size of its zero set,
    ``chi2 = lambda_min / s^2`` (the residual on ``Z``) and ``gap =
    lambda_2 / s^2`` (how well ``Z`` pins the direction down).
  """
  eigvals = jnp.zeros(y_b.shape, y_b.dtype)
  for _ in range(iterations):
    v_m = jnp.dot(m_mxb, y_b, precision=_HI)
    zero_m = _near_zero(v_m, noise_std) & allowed_m
    eigvals, eigvecs = rows_gram_eigh(m_mxb, zero_m)
    new = eigvecs[:, 0]
    sign = jnp.where(jnp.dot(new, y_b, precision=_HI) < 0, -1.0, 1.0)
    y_b = sign.astype(new.dtype) * new
  v_m = jnp.dot(m_mxb, y_b, precision=_HI)
  zero_m = _near_zero(v_m, noise_std) & allowed_m
  var = noise_std * noise_std
  return Refined(y_b, jnp.sum(zero_m), eigvals[0] / var, eigvals[1] / var)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _refine_many(y_kxb, m_mxb, noise_std, allowed_kxm, *, iterations):
  return jax.vmap(refine_direction, in_axes=(0, None, None, 0, None))(
    y_kxb, m_mxb, noise_std, allowed_kxm, iterations
  )


class _Pool(NamedTuple):
  """Distinct refined directions (host arrays)."""

  directions: np.ndarray
  near_zeros: np.ndarray
  chi2: np.ndarray
  gap: np.ndarray


def _empty_pool(b, dtype):
  z = np.zeros((0,), np.int64)
  return _Pool(np.zeros((0, b), dtype), z, z.astype(dtype), z.astype(dtype))


def _columns(m_np, y_kxb):
  """Unit columns ``M y / ||M y||`` (the directions' columns of ``D``)."""
  cols = m_np @ y_kxb.T
  return cols / np.maximum(np.linalg.norm(cols, axis=0), 1e-300)


def _merge(pool, refined, m_np, floor, same=0.99):
  """Adds the refined directions with ``floor`` or more near zeros.

  Two directions whose columns of ``D`` have ``|cos| > same`` are one; the
  one with more near zeros is kept.

  Returns:
    ``(pool, added)``: the new pool and how many distinct ones were new.
  """
  new = _Pool(*(np.asarray(a) for a in refined))
  keep = new.near_zeros >= floor
  new = _Pool(*(a[keep] for a in new))
  order = np.argsort(-new.near_zeros, kind="stable")
  rows = [tuple(a) for a in zip(*pool, strict=True)]
  cols = _columns(m_np, pool.directions) if rows else None
  added = 0
  for i in order:
    entry = tuple(a[i] for a in new)
    col = _columns(m_np, new.directions[i : i + 1])
    if cols is not None and cols.shape[1]:
      cos = np.abs(cols.T @ col[:, 0])
      match = int(np.argmax(cos))
      if cos[match] > same:
        if entry[1] > rows[match][1]:
          rows[match] = entry
          cols[:, match] = col[:, 0]
        continue
    rows.append(entry)
    cols = col if cols is None else np.concatenate([cols, col], axis=1)
    added += 1
  if not rows:
    return pool, 0
  return _Pool(*(np.stack(a) for a in zip(*rows, strict=True))), added


def _threshold(pool, setup):
  """Fewest near zeros a selected column may have: the structure floor,
  or half the median count of the ``b`` sparsest pooled directions."""
  top = np.sort(pool.near_zeros)[::-1][: setup.b]
  return max(setup.floor, int(np.ceil(0.5 * np.median(top))))


def _select(pool, setup):
  """Most near zeros first; keep the columns independent beyond the noise.

  A candidate is kept when its column ``M y`` (``||y|| = 1``) has a
  residual of norm at least ``4 s sqrt(m)`` outside the span of the kept
  columns: a mixture of kept columns has only the noise ``N y`` there
  (norm about ``s sqrt(m)``), so noise cannot make it look independent.
  """
  b = setup.b
  if pool.near_zeros.shape[0] == 0:
    return np.zeros((0,), int)
  tau = _threshold(pool, setup)
  m = setup.m_np.shape[0]
  cutoff = independence_cutoff(float(setup.noise_std), m)
  basis, chosen = np.zeros((m, 0)), []
  for i in np.argsort(-pool.near_zeros, kind="stable"):
    if pool.near_zeros[i] < tau or len(chosen) == b:
      break
    y = pool.directions[i] / np.linalg.norm(pool.directions[i])
    v = setup.m_np @ y
    for _ in range(2):
      v = v - basis @ (basis.T @ v)
    norm = np.linalg.norm(v)
    if norm >= cutoff:
      basis = np.concatenate([basis, (v / norm)[:, None]], axis=1)
      chosen.append(int(i))
  return np.asarray(chosen, int)


def _consistent(near_zeros, chi2, gap, b):
  """Residual consistent with noise and a plausible, well-posed zero set."""
  dof = np.maximum(near_zeros - (b - 1), 1).astype(np.float64)
  mean = _TRUNCATED_VARIANCE * dof
  ok_chi2 = np.abs(chi2 - mean) <= 5.0 * np.sqrt(2.0 * dof) + 5.0
  ok_gap = gap > mean + 5.0 * np.sqrt(2.0 * dof) + 5.0
  median = np.median(near_zeros) if near_zeros.size else 0
  ok_size = near_zeros >= max(b + 3, 0.5 * median)
  return ok_chi2 & ok_gap & ok_size


@jax.jit
def _scale_and_solve(y_bxb, zero_mxb, m_mxb, grad_mxn, bias_grad_m):
  r"""Scales from the bias gradient, then ``X^T = D^+ weight_grad``.

  The columns ``M y_i`` (zeroed on their zero sets) are ``D``'s up to scale:
  ``alpha = argmin ||sum_i alpha_i (M y_i) - bias_grad||``, ``D = (M Y)
  diag(alpha)``.
  """
  cols_mxb = jnp.where(zero_mxb, 0.0, jnp.dot(m_mxb, y_bxb, precision=_HI))
  alpha_b = jnp.linalg.lstsq(cols_mxb, bias_grad_m)[0]
  d_mxb = cols_mxb * alpha_b[None, :]
  return jnp.linalg.lstsq(d_mxb, grad_mxn)[0], d_mxb


@functools.partial(jax.jit, static_argnames=("steps",))
def _alternate(d_mxb, support_mxb, grad_mxn, bias_grad_m, *, steps):
  r"""Least squares of the whole model with ``D``'s zeros fixed.

  .. math:: \min_{D,\, X} \|G_W - D X^T\|^2 + \|g_\beta - D 1\|^2,
     \quad D_{ji} = 0 \text{ off the support}

  alternates ``X^T = D^+ G_W`` and, row by row, ``D_j`` on its support
  (a ``b x b`` masked solve); with equal noise on every entry of both
  gradients this is the maximum-likelihood fit given the supports.
  """
  b = d_mxb.shape[1]
  eye = jnp.eye(b, dtype=d_mxb.dtype)
  ones = jnp.ones((b,), d_mxb.dtype)

  def row(gram_bxb, rhs_b, support_b):
    mask = support_b[:, None] & support_b[None, :]
    gram = jnp.where(mask, gram_bxb, eye)
    return jnp.linalg.solve(gram, jnp.where(support_b, rhs_b, 0.0))

  def step(_, d_mxb):
    x_bxn = jnp.linalg.lstsq(d_mxb, grad_mxn)[0]
    gram = jnp.dot(x_bxn, x_bxn.T, precision=_HI) + ones[:, None] * ones[None]
    rhs = jnp.dot(grad_mxn, x_bxn.T, precision=_HI) + bias_grad_m[:, None]
    return jax.vmap(row, in_axes=(None, 0, 0))(gram, rhs, support_mxb)

  d_mxb = jax.lax.fori_loop(0, steps, step, d_mxb)
  return jnp.linalg.lstsq(d_mxb, grad_mxn)[0], d_mxb


@jax.jit
def _inactive(x_bxn, weight_mxn, bias_m):
  """Neurons the server's layer leaves inactive for each sample."""
  z_mxb = jnp.dot(weight_mxn, x_bxn.T, precision=_HI) + bias_m[:, None]
  return z_mxb <= 0


class _Fit(NamedTuple):
  """A reconstruction and its per-sample statistics (host arrays)."""

  inputs: jax.Array
  grad_z: jax.Array
  directions: np.ndarray
  near_zeros: np.ndarray
  chi2: np.ndarray
  gap: np.ndarray


def _keep_independent(refined, y_kxb, m_mxb, s):
  """Undoes refits that made a column dependent on the others.

  Two refits can settle on one column (twins' zero sets nearly agree);
  the coupled solve then has no inverse (NaN inputs, a low-contrast b =
  16 gradient at sigma = 1e-4). A refined column whose residual off the
  others' span is under the selection's cutoff ``4 s sqrt(m)`` gets its
  input direction back when that one lies farther from the span, with
  ``chi2 = NaN`` and ``gap = 0`` (reported as not consistent).
  """
  m_np = np.asarray(m_mxb)
  y_np = np.array(refined.direction)
  chi2, gap = np.array(refined.chi2), np.array(refined.gap)
  cutoff = independence_cutoff(float(s), m_np.shape[0])

  def residual(i, y_b):
    others = m_np @ np.delete(y_np, i, axis=0).T
    col = m_np @ y_b
    return np.linalg.norm(col - others @ np.linalg.lstsq(others, col)[0])

  for i in range(y_np.shape[0]):
    before = np.asarray(y_kxb[i]) / np.linalg.norm(np.asarray(y_kxb[i]))
    now = residual(i, y_np[i])
    if now < cutoff and residual(i, before) > now:
      y_np[i] = before
      chi2[i], gap[i] = np.nan, 0.0
  return refined._replace(
    direction=jnp.asarray(y_np),
    chi2=jnp.asarray(chi2),
    gap=jnp.asarray(gap),
  )


def _fit(y_kxb, m_mxb, s, grad, bias_grad, allowed_bxm, zero_of):
  """Refits the ``b`` directions on their (allowed) zero sets and solves."""
  refined = _refine_many(y_kxb, m_mxb, s, allowed_bxm, iterations=3)
  refined = _keep_independent(refined, y_kxb, m_mxb, s)
  y_kxb = refined.direction
  zero_mxb = zero_of(jnp.dot(m_mxb, y_kxb.T, precision=_HI)) & allowed_bxm.T
  inputs, grad_z = _scale_and_solve(y_kxb.T, zero_mxb, m_mxb, grad, bias_grad)
  stats = (np.asarray(a) for a in refined[1:])
  return _Fit(inputs, grad_z, np.asarray(y_kxb), *stats), zero_mxb


def _finish(y_kxb, m_mxb, s, grad, bias_grad, weight, bias, steps=3):
  """Final refits (through the ReLU pattern when the weights are given)."""
  k, m = y_kxb.shape[0], m_mxb.shape[0]
  allowed = jnp.ones((k, m), bool)

  def zero_of(v_mxb):
    return _near_zero(v_mxb, s)

  fit, zero_mxb = _fit(y_kxb, m_mxb, s, grad, bias_grad, allowed, zero_of)
  if weight is not None:
    for _ in range(steps):
      allowed = _inactive(fit.inputs, weight, bias).T
      fit, zero_mxb = _fit(
        jnp.asarray(fit.directions), m_mxb, s, grad, bias_grad, allowed, zero_of
      )
  inputs, grad_z = _alternate(fit.grad_z, ~zero_mxb, grad, bias_grad, steps=10)
  if not np.isfinite(np.asarray(inputs)).all():
    return fit  # a singular masked row solve: keep the refit's answer
  return fit._replace(inputs=inputs, grad_z=grad_z)


class _Search(NamedTuple):
  """What a search returns: the pool and its bookkeeping."""

  pool: _Pool
  proposals: int
  blocks: int
  interrupted: bool = False


def _progress(name, setup, search, start, last_log, config):
  """Logs the search's progress at most every ``config.log_every_s``."""
  now = time.perf_counter()
  if now - last_log < config.log_every_s:
    return last_log
  logging.info(
    "noisy %s b=%d: %d proposals, %d blocks, %d directions in the pool, %.0f s",
    name,
    setup.b,
    search.proposals,
    search.blocks,
    search.pool.directions.shape[0],
    now - start,
  )
  return now


class _Setup(NamedTuple):
  """The arrays every search step reads (device) and the host copy of M."""

  m_mxb: jax.Array
  m_np: np.ndarray
  noise_std: jax.Array
  rows_m: jax.Array
  num_rows: int
  floor: int
  b: int


def _setup(m_mxb, noise_std):
  """Signal rows (sampled) and the floor of a column's near-zero count.

  Rows whose norm is consistent with pure noise (``||M_j||^2 / s^2`` below
  ``b + 5 sqrt(2 b)``) are near zero for almost every direction: they are
  not sampled, and the floor adds their number to SPEAR's structure floor.
  """
  m, b = m_mxb.shape
  m_np = np.asarray(m_mxb)
  s = float(noise_std)
  energy = np.sum(np.square(m_np), axis=1) / (s * s)
  signal = energy > b + 5.0 * np.sqrt(2.0 * b)
  if signal.sum() < b:
    signal = np.ones((m,), bool)
  num_rows = int(signal.sum())
  rows = np.concatenate([np.flatnonzero(signal), np.zeros(m - num_rows, int)])
  floor = (m - num_rows) + structure_floor(b, num_rows)
  return _Setup(
    m_mxb,
    m_np,
    jnp.asarray(noise_std, m_mxb.dtype),
    jnp.asarray(rows.astype(np.int32)),
    num_rows,
    floor,
    b,
  )


def _done(pool, setup):
  """``b`` selected directions, every one consistent with pure noise."""
  chosen = _select(pool, setup)
  if chosen.shape[0] < setup.b:
    return False
  ok = _consistent(
    pool.near_zeros[chosen], pool.chi2[chosen], pool.gap[chosen], setup.b
  )
  return bool(ok.all())


def _spear_search(key, setup, config, start, patience=16):
  """SPEAR's proposals, each block's best refined and pooled.

  Stops when ``b`` consistent directions are selected, when the budgets
  run out, or after ``patience`` blocks without a new direction once ``b``
  are selected.
  """
  b, m = setup.b, setup.m_mxb.shape[0]
  block = config.block_size
  chunk = min(config.chunk_size, block)
  keep = max(1, min(config.max_candidates_per_block, block))
  max_proposals = config.max_proposals or 2**b * 1000
  allowed = jnp.ones((keep, m), bool)
  pool = _empty_pool(b, setup.m_np.dtype)
  proposals = blocks = stale = 0
  last_log = start
  try:
    while True:
      key, sub = jax.random.split(key)
      directions, _ = _propose_block(
        sub,
        setup.m_mxb,
        setup.rows_m,
        jnp.asarray(setup.num_rows),
        setup.noise_std,
        block_size=block,
        chunk_size=chunk,
        keep=keep,
      )
      refined = _refine_many(
        directions, setup.m_mxb, setup.noise_std, allowed, iterations=4
      )
      pool, added = _merge(pool, refined, setup.m_np, setup.floor)
      proposals, blocks = proposals + block, blocks + 1
      stale = 0 if added else stale + 1
      full = _select(pool, setup).shape[0] == b
      elapsed = time.perf_counter() - start
      if (
        _done(pool, setup)
        or proposals >= max_proposals
        or (config.time_budget_s is not None and elapsed > config.time_budget_s)
        or (full and stale >= patience)
      ):
        return _Search(pool, proposals, blocks)
      last_log = _progress(
        "SPEAR",
        setup,
        _Search(pool, proposals, blocks),
        start,
        last_log,
        config,
      )
  except KeyboardInterrupt:
    logging.warning("interrupted; returning the best partial result.")
    return _Search(pool, proposals, blocks, interrupted=True)


def _starts(rng, setup, pool, count, sv_np):
  """Half random points of the sphere, half rows of ``U_b`` on which the
  selected columns all vanish (towards the columns still missing)."""
  b = setup.b
  starts = rng.standard_normal((count, b))
  chosen = _select(pool, setup)
  if chosen.shape[0]:
    v_mxk = setup.m_np @ pool.directions[chosen].T
    vanish = np.all(np.abs(v_mxk) < NEAR_ZERO * float(setup.noise_std), axis=1)
    rows = np.flatnonzero(vanish)
    if rows.size:
      half = count // 2
      starts[:half] = setup.m_np[rng.choice(rows, half)] / sv_np[None, :]
  return starts / np.linalg.norm(starts, axis=1, keepdims=True)


def _spearpp_search(key, setup, config, start, sv_b):
  """SPEAR++'s l1 search on ``U_b``; end points ``q`` become ``y = S^-1 q``.

  Stops when ``b`` consistent directions are selected, after
  ``learner.max_rounds`` rounds, the time budget, or ``learner.patience``
  rounds without a new direction.
  """
  learner = config.learner
  b, m = setup.b, setup.m_mxb.shape[0]
  count = learner.restarts or 2 * b
  u_mxb = setup.m_mxb / sv_b[None, :]
  alive = jnp.ones((m,), bool)
  allowed = jnp.ones((count, m), bool)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  pool = _empty_pool(b, setup.m_np.dtype)
  rounds = stale = 0
  last_log = start
  try:
    while rounds < learner.max_rounds and stale < learner.patience:
      starts = _starts(rng, setup, pool, count, np.asarray(sv_b))
      ends, _ = learn_directions(
        jnp.asarray(starts, setup.m_np.dtype), u_mxb, alive, config=learner
      )
      y_kxb = ends / sv_b[None, :]
      y_kxb = y_kxb / jnp.linalg.norm(y_kxb, axis=1, keepdims=True)
      refined = _refine_many(
        y_kxb, setup.m_mxb, setup.noise_std, allowed, iterations=6
      )
      pool, added = _merge(pool, refined, setup.m_np, setup.floor)
      rounds, stale = rounds + 1, (0 if added else stale + 1)
      elapsed = time.perf_counter() - start
      if _done(pool, setup) or (
        config.time_budget_s is not None and elapsed > config.time_budget_s
      ):
        break
      last_log = _progress(
        "SPEAR++",
        setup,
        _Search(pool, rounds * count, rounds),
        start,
        last_log,
        config,
      )
  except KeyboardInterrupt:
    logging.warning("interrupted; returning the best partial result.")
    return _Search(pool, rounds * count, rounds, interrupted=True)
  return _Search(pool, rounds * count, rounds)


def _swap(chosen, pool, setup, vt_bxn, sv_b, bias_grad, weight, bias):
  """:func:`swap_by_pattern` over the pooled directions that the selection
  threshold admits; returns the new selection (pool indices)."""
  start = time.perf_counter()
  eligible = np.flatnonzero(pool.near_zeros >= _threshold(pool, setup))
  local = np.searchsorted(eligible, chosen)
  local, before, after = swap_by_pattern(
    local,
    pool.directions[eligible],
    setup.m_np,
    np.asarray(vt_bxn),
    np.asarray(sv_b),
    np.asarray(bias_grad),
    np.asarray(weight),
    np.asarray(bias),
    float(setup.noise_std),
    NEAR_ZERO,
  )
  logging.info(
    "noisy: pattern mismatch of the selection %d -> %d (%d eligible, %.1f s)",
    before,
    after,
    eligible.size,
    time.perf_counter() - start,
  )
  return eligible[local]


def _check(weight_grad, bias_grad, weight, bias, method):
  """Validates the inputs; returns them as arrays of one dtype."""
  if method not in _METHODS:
    raise ValueError(
      f"Unknown method {method!r}; available: {', '.join(_METHODS)}."
    )
  grad = _as_matrix(weight_grad)
  m, n = grad.shape
  bias_grad = jnp.asarray(bias_grad, grad.dtype)
  if bias_grad.shape != (m,) or not np.isfinite(np.asarray(bias_grad)).all():
    raise ValueError(f"bias_grad must be finite with shape ({m},).")
  if (weight is None) != (bias is None):
    raise ValueError("give both weight and bias, or neither.")
  if weight is not None:
    weight = jnp.asarray(weight, grad.dtype)
    bias = jnp.asarray(bias, grad.dtype)
    if weight.shape != (m, n) or bias.shape != (m,):
      raise ValueError(
        f"weight and bias must have shapes {(m, n)} and ({m},), got "
        f"{tuple(weight.shape)} and {tuple(bias.shape)}."
      )
  return grad, bias_grad, weight, bias


def _search(key, setup, config, method, sv_b, start):
  if setup.b == 1:
    pool = _Pool(
      np.ones((1, 1), setup.m_np.dtype),
      np.zeros((1,), np.int64),
      np.zeros((1,), setup.m_np.dtype),
      np.full((1,), np.inf, setup.m_np.dtype),
    )
    return _Search(pool, 0, 0)
  if method == "spear":
    return _spear_search(key, setup, config, start)
  return _spearpp_search(key, setup, config, start, sv_b)


def invert_noisy_with_report(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  *,
  key: PRNGKeyArray,
  batch_size: int | None = None,
  noise_std: float | None = None,
  weight: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  config: AttackConfig | None = None,
  method: str = "spear",
) -> tuple[InversionResult, NoiseReport]:
  """:func:`invert_noisy`, with the noise level and per-sample quality.

  Returns:
    ``(result, report)``: the :class:`InversionResult` and a
    :class:`NoiseReport`.
  """
  start = time.perf_counter()
  config = AttackConfig() if config is None else config
  grad, bias_grad, weight, bias = _check(
    weight_grad, bias_grad, weight, bias, method
  )
  (m, n), dtype = grad.shape, grad.dtype
  if noise_std is not None and not noise_std > 0:
    raise ValueError(f"noise_std must be positive, got {noise_std}.")
  u, sv, vt = _svd(grad)
  estimate = _estimate_from_values(np.asarray(sv), m, n, noise_std, batch_size)
  b = estimate.rank
  sv_b = sv[:b]
  setup = _setup(u[:, :b] * sv_b[None, :], jnp.asarray(estimate.noise_std))
  search = _search(key, setup, config, method, sv_b, start)
  chosen = _select(search.pool, setup)
  if weight is not None and chosen.shape[0] == b:
    chosen = _swap(
      chosen, search.pool, setup, vt[:b], sv_b, bias_grad, weight, bias
    )
  stop = "noisy" if chosen.shape[0] == b else "no_directions"
  if search.interrupted:
    stop = "interrupted"
  y_kxb = complete_basis(search.pool.directions[chosen], b).T
  fit = _finish(
    jnp.asarray(y_kxb, dtype),
    setup.m_mxb,
    setup.noise_std,
    grad,
    bias_grad,
    weight,
    bias,
  )
  result = _result(fit, search, estimate, stop, time.perf_counter() - start, m)
  consistent = _consistent(fit.near_zeros, fit.chi2, fit.gap, b)
  report = NoiseReport(
    noise_std=estimate.noise_std,
    rank=b,
    edge=estimate.edge,
    consistent=consistent,
    near_zeros=fit.near_zeros,
    chi2=fit.chi2,
    dof=np.maximum(fit.near_zeros - (b - 1), 0),
  )
  return result, report


def _result(fit, search, estimate, stop, seconds, m):
  b = estimate.rank
  stats = InversionStats(
    proposals=search.proposals,
    candidates=int(search.pool.near_zeros.shape[0]),
    blocks=search.blocks,
    seconds=seconds,
    rank=b,
    alive_rows=m,
    threshold=int(np.min(fit.near_zeros)) if b else 0,
    tau=float(np.min(fit.near_zeros)) / m if b else 0.0,
    stop_reason=stop,
    check="noise",
    noise_std=float(estimate.noise_std),
  )
  return InversionResult(
    inputs=fit.inputs,
    grad_z=fit.grad_z,
    verified=jnp.zeros((b,), bool),
    success=False,
    directions=jnp.asarray(fit.directions.T),
    sparsity=jnp.asarray(fit.near_zeros.astype(np.int32)),
    candidates=search.pool.directions,
    stats=stats,
  )


def invert_noisy(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  *,
  key: PRNGKeyArray,
  batch_size: int | None = None,
  noise_std: float | None = None,
  weight: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  config: AttackConfig | None = None,
  method: str = "spear",
) -> InversionResult:
  r"""Reconstructs a batch from a DP-SGD (noisy) Dense+ReLU gradient.

  For ``weight_grad = D X^T + E`` and ``bias_grad = D 1 + e`` with iid
  ``N(0, s^2)`` noise: estimates ``s`` and ``b`` (:func:`estimate_noise`),
  finds ``b`` columns of ``D`` as directions ``y`` of the whitened
  gradient ``M = U_b S_b`` with many rows ``|M_j y| < 3 s`` (SPEAR's
  sampled kernels, or SPEAR++'s l1 search with ``method="spearpp"``),
  each refined by total least squares on its zero set; fixes their scales
  with ``bias_grad``; and polishes ``D`` and ``X`` by least squares of
  both gradients with ``D``'s zero pattern fixed. With the layer's
  ``weight`` and ``bias`` each zero set is also restricted to the
  sample's inactive neurons at the server's weights, iterated.

  Nothing is exact under noise: ``verified`` is all ``False`` and
  ``success`` is ``False``; ``stats.stop_reason`` is ``"noisy"``, or
  ``"no_directions"`` when fewer than ``b`` columns were found (the basis
  is then completed and the best reconstruction still returned).
  ``sparsity`` holds each column's near-zero count. Use
  :func:`invert_noisy_with_report` for the noise level and a per-sample
  consistency test.

  Args:
    weight_grad: the noisy ``dL/dW``, ``(m, n)`` in the paper's layout.
    bias_grad: the noisy ``dL/dbeta``, ``(m,)``.
    key: PRNG key of the search.
    batch_size: ``b``; ``None`` counts the singular values above the
      Marchenko-Pastur edge.
    noise_std: the noise level ``s`` (``sigma C / b`` in DP-SGD); ``None``
      estimates it from the singular values.
    weight: the layer's ``W`` (``m x n``), for the ReLU-pattern refit.
    bias: the layer's ``beta`` (``m``).
    config: an :class:`AttackConfig` (block sizes, budgets, the learner of
      SPEAR++); ``None`` uses the defaults.
    method: ``"spear"`` or ``"spearpp"``.

  Returns:
    An :class:`InversionResult`.

  Raises:
    ValueError: on invalid input, or when the noise leaves no low-rank
      structure (see :func:`estimate_noise`).

  Examples:
    >>> import jax, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> m, n, b, s = 60, 80, 3, 1e-6
    >>> x = rng.standard_normal((n, b)); w = rng.standard_normal((m, n))
    >>> d = (w @ x > 0) * rng.standard_normal((m, b))
    >>> res = invert_noisy(d @ x.T + s * rng.standard_normal((m, n)),
    ...                    d.sum(1) + s * rng.standard_normal(m),
    ...                    key=jax.random.key(0))
    >>> res.stats.stop_reason, bool(res.verified.any())
    ('noisy', False)

  References:
    Dimitrov, Baader, Mueller, Vechev. SPEAR: Exact Gradient Inversion of
    Batches in Federated Learning. NeurIPS 2024.
    https://arxiv.org/abs/2403.03945
  """
  return invert_noisy_with_report(
    weight_grad,
    bias_grad,
    key=key,
    batch_size=batch_size,
    noise_std=noise_std,
    weight=weight,
    bias=bias,
    config=config,
    method=method,
  )[0]
