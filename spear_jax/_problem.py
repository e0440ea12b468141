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
  "Problem",
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
) -> Problem:
  """Validates the gradients and builds the :class:`Problem`.

  Args:
    weight_grad: ``dL/dW`` in the paper's layout, ``(m, n)``.
    bias_grad: ``dL/dbeta``, ``(m,)``.
    batch_size: ``b``; ``None`` estimates it as the numerical rank.
    weight: the layer's ``W`` (``m x n``), for the certificate.
    bias: the layer's ``beta`` (``m,``), for the certificate.
    config: an :class:`AttackConfig` (tolerances, ``tau``).

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
  )
