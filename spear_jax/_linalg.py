"""Exact linear algebra of SPEAR: factorisation, rank, null vectors, polish.

Every step that decides correctness runs at ``Precision.HIGHEST`` and uses
tolerances resolved from the dtype (:func:`resolve_tolerances`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._config import AttackConfig
from spear_jax._types import Array
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "SKETCH_MIN_ENTRIES",
  "Tolerances",
  "distinct_directions",
  "factorize",
  "null_vector",
  "numerical_rank",
  "polish_direction",
  "resolve_tolerances",
  "sketched_svd",
  "split_mixture",
  "split_span",
  "twin_span",
]


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """Tolerances of one inversion, resolved from the dtype.

  With ``eps = finfo(dtype).eps`` the defaults are (float64 / float32):

  * ``rank_rtol = 10 max(m, n) eps``: singular values below
    ``rank_rtol * s_max`` count as zero.
  * ``screen = eps^(1/2)`` (1.5e-8 / 3.5e-4): an entry of the unit vector
    ``L q`` is a zero while screening proposals.
  * ``zero = eps^(2/3)`` (3.7e-11 / 2.4e-5): an entry of ``L q`` is a zero
    after polishing.
  * ``dedup = eps^(2/3)``: unit directions with ``|<u, v>| >= 1 - dedup``
    are the same (polished duplicates agree to ``O(eps)``).
  * ``independence = eps^(1/3)`` (6.1e-6 / 4.9e-3): minimum residual norm of
    a unit direction outside the span of the selection.
  * ``certificate = eps^(1/2)``: relative slack of the ReLU certificate.
  * ``leverage = eps^(1/3)``: a candidate whose zero set has a row of
    leverage at least ``1 - leverage`` is a mixture of several columns
    (:func:`polish_direction`).
  """

  rank_rtol: float
  screen: float
  zero: float
  dedup: float
  independence: float
  certificate: float
  leverage: float


def resolve_tolerances(
  config: AttackConfig, dtype, m: int, n: int, condition: float = 1.0
) -> Tolerances:
  """Fills the ``None`` tolerances of ``config`` from ``dtype``.

  The zero tolerance also follows the factorisation's accuracy. The computed
  ``L`` spans the column space of ``D`` only up to an angle of about
  ``eps * condition`` (``condition = s_1 / s_b`` of the weight gradient;
  the perturbation bound of the singular subspace), so an exact zero of
  ``D`` reads as up to that much in ``L q``. Near-duplicate inputs make the
  inputs nearly dependent: shifted frames of one picture gave
  ``condition = 1.5e8`` and zeros of up to ``1.6e-10``, beyond
  ``eps^(2/3)``, on exactly the twins' columns. So ``zero`` is
  ``eps * condition`` when that is larger, but never above ``screen``.

  Args:
    config: the attack configuration.
    dtype: floating dtype of the computation.
    m: rows of the weight gradient.
    n: columns of the weight gradient.
    condition: ``s_1 / s_b`` of the weight gradient (``1`` before it is
      factorised).

  Returns:
    A :class:`Tolerances`.
  """
  eps = float(jnp.finfo(dtype).eps)

  def pick(value, default):
    return float(default if value is None else value)

  screen = pick(config.screen_tol, eps ** (1 / 2))
  return Tolerances(
    rank_rtol=pick(config.rank_rtol, 10.0 * max(m, n) * eps),
    screen=screen,
    zero=pick(
      config.zero_tol, min(screen, max(eps ** (2 / 3), eps * condition))
    ),
    dedup=pick(config.dedup_tol, eps ** (2 / 3)),
    independence=pick(config.independence_tol, eps ** (1 / 3)),
    certificate=pick(config.certificate_tol, eps ** (1 / 2)),
    leverage=pick(config.leverage_tol, eps ** (1 / 3)),
  )


@jax.jit
def _svd(grad_mxn):
  return jnp.linalg.svd(grad_mxn, full_matrices=False)


def numerical_rank(singular_values: Float[Array, " r"], rtol: float) -> int:
  r"""Numerical rank: the number of singular values above ``rtol * s_max``.

  .. math:: \operatorname{rank} = \#\{k : s_k > \mathrm{rtol}\, s_1\}

  Args:
    singular_values: singular values in descending order.
    rtol: relative cutoff.

  Returns:
    The rank as a Python int.
  """
  s = np.asarray(singular_values)
  if s.size == 0 or s[0] <= 0:
    return 0
  return int(np.sum(s > rtol * s[0]))


def factorize(
  weight_grad: Float[Array, "m n"],
  rank: int | None,
  rtol: float,
  method: str = "auto",
) -> tuple[Float[Array, "m b"], Float[Array, "b n"], int, Float[Array, " r"]]:
  r"""Low-rank factorisation ``weight_grad = L R`` (Theorem 3.1 of SPEAR).

  With the truncated SVD ``weight_grad = U_b S_b V_b^T`` we take
  ``L = U_b`` (orthonormal columns, so ``L^+ = L^T``) and ``R = S_b V_b^T``.
  Then ``D = L Q`` and ``X^T = Q^{-1} R`` for a unique invertible ``Q``.

  A big gradient (``method="auto"`` and at least ``2^21`` entries, or
  ``method="sketch"``) is factorised from a random sketch of its range
  (:func:`sketched_svd`): the top singular triplets from ``Y = G Omega``,
  ``k`` a little above the rank, so no ``m x n`` factor is ever formed
  (ImageNet-size inputs) and the cost is ``O(m n k)``; the sketch grows
  until the rank shows a gap, and an a-posteriori probe checks that
  nothing above the rank cutoff was left out. Without a gap or a passing
  check it falls back to the full SVD.

  Args:
    weight_grad: the shared weight gradient ``D X^T``.
    rank: the batch size ``b``, or ``None`` to use the numerical rank.
    rtol: relative singular-value cutoff of the numerical rank.
    method: ``"auto"``, ``"svd"`` or ``"sketch"``.

  Returns:
    ``(l, r, numerical_rank, singular_values)``; ``l`` and ``r`` use
    ``rank`` columns/rows when it is given, else the numerical rank
    (the sketch returns only its ``k`` leading singular values).

  References:
    Dimitrov et al., SPEAR: Exact Gradient Inversion of Batches in Federated
    Learning, NeurIPS 2024, https://arxiv.org/abs/2403.03945.
    Halko, Martinsson, Tropp, Finding structure with randomness, SIAM
    Review 2011 (range finder, Alg. 4.1; a-posteriori error, Sec. 4.3).
  """
  if method not in ("auto", "svd", "sketch"):
    raise ValueError(f"method must be auto, svd or sketch, not {method!r}.")
  m, n = weight_grad.shape
  with jax.default_matmul_precision("highest"):
    found = None
    if method == "sketch" or (method == "auto" and m * n >= SKETCH_MIN_ENTRIES):
      found = sketched_svd(weight_grad, rank, rtol)
    if found is None:
      found = _svd(weight_grad)
    u, s, vt = found
  num_rank = numerical_rank(s, rtol)
  b = num_rank if rank is None else rank
  l_mxb, r_bxn = _truncate(u, s, vt, b)
  return l_mxb, r_bxn, num_rank, s


# Gradients with at least this many entries are factorised from a sketch
# (2.1M: m = 1000 at n = 3072 and up, every ImageNet-size layer).
SKETCH_MIN_ENTRIES = 1 << 21


@functools.partial(jax.jit, static_argnums=2)
def _sketch(grad_mxn, key, k):
  """Top-``k`` SVD of ``grad`` from its sketch ``Y = grad Omega``."""
  omega = jax.random.normal(key, (grad_mxn.shape[1], k), grad_mxn.dtype)
  q, _ = jnp.linalg.qr(grad_mxn @ omega)
  u_kxk, s, vt = jnp.linalg.svd(q.T @ grad_mxn, full_matrices=False)
  return q @ u_kxk, s, vt


@functools.partial(jax.jit, static_argnums=(3, 4))
def _left_out(grad_mxn, u_mxk, key, b, probes):
  """``|(I - U_b U_b^T) G g| / |G g|`` for Gaussian probes ``g``."""
  g = jax.random.normal(key, (grad_mxn.shape[1], probes), grad_mxn.dtype)
  z = grad_mxn @ g
  u = u_mxk[:, :b]
  return jnp.linalg.norm(z - u @ (u.T @ z)) / jnp.linalg.norm(z)


def sketched_svd(
  weight_grad: Float[Array, "m n"],
  rank: int | None,
  rtol: float,
  *,
  oversample: int = 16,
  key: jax.Array | None = None,
) -> tuple[Array, Array, Array] | None:
  """The leading singular triplets of a low-rank matrix from random sketches.

  Starts with ``k = rank + oversample`` (or 64 columns when the rank is
  unknown) and doubles ``k`` until the sketch's numerical rank shows a gap
  (``< k``), up to ``min(m, n) / 2``. The result is accepted when Gaussian
  probes lose at most ``rtol`` of their norm to the discarded part (the
  same cutoff as the numerical rank).

  Returns:
    ``(u, s, vt)`` with ``k`` columns/values/rows, or ``None`` when no gap
    was found or the check failed (then the full SVD is needed).
  """
  m, n = weight_grad.shape
  key = jax.random.key(0) if key is None else key
  cap = min(m, n) // 2
  k = min(cap, (rank + oversample) if rank is not None else 64)
  while k >= 1:
    u, s, vt = _sketch(weight_grad, jax.random.fold_in(key, k), k)
    b = numerical_rank(s, rtol)
    if b < k:
      left = float(
        _left_out(weight_grad, u, jax.random.fold_in(key, 1 << 20 | k), b, 8)
      )
      if left <= rtol:
        return u, s, vt
      return None
    if k >= cap:
      return None
    k = min(cap, 2 * k)
  return None


@functools.partial(jax.jit, static_argnums=3)
def _truncate(u, s, vt, b):
  """``L = U_b`` and ``R = S_b V_b^T`` in one program (not five eager ops)."""
  return u[:, :b], s[:b, None] * vt[:b]


# Above this many rows the elimination is a rolled loop: the unrolled form
# has O(k^2) operations in its graph, and XLA's compile time grows faster
# than that (b = 210 did not finish compiling in 14 minutes on the CPU).
_UNROLL_MAX_ROWS = 48


def _householder_null(rows_kxb_batch: Array) -> Array:
  """Householder null vector of ``rows[..., i, :, *batch]``, batch trailing.

  The batch axes trail so that every reduction runs across the contiguous
  batch (vector lanes) rather than within one small vector.
  """
  if rows_kxb_batch.shape[0] > _UNROLL_MAX_ROWS:
    return _householder_null_rolled(rows_kxb_batch)
  return _householder_null_unrolled(rows_kxb_batch)


def _householder_null_rolled(rows_kxb_batch: Array) -> Array:
  """The same reflections as the unrolled form, in two ``fori_loop`` calls.

  Step ``j`` works on full-length columns with the entries above ``j``
  masked to zero (no dynamic shapes), so it does about twice the flops of
  the unrolled form, with a graph of constant size.
  """
  k, b = rows_kxb_batch.shape[:2]
  batch = rows_kxb_batch.shape[2:]
  dtype = rows_kxb_batch.dtype
  expand = (slice(None),) + (None,) * len(batch)
  row = jnp.arange(b)[expand]
  col = jnp.arange(k)[expand]
  m_bxk = jnp.moveaxis(rows_kxb_batch, 0, 1)  # columns of A^T

  def eliminate(j, carry):
    m_bxk, v_bxk = carry
    x = jnp.where(row >= j, m_bxk[:, j], 0.0)
    lead = jnp.sum(jnp.where(row == j, x, 0.0), axis=0, keepdims=True)
    sign = jnp.where(lead >= 0, 1.0, -1.0).astype(dtype)
    alpha = -sign * jnp.sqrt(jnp.sum(x * x, axis=0, keepdims=True))
    v = x - jnp.where(row == j, alpha, 0.0)
    v = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
    proj = jnp.sum(v[:, None] * m_bxk, axis=0, keepdims=True)
    update = 2.0 * v[:, None] * proj
    m_bxk = m_bxk - jnp.where(col[None] > j, update, 0.0)
    return m_bxk, v_bxk.at[:, j].set(v)

  _, v_bxk = jax.lax.fori_loop(0, k, eliminate, (m_bxk, jnp.zeros_like(m_bxk)))
  # Built from the data (not a fresh constant) so that under shard_map the
  # carry has the same varying-axis type as the loop body's output.
  q = jnp.zeros_like(m_bxk[:, 0]).at[-1].set(1.0)

  def apply(i, q):
    v = v_bxk[:, k - 1 - i]
    return q - 2.0 * jnp.sum(v * q, axis=0, keepdims=True) * v

  return jax.lax.fori_loop(0, k, apply, q)


def _householder_null_unrolled(rows_kxb_batch: Array) -> Array:
  """The elimination unrolled in the graph (fastest for small ``k``)."""
  k, b = rows_kxb_batch.shape[:2]
  batch = rows_kxb_batch.shape[2:]
  columns = [rows_kxb_batch[i] for i in range(k)]  # columns of A^T
  reflectors = []
  for j in range(k):
    x = columns[j][j:]
    sign = jnp.where(x[:1] >= 0, 1.0, -1.0).astype(x.dtype)
    alpha = -sign * jnp.sqrt(jnp.sum(x * x, axis=0, keepdims=True))
    v = x.at[0].add(-alpha[0])
    v = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
    reflectors.append(v)
    for i in range(j + 1, k):
      y = columns[i][j:]
      y = y - 2.0 * jnp.sum(v * y, axis=0, keepdims=True) * v
      columns[i] = columns[i].at[j:].set(y)
  q = jnp.zeros((b, *batch), rows_kxb_batch.dtype).at[-1].set(1.0)
  for j in reversed(range(k)):
    y = q[j:]
    v = reflectors[j]
    q = q.at[j:].set(y - 2.0 * jnp.sum(v * y, axis=0, keepdims=True) * v)
  return q


# From this b on, LAPACK's blocked QR (cache-friendly) beats the elimination
# on the vector lanes, whose rank-one updates stream the whole batch through
# memory every step: measured 9x faster at b = 50, 31x at b = 210, equal
# at b <= 25 (BUILD_NOTES.md, "Issue 11").
BLOCKED_QR_FROM = 33


def _blocked_qr_null(rows_nxkxb):
  """Last column of the complete Q of ``A^T`` (batched LAPACK/cuSOLVER QR)."""
  q_nxbxb, _ = jnp.linalg.qr(jnp.swapaxes(rows_nxkxb, -1, -2), mode="complete")
  return q_nxbxb[..., -1]


@jax.custom_batching.custom_vmap
def null_vector(rows_kxb: Float[Array, "k b"]) -> Float[Array, " b"]:
  r"""Unit vector spanning the kernel of a ``(b-1) x b`` matrix.

  Householder QR of ``A^T = H_1 \cdots H_k [R; 0]``; the last column of
  ``H_1 \cdots H_k`` is orthogonal to every row of ``A``. From ``b = 33``
  on it is LAPACK's (cuSOLVER's) blocked QR, batched. Householder
  reflections are backward stable without pivoting, so the kernel is
  accurate to ``O(eps cond(A))``, and there is no data-dependent control
  flow. Under ``vmap`` a custom batching rule runs the same elimination with
  the batch as the trailing (vector-lane) axis, which measured 2x faster on
  CPU than JAX's generic batching of the per-column updates (BUILD_NOTES.md).

  Args:
    rows_kxb: ``k = b - 1`` sampled rows of ``L``.

  Returns:
    ``q`` with ``||q|| = 1`` and ``rows_kxb @ q ~ 0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> q = null_vector(jnp.array([[1.0, 0.0]]))
    >>> bool(jnp.allclose(jnp.abs(q), jnp.array([0.0, 1.0])))
    True
  """
  k, b = rows_kxb.shape
  if k != b - 1:
    raise ValueError(f"null_vector needs a (b-1) x b matrix, got {k} x {b}.")
  if b >= BLOCKED_QR_FROM:
    return _blocked_qr_null(rows_kxb)
  return _householder_null(rows_kxb)


@null_vector.def_vmap
def _null_vector_vmap(axis_size, in_batched, rows_nxkxb):
  del axis_size
  (batched,) = in_batched
  if not batched:
    return null_vector(rows_nxkxb), False
  if rows_nxkxb.shape[-1] >= BLOCKED_QR_FROM:
    return _blocked_qr_null(rows_nxkxb), True
  q_bxn = _householder_null(jnp.moveaxis(rows_nxkxb, 0, -1))
  return jnp.moveaxis(q_bxn, -1, 0), True


def rows_gram_eigh(
  l_mxb: Float[Array, "m b"], rows_m: Bool[Array, " m"]
) -> tuple[Float[Array, " b"], Float[Array, "b b"]]:
  """Ascending eigenpairs of ``L_S^T L_S`` over the rows ``S`` in ``rows_m``.

  The smallest eigenvector is the least-squares kernel of ``L_S``: the
  exact column when every row of ``S`` is a true zero of it.
  """
  masked_mxb = l_mxb * rows_m[:, None].astype(l_mxb.dtype)
  return jnp.linalg.eigh(jnp.dot(masked_mxb.T, masked_mxb, precision=_HI))


def _leverages(l_mxb, eigvals_b, eigvecs_bxb):
  """Each row's leverage off the smallest eigenvector (see polish)."""
  coords_mxb = jnp.dot(l_mxb, eigvecs_bxb, precision=_HI)[:, 1:]
  tiny = jnp.finfo(l_mxb.dtype).tiny
  return jnp.sum(
    coords_mxb**2 / jnp.maximum(eigvals_b[1:], tiny)[None, :], axis=1
  )


