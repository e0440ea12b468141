"""The immutable inversion problem: factorised gradient, alive rows, tolerances.

:func:`prepare_problem` validates the shared gradients, factorises
``weight_grad = L R`` and fixes everything that stays constant during a
search (alive rows, tolerances, the structure floor, the optional layer
weight and bias for the certificate). Every later stage (the strategies,
:func:`spear_jax._filter.absorb`, :func:`spear_jax._selection.select`) reads a
:class:`Problem` and never changes it.
"""

import math
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _validation
from spear_jax._config import AttackConfig
from spear_jax._linalg import Tolerances
from spear_jax._linalg import factorize
from spear_jax._linalg import resolve_tolerances
from spear_jax._types import Array
from spear_jax._types import ArrayLike
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int

__all__ = [
  "HiddenFit",
  "Problem",
  "hidden_span_rows",
  "prepare_problem",
  "structure_floor",
]


def structure_floor(b: int, num_alive: int) -> int:
  """Fewest zeros a candidate must have to be more than a generic proposal.

  A generic (wrong) proposal has exactly the ``b - 1`` forced zeros of its
  sampled rows; the floor asks for ``max(3, 2%`` of the alive rows``)`` more.
  """
  return (b - 1) + max(3, math.ceil(0.02 * num_alive))


class Problem(NamedTuple):
  """Everything a search reads and nobody writes.

  Attributes:
    l_mxb: the left factor ``L`` (orthonormal columns), ``D = L Q``.
    r_bxn: the right factor ``R``, ``X^T = Q^-1 R``.
    bias_grad: the bias gradient ``D 1`` (fixes the scales of ``Q``).
    weight: the layer's ``W`` (``m x n``) for the certificate, or ``None``.
    bias: the layer's ``beta`` (``m``), or ``None``.
    tol: tolerances resolved from the dtype and shape.
    alive: neurons whose gradient row is not identically zero.
    alive_rows: their indices, padded with zeros to length ``m``.
    num_alive: how many neurons are alive (``M``).
    floor: fewest zeros of a candidate (:func:`structure_floor`, or the
      user's ``tau``).
    check: the certificate applied: ``"relu"``, ``"drift"`` (see
      ``AttackConfig.certificate``) or ``"none"`` (no weight given).
    drift: the drift certificate's ``(max_woken, min_association)``.
    dependent: the given ``batch_size`` minus the rank: inputs that are
      linear combinations of the others (duplicates), which the gradient
      does not separate.
    next_weight: the weight (``c x m``, on the host) of the dense layer
      that reads this layer's ReLU output, or ``None``: every true column
      of ``D`` is then ``1[z_i > 0] * (next_weight^T g_i)``
      (:func:`next_layer_residuals`). Kept under the
      ``"relu"`` check only (one step, one ``next_weight``).
    hidden_span: an orthonormal basis (``m x b``, on the host) of the span
      of the batch's ReLU outputs ``h_i = relu(W x_i + beta)``, read off
      the next dense layer's weight gradient (``Delta H^T``), or ``None``
      (:func:`hidden_span_rows`). ``"relu"`` check only.
  """

  l_mxb: Float[Array, "m b"]
  r_bxn: Float[Array, "b n"]
  bias_grad: Float[Array, " m"]
  weight: Float[Array, "m n"] | None
  bias: Float[Array, " m"] | None
  tol: Tolerances
  alive: Bool[Array, " m"]
  alive_rows: Int[Array, " m"]
  num_alive: int
  floor: int
  check: str = "none"
  drift: tuple[float, float] = (0.5, 0.3)
  dependent: int = 0
  next_weight: np.ndarray | None = None
  hidden_span: np.ndarray | None = None

  @property
  def b(self) -> int:
    """The batch size."""
    return int(self.l_mxb.shape[1])

  @property
  def dtype(self) -> np.dtype:
    """The floating dtype of the whole computation."""
    return np.dtype(self.l_mxb.dtype)

  @property
  def certifiable(self) -> bool:
    """Whether the layer's weight and bias were given."""
    return self.weight is not None

  def scalar(self, value: float) -> jax.Array:
    """A scalar in the problem's dtype (a traced argument, not a constant)."""
    return jnp.asarray(value, self.dtype)


