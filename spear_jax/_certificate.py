"""The ReLU certificate: does a recovered batch explain the gradient?

For the true batch, ``D = dL/dZ`` vanishes wherever the ReLU is inactive:
``Z = W X + beta 1^T <= 0`` implies ``D = 0``. Hence every nonzero of the
recovered ``D`` must sit on an active neuron of the recovered ``X``. A wrong
selection of directions mixes samples; the mixed ``X`` then puts nonzeros of
``D`` on inactive neurons with overwhelming probability.
"""

import jax
import jax.numpy as jnp

from spear_jax._linalg import _leverages
from spear_jax._linalg import pinning_rows_dropped
from spear_jax._linalg import rows_gram_eigh
from spear_jax._types import Array
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int

_HI = jax.lax.Precision.HIGHEST

__all__ = ["drift_certificate", "identifiable_inputs", "relu_certificate"]


@jax.jit
def relu_certificate(
  inputs_bxn: Float[Array, "b n"],
  grad_z_mxb: Float[Array, "m b"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  zero_tol: Float[Array, ""],
  slack: Float[Array, ""],
) -> Bool[Array, " b"]:
  r"""Per-sample ReLU certificate.

  With ``Z = W X + beta`` and the entrywise magnitude
  ``S = |W| |X| + |beta|`` (the scale of the rounding error of ``Z``),
  sample ``i`` is verified iff for every neuron ``j``

  .. math:: |D_{ji}| > \text{zero\_tol}\, \|D_{:,i}\|_2
     \;\Leftrightarrow\; Z_{ji} > \pm\text{slack}\, S_{ji}

  (a nonzero of ``D`` on a neuron that is not clearly inactive, and a zero
  on one that is not clearly active) and column ``i`` of ``D`` is not
  identically zero. The second direction matters for near-twins: a
  direction of the twins' span that vanishes on one extra row ``rho`` has
  as many zeros as the true twin, and its sample can sit on the active side
  of ``rho``; ``D_{ji} = 0`` on an active neuron needs an exactly zero
  upstream gradient, which a real network does not produce.

  Args:
    inputs_bxn: recovered ``X^T``.
    grad_z_mxb: recovered ``D``.
    weight_mxn: the layer's weight ``W``.
    bias_m: the layer's bias ``beta``.
    zero_tol: relative tolerance for a zero of ``D``.
    slack: relative slack on the sign of ``Z``.

  Returns:
    A boolean per sample.
  """
  z_mxb = jnp.dot(weight_mxn, inputs_bxn.T, precision=_HI) + bias_m[:, None]
  scale_mxb = (
    jnp.dot(jnp.abs(weight_mxn), jnp.abs(inputs_bxn).T, precision=_HI)
    + jnp.abs(bias_m)[:, None]
  )
  column_norm_b = jnp.linalg.norm(grad_z_mxb, axis=0)
  nonzero_mxb = jnp.abs(grad_z_mxb) > zero_tol * column_norm_b[None, :]
  inactive_mxb = z_mxb <= -slack * scale_mxb
  active_mxb = z_mxb > slack * scale_mxb
  violated_b = jnp.any(nonzero_mxb & inactive_mxb, axis=0) | jnp.any(
    ~nonzero_mxb & active_mxb, axis=0
  )
  finite_b = jnp.all(jnp.isfinite(inputs_bxn), axis=1)
  return (~violated_b) & (column_norm_b > 0) & finite_b


def _pinned_columns(zero_mxb, l_mxb, leverage_tol):
  """Per column: does its zero set pin it down (1-D kernel, no leverage 1)?

  One column at a time (``lax.map``): memory stays ``O(m b)``.
  """
  dtype = l_mxb.dtype

  def pins_down(zero_m):
    masked = l_mxb * zero_m[:, None].astype(dtype)
    eigvals, eigvecs = jnp.linalg.eigh(jnp.dot(masked.T, masked, precision=_HI))
    tiny = jnp.finfo(dtype).tiny
    coords = jnp.dot(l_mxb, eigvecs, precision=_HI)[:, 1:]
    leverage = jnp.sum(
      coords**2 / jnp.maximum(eigvals[1:], tiny)[None, :], axis=1
    )
    one_dim = eigvals[1] > leverage_tol * eigvals[-1]
    return one_dim & ~jnp.any(zero_m & (leverage >= 1.0 - leverage_tol))

  return jax.lax.map(pins_down, zero_mxb.T)


def _association(nonzero_mxb, z_mxb, alive_mx1):
  """Per sample: the share of inactive neurons (``z <= 0``) with a nonzero
  (woken), and Youden's ``J = P(nonzero | active) - woken``."""
  active_mxb = (z_mxb > 0) & alive_mx1
  inactive_mxb = (z_mxb <= 0) & alive_mx1

  def share(mask, of):
    return jnp.sum(mask & of, axis=0) / jnp.maximum(jnp.sum(of, axis=0), 1)

  woken_b = share(nonzero_mxb, inactive_mxb)
  return woken_b, share(nonzero_mxb, active_mxb) - woken_b


@jax.jit
def drift_certificate(
  inputs_bxn: Float[Array, "b n"],
  grad_z_mxb: Float[Array, "m b"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  min_zeros: Int[Array, ""],
  zero_tol: Float[Array, ""],
  leverage_tol: Float[Array, ""],
  max_woken: Float[Array, ""],
  min_association: Float[Array, ""],
  update_r_bxn: Float[Array, "b n"] | None = None,
  update_bias_m: Float[Array, " m"] | None = None,
) -> Bool[Array, " b"]:
  r"""Per-sample certificate of a FedAvg update (the weights drift).

  After several local steps the server's ReLU pattern no longer bounds
  ``D_eff``: neurons inactive at the server wake up during training
  (nonzeros on server-inactive neurons, up to half of a column's nonzeros
  at ``lr = 0.1``) and, with mini-batches, active ones go to sleep before
  the sample is first seen (zeros on server-active neurons). The local
  weights are unknown, so the strict certificate rejects the truth. What
  stays knowable:

  1. *Structure* (exact algebra, no weights): the column has at least
     ``min_zeros`` zeros over alive rows and its zero set pins it down: the
     kernel of ``L`` on those rows is one-dimensional and no row of the set
     has leverage ``1`` (:func:`spear_jax.attack.polish_direction`'s
     mixture test). A mixture of ``k >= 2`` columns of ``Q`` vanishes only
     where all ``k`` do, and there the kernel is ``k``-dimensional; a
     generic direction has only the ``b - 1`` zeros it was built from.
  2. *Association* with the server's pattern over alive rows: the share of
     server-inactive neurons with a nonzero (woken) is at most
     ``max_woken``, and ``P(nonzero | active) - P(nonzero | inactive)``
     (Youden's J) is at least ``min_association``. For the truth J is 1 in
     FedSGD and stayed above 0.5 in every FedAvg setting whose columns kept
     more than a quarter zeros (BUILD_NOTES.md); a wrong sample's ``x`` has
     a pattern unrelated to its ``D`` column (J near 0).

  Because ``X^T = Q^{-1} R`` couples the samples (one wrong column of
  ``Q`` spoils every ``x_i`` while the right columns of ``D`` stay right),
  the structure test must hold for *every* column before any sample is
  certified; the association test is then per sample.

  With the update (``update_r_bxn``, ``update_bias_m``: the weight update
  is ``l_mxb @ update_r_bxn``), the association is read at the midpoint of
  the local trajectory, ``W - s G / 2``, with the sign ``s`` (which
  convention the delta has) that gives the larger mean ``J`` over the
  batch. There the truth's pattern agrees better: at b = 16, m = 200 and
  12 local steps at lr = 0.05 the smallest true ``J`` rose from 0.25-0.30
  to 0.44-0.59 and the wrong sign's fell to -0.18-0.06; a wrong sample's
  ``x`` stays unrelated to its column at any weights.

  Returns:
    A boolean per sample.
  """
  z_mxb = jnp.dot(weight_mxn, inputs_bxn.T, precision=_HI) + bias_m[:, None]
  column_norm_b = jnp.linalg.norm(grad_z_mxb, axis=0)
  alive_mx1 = alive_m[:, None]
  zero_mxb = (
    jnp.abs(grad_z_mxb) <= zero_tol * column_norm_b[None, :]
  ) & alive_mx1
  nonzero_mxb = ~zero_mxb & alive_mx1
  woken_b, association_b = _association(nonzero_mxb, z_mxb, alive_mx1)
  if update_r_bxn is not None and update_bias_m is not None:
    half_mxb = 0.5 * (
      jnp.dot(
        l_mxb,
        jnp.dot(update_r_bxn, inputs_bxn.T, precision=_HI),
        precision=_HI,
      )
      + update_bias_m[:, None]
    )
    plus = _association(nonzero_mxb, z_mxb - half_mxb, alive_mx1)
    minus = _association(nonzero_mxb, z_mxb + half_mxb, alive_mx1)
    gradient_like = jnp.mean(plus[1]) >= jnp.mean(minus[1])
    woken_b = jnp.where(gradient_like, plus[0], minus[0])
    association_b = jnp.where(gradient_like, plus[1], minus[1])

  structured_b = _pinned_columns(zero_mxb, l_mxb, leverage_tol)
  structured_b &= jnp.sum(zero_mxb, axis=0, dtype=min_zeros.dtype) >= min_zeros
  finite_b = jnp.all(jnp.isfinite(inputs_bxn), axis=1)
  # X^T = Q^-1 R couples the samples: one wrong column of Q spoils every
  # x_i while the right columns of D stay right, so a sample is only
  # certified when every column of the selection is pinned down.
  return (
    jnp.all(structured_b)
    & (woken_b <= max_woken)
    & (association_b >= min_association)
    & (column_norm_b > 0)
    & finite_b
  )


@jax.jit
def identifiable_inputs(
  grad_z_mxb: Float[Array, "m b"],
  q_bxb: Float[Array, "b b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  zero_tol: Float[Array, ""],
  degenerate_tol: Float[Array, ""],
  leverage_tol: Float[Array, ""],
) -> Bool[Array, " b"]:
  r"""Per sample: does the layer's gradient pin its input down?

  Two ways near-twins leave inputs undetermined, both read off the recovered
  batch (every alternative shares what is tested):

  1. *A sliding input.* Column ``a``'s zero set ``Z_a`` has a kernel of
     dimension two or more in ``L``: another combination ``D u`` of the other
     columns vanishes on it too (a twin whose zero set contains ``Z_a``).
     Then ``Q' = Q M`` with ``M = I + c u e_a^T - c diag(u)`` (``M 1 = 1``)
     explains the weight and bias gradients exactly for every small ``c``,
     keeps every zero set and passes the ReLU certificate; the inputs
     ``x_j`` with ``u_j != 0`` slide along ``x_a``.
  2. *Competing twins.* A column is pinned by its zero set when the kernel
     there is one-dimensional and no row has leverage one
     (:func:`spear_jax.attack.polish_direction`). A column with a row of
     leverage one lies in a span ``V`` of twins that its zero set, without
     that row, annihilates (:func:`spear_jax.attack.twin_span`); every row
     outside the twins' shared zeros picks another direction of ``V`` with
     the same zero count, and with two such columns the twins can be traded
     for another pair of samples that explains everything. With one
     unpinned column its input is fixed by the others and the bias
     (``x = r R / (r . L^T dbeta)``, ``r`` orthogonal to the others) and the
     two-sided certificate pins the column; with two or more, every sample
     whose column lies in one of their spans is reported.

  Args:
    grad_z_mxb: the recovered ``D``.
    q_bxb: the recovered ``Q`` (``D = L Q``).
    l_mxb: the left factor ``L``.
    alive_m: mask of alive rows.
    zero_tol: relative tolerance for a zero of ``D``.
    degenerate_tol: a Gram eigenvalue at most this times the largest counts
      as a kernel direction.
    leverage_tol: a row of leverage at least ``1 - leverage_tol`` pins.

  Returns:
    A boolean per sample: ``False`` where the input is not determined.
  """
  b = q_bxb.shape[0]
  column_norm_b = jnp.linalg.norm(grad_z_mxb, axis=0)
  zero_mxb = (jnp.abs(grad_z_mxb) <= zero_tol * column_norm_b[None, :]) & (
    alive_m[:, None]
  )
  unit_q_bxb = (
    q_bxb / jnp.maximum(jnp.linalg.norm(q_bxb, axis=0), 1e-300)[None, :]
  )

  def kernel(rows_m):
    eigvals, eigvecs = rows_gram_eigh(l_mxb, rows_m)
    return eigvals, eigvecs, eigvals <= degenerate_tol * eigvals[-1]

  def assess(args):
    a, zero_m = args
    eigvals, eigvecs, null_b = kernel(zero_m)
    extra_b = null_b & (jnp.arange(b) > 0)
    # 1. The extra kernel directions in the samples' coordinates (Q^-1 n).
    coeffs_bxb = jnp.linalg.solve(
      q_bxb, jnp.where(extra_b[None, :], eigvecs, 0)
    )
    size_b = jnp.max(jnp.abs(coeffs_bxb), axis=0, keepdims=True)
    moves_bxb = jnp.abs(coeffs_bxb) > 1e-6 * jnp.maximum(size_b, 1e-300)
    slides_b = jnp.any(moves_bxb & extra_b[None, :], axis=1) & (
      jnp.arange(b) != a
    )
    # 2. Pinned, or the twin span of the zero set without its pinning rows.
    leverage_m = _leverages(l_mxb, eigvals, eigvecs)
    pinned = ~jnp.any(extra_b) & ~jnp.any(
      zero_m & (leverage_m >= 1.0 - leverage_tol)
    )
    kept_m = pinning_rows_dropped(
      l_mxb, zero_m, eigvals, eigvecs, jnp.any(extra_b)
    )
    _, span_bxb, span_b = kernel(kept_m)
    basis_bxb = jnp.where(span_b[None, :], span_bxb, 0)
    outside_b = unit_q_bxb - jnp.dot(
      basis_bxb, jnp.dot(basis_bxb.T, unit_q_bxb, precision=_HI), precision=_HI
    )
    in_span_b = jnp.linalg.norm(outside_b, axis=0) <= 1e-6
    return slides_b, pinned, in_span_b

  slides_bxb, pinned_b, in_span_bxb = jax.lax.map(
    assess, (jnp.arange(b), zero_mxb.T), batch_size=8
  )
  competing = jnp.sum(~pinned_b) >= 2
  traded_b = competing & jnp.any(in_span_bxb & ~pinned_b[:, None], axis=0)
  return ~(jnp.any(slides_bxb, axis=0) | traded_b)