def pinning_rows_dropped(
  l_mxb: Float[Array, "m b"],
  zero_set_m: Bool[Array, " m"],
  eigvals_b: Float[Array, " b"],
  eigvecs_bxb: Float[Array, "b b"],
  flat: Bool[Array, ""],
) -> Bool[Array, " m"]:
  """A zero set without its pinning rows (leverage above one half).

  ``eigvals_b, eigvecs_bxb`` are the zero set's :func:`rows_gram_eigh`; a
  ``flat`` zero set (already degenerate: several kernel directions) has
  nothing pinned and is kept whole. What remains annihilates the span of
  the columns that all vanish there (see :func:`split_mixture`).
  """
  leverage_m = _leverages(l_mxb, eigvals_b, eigvecs_bxb)
  return zero_set_m & (flat | (leverage_m <= 0.5))


def polish_direction(
  direction: Float[Array, " b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  zero_tol: Float[Array, ""],
  iterations: int = 3,
) -> tuple[Float[Array, " b"], Int[Array, ""], Float[Array, ""]]:
  r"""Snaps an approximate sparse direction to the exact one; spots mixtures.

  With ``Z = {j alive : |(L q)_j| <= screen_tol}`` the exact direction is the
  right singular vector of ``L_Z`` with the smallest singular value, i.e.
  the eigenvector of ``L^T diag(1_Z) L`` with the smallest eigenvalue. The
  step is repeated ``iterations`` times: a genuinely small nonzero wrongly
  screened into ``Z`` pulls the first fit only slightly, stays visibly
  nonzero in it and drops out of the next ``Z``. The polished direction is
  then counted with the tighter ``zero_tol``.

  Mixture test. A sparse wrong direction mixes ``k >= 2`` columns of ``Q``:
  its zeros are the rows where all ``k`` columns vanish, which annihilate a
  ``k``-dimensional subspace containing ``q``, plus ``k - 1`` sampled rows
  that pinned ``q`` inside it. Each of those pinning rows is the only row of
  ``Z`` with a component along some direction orthogonal to ``q``: its
  statistical leverage within ``Z`` (restricted to the complement of ``q``)
  is exactly one. For a true column the rows of ``Z`` are many and in
  general position, so every leverage is about ``(b - 1) / |Z|``. With the
  eigenpairs ``(lambda_k, e_k)`` of ``L_Z^T L_Z``,

  .. math:: h_j = \sum_{k \ge 2} (L_j e_k)^2 / \lambda_k, \qquad
     \text{mixture} \iff \max_{j \in Z} h_j \approx 1.

  A zero set whose second eigenvalue vanishes (``lambda_2 <= sqrt(eps)
  lambda_max``: the exact intersection of several columns' zero sets, a
  null space of dimension two or more) gets leverage ``inf``.

  Args:
    direction: a unit direction, e.g. a proposal's null vector.
    l_mxb: the left factor ``L``.
    alive_m: mask of alive rows.
    screen_tol: zero tolerance defining ``Z``.
    zero_tol: zero tolerance of the returned count.
    iterations: number of refits.

  Returns:
    ``(direction, zeros, max_leverage)``: the polished unit direction, its
    number of zeros over alive rows, and the largest leverage of a row of
    its zero set (close to one for a mixture).
  """
  # Two more refits with the tighter sqrt(screen * zero) tolerance drop a
  # genuine nonzero smaller than screen_tol (seen: 1.2e-8 at m = 4000), which
  # the screen-level refits keep in Z and which then pulls the fit by about
  # 1e-10, below zero_tol's reach. The refit with the most zeros wins (ties:
  # the earlier one), so the tighter pass can only help.
  tight = jnp.sqrt(screen_tol * zero_tol)
  tolerances = [screen_tol] * iterations + [tight, tight]
  polished = direction
  best: tuple[Array, Array, Array, Array, Array] | None = None
  for index, tolerance in enumerate(tolerances):
    v_m = jnp.dot(l_mxb, polished, precision=_HI)
    in_zero_set = (jnp.abs(v_m) <= tolerance) & alive_m
    eigvals_b, eigvecs_bxb = rows_gram_eigh(l_mxb, in_zero_set)
    refit = eigvecs_bxb[:, 0]
    # Keep the sign of the input so that duplicates line up.
    sign = jnp.where(jnp.dot(refit, direction, precision=_HI) < 0, -1.0, 1.0)
    polished = sign.astype(refit.dtype) * refit
    if index < max(iterations, 1) - 1:
      continue
    zeros = jnp.sum(
      (jnp.abs(jnp.dot(l_mxb, polished, precision=_HI)) <= zero_tol) & alive_m
    )
    state = (polished, zeros, in_zero_set, eigvals_b, eigvecs_bxb)
    if best is None:
      best = state
    else:
      better = zeros > best[1]
      best = jax.tree.map(
        lambda new, old, better=better: jnp.where(better, new, old), state, best
      )
  # The last tolerance always records a state (it is past the skipped ones).
  assert best is not None
  polished, zeros, in_zero_set, eigvals_b, eigvecs_bxb = best
  # The eigenpairs of the last refit's zero set give the leverages.
  leverage_m = _leverages(l_mxb, eigvals_b, eigvecs_bxb)
  max_leverage = jnp.max(jnp.where(in_zero_set, leverage_m, 0.0))
  # A zero set that leaves a 2-D null space (the exact intersection of two
  # columns' zero sets) does not pin the direction down at all.
  eps = jnp.finfo(l_mxb.dtype).eps
  degenerate = eigvals_b[1] <= jnp.sqrt(eps) * eigvals_b[-1]
  max_leverage = jnp.where(degenerate, jnp.inf, max_leverage)
  return polished, zeros, max_leverage


def _zero_set_kernel(direction, l_mxb, alive_m, screen_tol, kernel_tol=None):
  """The exact kernel of a direction's zero set without its pinning rows.

  The kernel is read off the singular values of the masked ``L`` (exact
  kernel directions sit at ``O(eps)`` of the largest, where the Gram
  matrix's eigenvalues bottom out at ``eps`` of the largest: near-twin data
  puts spurious singular values at about ``1e-8`` that the Gram matrix
  cannot tell from zero). A singular value at most ``eps^(2/3)`` times the
  largest (or ``kernel_tol``: the problem's zero tolerance, which follows
  the factorisation's accuracy on ill-conditioned batches) counts as zero.

  Returns:
    ``(basis_bxb, dim)``: right singular vectors in ascending order of the
    singular values (the first ``dim`` span the kernel), and ``dim``.
  """
  eps = jnp.finfo(l_mxb.dtype).eps
  v_m = jnp.dot(l_mxb, direction, precision=_HI)
  zero_set = (jnp.abs(v_m) <= screen_tol) & alive_m
  eigvals_b, eigvecs_bxb = rows_gram_eigh(l_mxb, zero_set)
  flat = eigvals_b[1] <= jnp.sqrt(eps) * eigvals_b[-1]
  kept = pinning_rows_dropped(l_mxb, zero_set, eigvals_b, eigvecs_bxb, flat)
  masked_mxb = l_mxb * kept[:, None].astype(l_mxb.dtype)
  _, sigma_b, vt_bxb = jnp.linalg.svd(masked_mxb, full_matrices=False)
  if kernel_tol is None:
    kernel_tol = eps ** (2 / 3)
  dim = jnp.sum(sigma_b <= kernel_tol * sigma_b[0])
  return vt_bxb[::-1].T, dim


def split_span(
  basis_bxs: Float[Array, "b s"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  anchors_txkxs: Float[Array, "t k s"],
  dim: Int[Array, ""] | int,
  angle_tol: float = 1e-8,
) -> tuple[Float[Array, "t2 b"], Int[Array, " t2"]]:
  r"""Columns of ``Q`` inside the span ``V`` of ``s`` near-twin columns.

  Every column ``q_i`` in ``V`` vanishes on the twins' shared zero set
  (which annihilates all of ``V``) and on its own rows ``E_i`` where some
  other twin does not: in the coordinates ``P = L V`` those rows all lie in
  the hyperplane orthogonal to ``q_i``'s coordinates. The directions of
  ``V`` orthogonal to ``k = s - 2`` anchor rows form a plane; inside it
  each other row vanishes along one angle, and when the anchors are rows of
  ``E_i`` the remaining rows of ``E_i`` all give ``q_i``'s angle: a cluster
  of equal angles (within ``angle_tol``), which rows in general position
  never form. With ``s = 2`` there is no anchor (:func:`split_mixture`);
  with ``s = 3`` any one row of ``E_i`` is a hit, beyond that a sampled
  anchor set hits ``q_i`` with probability about ``(|E_i| / m)^(s - 2)``.

  From ``s = 3`` on, a mixture of a subgroup of the twins also clusters:
  the rows where all of the subgroup but not the other twins vanish lie in
  a subspace of ``V``'s coordinates of lower dimension (parallel, for a
  pair out of three), and with the anchors they pin a mixture. A column's
  own rows instead span its ``(s - 1)``-dimensional hyperplane without the
  anchors; a cluster whose rows span less is dropped.

  The shapes are static: a span of fewer dimensions than ``basis_bxs`` has
  columns passes zero columns for the rest and, as extra anchor rows, the
  unit vectors of those coordinates.

  Args:
    basis_bxs: orthonormal basis of ``V`` (e.g. :func:`twin_span`'s first
      ``dim`` columns), zero-padded.
    l_mxb: the left factor ``L``.
    alive_m: mask of alive rows.
    anchors_txkxs: ``t`` sets of ``k = s - 2`` anchor rows in ``V``'s
      coordinates (rows of ``P``, or padding unit vectors).
    dim: the span's dimension ``s`` (the basis may be padded).
    angle_tol: angles closer than this (radians) are equal.

  Returns:
    ``(directions, counts)``: per anchor set the directions of its two
    largest angle clusters (``2 t`` unit rows) and the clusters' sizes, the
    rows beyond the anchors where the direction vanishes; a size of two or
    more is a coincidence only a column of ``Q`` produces.
  """
  dtype = l_mxb.dtype
  eps, tiny = jnp.finfo(dtype).eps, jnp.finfo(dtype).tiny
  m, k = l_mxb.shape[0], anchors_txkxs.shape[1]
  p_mxs = jnp.dot(l_mxb, basis_bxs, precision=_HI)
  row_norm_m = jnp.maximum(jnp.linalg.norm(l_mxb, axis=1), tiny)
  unit_p_mxs = p_mxs / jnp.maximum(
    jnp.linalg.norm(p_mxs, axis=1, keepdims=True), tiny
  )

  def one(anchor_kxs):
    # A basis of the plane of V's coordinates orthogonal to the anchors.
    if k:
      q_sxs, _ = jnp.linalg.qr(anchor_kxs.T, mode="complete")
      plane_sx2 = q_sxs[:, k:]
    else:
      plane_sx2 = jnp.eye(2, dtype=dtype)
    c_mx2 = jnp.dot(p_mxs, plane_sx2, precision=_HI)
    # Rows nearly orthogonal to the plane have ill-conditioned angles (the
    # anchors themselves, the shared zero set).
    usable = alive_m & (jnp.linalg.norm(c_mx2, axis=1) >= 1e-4 * row_norm_m)
    theta_m = jnp.mod(jnp.arctan2(-c_mx2[:, 0], c_mx2[:, 1]), jnp.pi)
    order_m = jnp.argsort(jnp.where(usable, theta_m, jnp.inf))
    sorted_m = jnp.where(usable, theta_m, jnp.inf)[order_m]
    new_cluster = jnp.concatenate(
      [jnp.ones((1,), bool), (sorted_m[1:] - sorted_m[:-1]) > angle_tol]
    )
    cluster_m = jnp.cumsum(new_cluster) - 1
    counts_m = jax.ops.segment_sum(
      jnp.isfinite(sorted_m).astype(jnp.int32), cluster_m, num_segments=m
    )
    counts_2, top_2 = jax.lax.top_k(counts_m, 2)
    # First angle of each of the two largest clusters.
    first_m = jnp.where(new_cluster, jnp.arange(m), m)
    starts_m = jax.ops.segment_min(first_m, cluster_m, num_segments=m)
    first_2 = jnp.clip(starts_m[top_2], 0, m - 1)
    angles_2 = sorted_m[first_2]
    # The rank of each cluster's rows (without the anchors) in V.
    member_mx2 = cluster_m[:, None] == top_2[None, :].astype(cluster_m.dtype)
    rows_mxs = unit_p_mxs[order_m]
    gram_2xsxs = jnp.einsum(
      "mc,mi,mj->cij",
      member_mx2.astype(dtype),
      rows_mxs,
      rows_mxs,
      precision=_HI,
    )
    eig_2xs = jnp.linalg.eigvalsh(gram_2xsxs)
    rank_2 = jnp.sum(eig_2xs > jnp.sqrt(eps) * eig_2xs[:, -1:], axis=1)
    counts_2 = jnp.where(rank_2 >= dim - 1, counts_2, 0)
    angles_2 = jnp.where(jnp.isfinite(angles_2), angles_2, 0.0)
    coeffs_2x2 = jnp.stack([jnp.cos(angles_2), jnp.sin(angles_2)], axis=1)
    directions_2xb = jnp.dot(
      jnp.dot(coeffs_2x2, plane_sx2.T, precision=_HI),
      basis_bxs.T,
      precision=_HI,
    )
    return directions_2xb, counts_2

  directions, counts = jax.lax.map(one, anchors_txkxs, batch_size=64)
  return directions.reshape(-1, l_mxb.shape[1]), counts.reshape(-1)


def split_mixture(
  direction: Float[Array, " b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  angle_tol: float = 1e-8,
) -> tuple[Float[Array, "2 b"], Int[Array, " 2"]]:
  r"""The two columns behind a mixture of two columns of ``Q``.

  A mixture ``q = a q_1 + c q_2`` vanishes on the rows where both columns
  vanish (plus pinning rows, which :func:`polish_direction` flags with
  leverage one). Without the pinning rows that zero set annihilates exactly
  ``V = span(q_1, q_2)``, two-dimensional. Inside ``V`` each other alive
  row ``L_j`` vanishes along exactly one direction, at the angle
  ``theta_j`` with ``L_j V (cos theta_j, sin theta_j)^T = 0``; every row
  where ``q_1`` alone vanishes gives the same angle (that of ``q_1``),
  likewise for ``q_2``, while the other rows scatter. The two largest
  clusters of equal angles (within ``angle_tol``; rows nearly orthogonal
  to ``V`` are left out as their angles are ill-conditioned) are the
  columns. This splits near-twin samples, whose columns share most of their
  zero sets and whose mixtures therefore look almost as sparse as the
  columns, without sampling (:func:`split_span` with no anchor).

  Returns:
    ``(directions, counts)``: two unit directions and the sizes of their
    angle clusters; counts are zero where ``direction`` is not a
    two-column mixture (its zero set annihilates one or three or more
    dimensions).
  """
  basis_bxb, dim = _zero_set_kernel(direction, l_mxb, alive_m, screen_tol)
  directions_2xb, counts_2 = split_span(
    basis_bxb[:, :2],
    l_mxb,
    alive_m,
    jnp.zeros((1, 0, 2), l_mxb.dtype),
    2,
    angle_tol,
  )
  return directions_2xb, jnp.where(dim == 2, counts_2, 0)


def twin_span(
  direction: Float[Array, " b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  kernel_tol: Float[Array, ""] | None = None,
) -> tuple[Float[Array, "b b"], Int[Array, ""]]:
  r"""The subspace annihilated by a mixture's shared zero set.

  A direction in the span ``V`` of ``d`` near-twin columns vanishes on the
  rows where all of them vanish, plus at most ``d - 1`` pinning rows
  (leverage one, see :func:`polish_direction`). Without the pinning rows
  the zero set annihilates ``V`` exactly: its kernel in ``L`` has dimension
  ``d``. Unlike :func:`split_mixture` this needs no rows where only one
  twin vanishes: a twin whose zero set lies inside another's has none.

  Returns:
    ``(basis, dim)``: the zero set's right singular vectors in ascending
    order of the singular values (the first ``dim`` span the kernel) and
    the kernel's dimension (``1`` for a true column with no second kernel
    direction); see :func:`_zero_set_kernel` for the tolerance.
  """
  return _zero_set_kernel(direction, l_mxb, alive_m, screen_tol, kernel_tol)


def distinct_directions(directions_kxb: np.ndarray, tol: float) -> np.ndarray:
  """One row per direction up to sign, the first of each (rows are unit
  vectors; two are the same when ``|<u, v>| >= 1 - tol``)."""
  same_kxk = np.abs(directions_kxb @ directions_kxb.T) >= 1.0 - tol
  return directions_kxb[~np.any(np.tril(same_kxk, -1), axis=1)]