@jax.jit
def _row_max_abs(weight_grad):
  return jnp.max(jnp.abs(weight_grad), axis=1)


def _zero_input_column(l_mxb, r_bxn, bias_grad, tol):
  """Appends the bias gradient's part outside the span of ``L``, if any.

  ``bias_grad = D 1`` lies in the span of ``D``'s columns, which ``L`` spans
  when no input is zero. An all-zero input (a black image in ``[0, 1]``
  pixels, zero padding) adds ``d_z 0^T = 0`` to the weight gradient but
  ``d_z`` to the bias gradient: the rank drops by one and ``bias_grad``
  leaves the span, and scaling the other columns by its projection would
  make every input wrong (seen: three scaled inputs, off by 3.5e-4, passed
  the ReLU certificate). The unit residual joins ``L`` as one more column,
  with a zero row of ``R``: the zero input is one more sample (``X^T = Q^-1
  R`` gives it exactly zero), and its ``d_z`` is as sparse as any column (it
  vanishes where ``beta <= 0``).

  Returns:
    ``(l_mxb, r_bxn, zero_input)``.
  """
  g_m = np.asarray(bias_grad)
  l_np = np.asarray(l_mxb)
  resid_m = g_m - l_np @ (l_np.T @ g_m)
  if np.linalg.norm(resid_m) <= tol.independence * np.linalg.norm(g_m):
    return l_mxb, r_bxn, False
  resid_m -= l_np @ (l_np.T @ resid_m)  # twice is enough
  resid_m /= np.linalg.norm(resid_m)
  logging.info("bias_grad leaves the span of weight_grad: an all-zero input")
  l_mxb = jnp.concatenate([l_mxb, jnp.asarray(resid_m)[:, None]], axis=1)
  r_bxn = jnp.concatenate([r_bxn, jnp.zeros_like(r_bxn[:1])], axis=0)
  return l_mxb, r_bxn, True


def prepare_problem(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  *,
  batch_size: int | None = None,
  weight: ArrayLike | None = None,
  bias: ArrayLike | None = None,
  config: AttackConfig | None = None,
  next_weight: ArrayLike | None = None,
  next_weight_grad: ArrayLike | None = None,
) -> Problem:
  """Validates the gradients and builds the :class:`Problem`.

  Args:
    weight_grad: ``dL/dW`` in the paper's layout, ``(m, n)``.
    bias_grad: ``dL/dbeta``, ``(m,)``.
    batch_size: ``b``; ``None`` estimates it as the numerical rank.
    weight: the layer's ``W`` (``m x n``), for the certificate.
    bias: the layer's ``beta`` (``m,``), for the certificate.
    config: an :class:`AttackConfig` (tolerances, ``tau``).
    next_weight: the next dense layer's ``W`` (``c x m``), when it reads
      this layer's ReLU output directly: a column certificate (see
      :class:`Problem`); ignored unless the check is ``"relu"``.
    next_weight_grad: that layer's weight gradient (``c x m``): with ``c
      >= b`` its rows span this layer's ReLU outputs, which makes every
      found column's input exact (:func:`hidden_span_rows`); ignored unless
      the check is ``"relu"`` and its rank is ``b``.

  Returns:
    The problem.

  Raises:
    ValueError: on invalid input (shapes, non-finite values, no low-rank
      structure, a ``batch_size`` the rank contradicts, fewer alive neurons
      than samples).
  """
  config = AttackConfig() if config is None else config
  weight_grad, bias_grad, weight, bias = _validation.check_inputs(
    weight_grad, bias_grad, weight, bias, batch_size
  )
  m, n = weight_grad.shape
  tol = resolve_tolerances(config, weight_grad.dtype, m, n)
  l_mxb, r_bxn, rank, singular = factorize(
    weight_grad, batch_size, tol.rank_rtol, config.factorization
  )
  b = _validation.check_rank(rank, batch_size, m, n)
  if l_mxb.shape[1] != b:  # no batch_size, or dependent inputs
    l_mxb, r_bxn = l_mxb[:, :b], r_bxn[:b]
  top, last = np.asarray(singular)[[0, b - 1]]
  tol = resolve_tolerances(config, weight_grad.dtype, m, n, float(top / last))
  l_mxb, r_bxn, zero_input = _zero_input_column(l_mxb, r_bxn, bias_grad, tol)
  b = int(l_mxb.shape[1])
  dependent = _validation.check_batch_size(batch_size, b, zero_input)
  row_scale = np.asarray(_row_max_abs(weight_grad))  # no m x n temporary
  eps = float(jnp.finfo(weight_grad.dtype).eps)
  alive = row_scale > eps * row_scale.max()
  num_alive = int(alive.sum())
  if num_alive < b:
    raise ValueError(
      f"only {num_alive} neurons have a nonzero gradient, fewer than the "
      f"batch size {b}."
    )
  rows = np.concatenate([np.flatnonzero(alive), np.zeros(m - num_alive, int)])
  floor = structure_floor(b, num_alive)
  if config.tau is not None:
    floor = max(floor, math.ceil(config.tau * num_alive))
  check = config.certificate if weight is not None else "none"
  next_weight = _validation.check_next_weight(next_weight, m, l_mxb.dtype)
  if next_weight is not None and config.certificate != "relu":
    logging.info("next_weight ignored: it holds for FedSGD's relu check only")
    next_weight = None
  next_weight_grad = _validation.check_next_weight(
    next_weight_grad, m, l_mxb.dtype, "next_weight_grad"
  )
  return Problem(
    l_mxb=l_mxb,
    r_bxn=r_bxn,
    bias_grad=bias_grad,
    weight=weight,
    bias=bias,
    tol=tol,
    alive=jnp.asarray(alive),
    alive_rows=jnp.asarray(rows.astype(np.int32)),
    num_alive=num_alive,
    floor=floor,
    check=check,
    drift=(config.drift_max_woken, config.drift_min_association),
    dependent=dependent,
    next_weight=next_weight,
    hidden_span=_hidden_span(next_weight_grad, b, check, tol),
  )


def _hidden_span(
  next_weight_grad: np.ndarray | None, b: int, check: str, tol: Tolerances
) -> np.ndarray | None:
  """The span of the batch's ReLU outputs from the next layer's gradient.

  The next dense layer's weight gradient is ``Delta H^T`` (``c x m``) with
  ``H = relu(W X + beta 1^T)``: when its rank is ``b`` (``Delta`` of full
  column rank, which needs ``c >= b``), its rows span exactly the ``b``
  hidden outputs. Found by a randomized range finder (``b + 8`` probes,
  fixed seed) rather than a full SVD of a ``c x m`` matrix (a zero input's
  output ``relu(beta)`` is one of the ``b``).

  Returns:
    An orthonormal ``m x b`` basis, or ``None`` (logged) when the check is
    not ``"relu"`` or the rank is not ``b``.
  """
  if next_weight_grad is None:
    return None
  reason = None
  if check != "relu":
    reason = "it holds for FedSGD's relu check only"
  elif next_weight_grad.shape[0] < b:
    reason = f"its {next_weight_grad.shape[0]} rows cannot span {b} outputs"
  elif next_weight_grad.shape[1] <= 2 * b:
    # A column's fit has m - b equations beyond the span for b unknowns: a
    # wrong column fits by chance unless they outnumber the unknowns.
    reason = f"a width of {next_weight_grad.shape[1]} <= 2 b leaves no check"
  if reason is None:
    probes = np.random.default_rng(0).standard_normal(
      (next_weight_grad.shape[0], min(b + 8, next_weight_grad.shape[0]))
    )
    range_mxp = np.linalg.qr(next_weight_grad.T @ probes)[0]
    _, s, vt = np.linalg.svd(next_weight_grad @ range_mxp, full_matrices=False)
    rank = int(np.sum(s > tol.rank_rtol * s[0])) if s[0] > 0 else 0
    if rank == b:
      return range_mxp @ vt[:b].T
    reason = f"its rank is {rank}, not the batch size {b}"
  logging.info("next_weight_grad ignored: %s", reason)
  return None


class HiddenFit(NamedTuple):
  """Found columns fitted to the hidden span (:func:`hidden_span_rows`).

  Attributes:
    rows: each column's row of ``Q^{-1}`` (``x = R^T row``).
    residual: ``|(I - U U^T) h| / |h|`` at the fit.
    condition: smallest over largest singular value of the fit's matrix in
      orthonormal input coordinates; about 0 when the pattern admits a line
      of inputs (two samples with one identical pattern), 4e-3 to 2e-2 for
      other columns on saved b = 150, m = 1000 gradients.
  """

  rows: np.ndarray
  residual: np.ndarray
  condition: np.ndarray

  def exact(self, tol: Tolerances) -> np.ndarray:
    """Columns whose input the hidden span fixes: fitted and unique."""
    return (self.residual <= tol.independence) & (
      self.condition > tol.independence
    )


def hidden_span_rows(problem: Problem, found_kxb: np.ndarray) -> HiddenFit:
  """Each found column's row of ``Q^{-1}``, exactly, from the hidden span.

  A column ``q`` of ``Q`` is a sample's ``D`` column ``d = L q``, nonzero
  exactly where that sample activates the neuron (set ``S``). Its input
  ``x`` lies in the row space of ``R`` (orthonormal basis ``B``: ``x = B^T
  u``), and ``h = relu(W x + beta)`` is ``W_S B^T u + beta_S`` on ``S`` and
  zero elsewhere, and lies in the span ``U`` of the batch's outputs
  (:attr:`Problem.hidden_span`): ``m`` linear equations ``(I - U U^T) E_S
  (W_S B^T u + beta_S) = 0`` in ``b`` unknowns. For a true column they hold
  exactly and fix ``x`` (scale included: the bias breaks the homogeneity)
  without any other column; a mixture of samples with different patterns
  leaves a residual (on a saved b = 150, m = 1000 gradient: true columns
  3e-13, a two-sample mixture 0.73). Two samples with one identical
  pattern make the equations singular (any input on the line through
  both fits); ``condition`` says so.

  Args:
    problem: a problem with ``hidden_span``, ``weight`` and ``bias``.
    found_kxb: found columns of ``Q`` (rows; any scale).

  Returns:
    A :class:`HiddenFit`.
  """
  span_mxb = problem.hidden_span
  if span_mxb is None:
    raise ValueError("hidden_span_rows needs the problem's hidden_span.")
  l_np = np.asarray(problem.l_mxb)
  basis_nxb, tri_bxb = np.linalg.qr(np.asarray(problem.r_bxn).T)
  a_mxb = np.asarray(problem.weight) @ basis_nxb
  bias = np.asarray(problem.bias)
  active_mxk = active_mask(problem, l_np @ found_kxb.T)
  k = found_kxb.shape[0]
  coords, residual, condition = np.zeros((k, l_np.shape[1])), *np.zeros((2, k))
  for i in range(k):
    on = active_mxk[:, i]
    h_mxb, h_m = a_mxb * on[:, None], bias * on
    out_mxb = h_mxb - span_mxb @ (span_mxb.T @ h_mxb)
    out_m = h_m - span_mxb @ (span_mxb.T @ h_m)
    coords[i], _, _, sv = np.linalg.lstsq(out_mxb, -out_m, rcond=None)
    fit = float(np.linalg.norm(out_mxb @ coords[i] + out_m))
    size = float(np.linalg.norm(h_mxb @ coords[i] + h_m))
    residual[i] = fit / max(size, 1e-300)
    condition[i] = float(sv[-1]) / max(float(sv[0]), 1e-300)
  # x = B^T u = R^T row with R^T = B T: row = T^{-1} u (least squares: a
  # zero input's row of R is zero).
  rows = np.linalg.lstsq(tri_bxb, coords.T, rcond=None)[0].T
  return HiddenFit(rows.astype(l_np.dtype), residual, condition)


def zero_mask(problem: Problem, grad_z_mxb: np.ndarray) -> np.ndarray:
  """The exact zeros of a recovered ``D`` over alive rows (on the host):
  ``|D_ji| <= zero_tol ||D_i||``."""
  column_norm = np.linalg.norm(grad_z_mxb, axis=0)
  zero = np.abs(grad_z_mxb) <= problem.tol.zero * column_norm[None, :]
  return zero & np.asarray(problem.alive)[:, None]


def active_mask(problem: Problem, grad_z_mxk: np.ndarray) -> np.ndarray:
  """The nonzeros of recovered ``D`` columns over alive rows (on the host):
  where each column's sample is active (:func:`zero_mask`'s complement)."""
  return ~zero_mask(problem, grad_z_mxk) & np.asarray(problem.alive)[:, None]


def next_layer_residuals(
  problem: Problem, grad_z_mxk: np.ndarray
) -> np.ndarray:
  r"""How far each column of ``D`` is from what the next layer allows.

  When this layer's ReLU output feeds a dense layer ``V`` (``c x m``), a
  sample's ``dL/dZ`` is ``1[z_i > 0] * (V^T g_i)`` with ``g_i`` its
  gradient at the next layer's pre-activation: on the column's nonzero
  rows ``N`` it lies in the span of ``V^T[N]``. A mixture ``sum_j c_j d_j``
  is ``sum_j c_j 1[z_j > 0] * (V^T g_j)`` and leaves that span wherever
  the mixed samples' patterns differ. This matters where ``c`` is below
  ``|N|``, i.e. for the last hidden layer of a classifier: there
  ``g_i = softmax - onehot`` has rank ``c - 1`` over the batch, so a
  mixture of ``c`` columns with ``sum_j c_j g_j = 0`` vanishes on every row
  where they are all active and all inactive, and is nearly as sparse as a
  true column (seen: a 10-sample mixture with 455 zeros of 1000 against 473
  to 532 for the true columns, on an MLP's second layer). True columns come
  out at 1e-15, such mixtures near 1.

  Args:
    problem: the problem (``problem.next_weight`` is not ``None``).
    grad_z_mxk: candidate columns of ``D``.

  Returns:
    ``|d_N - V^T[N] g| / |d_N|`` at the best ``g`` per column; ``0`` where
    ``|N| <= c`` (the span holds anything there).
  """
  v_cxm = np.asarray(problem.next_weight)
  nonzero = active_mask(problem, grad_z_mxk)
  out = np.zeros(grad_z_mxk.shape[1])
  for k in range(grad_z_mxk.shape[1]):
    rows = np.flatnonzero(nonzero[:, k])
    if rows.size <= v_cxm.shape[0]:
      continue
    d_r, basis = grad_z_mxk[rows, k], np.linalg.qr(v_cxm[:, rows].T)[0]
    resid = d_r - basis @ (basis.T @ d_r)
    out[k] = float(np.linalg.norm(resid)) / max(
      float(np.linalg.norm(d_r)), 1e-300
    )
  return out


def fits_next_layer(problem: Problem, grad_z_mxk: np.ndarray) -> np.ndarray:
  """Columns of ``D`` the next layer allows (all, without its weight)."""
  if problem.next_weight is None:
    return np.ones(grad_z_mxk.shape[1], bool)
  return next_layer_residuals(problem, grad_z_mxk) <= problem.tol.independence
