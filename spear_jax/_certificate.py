"""The ReLU certificate: does a recovered batch explain the gradient?

For the true batch, ``D = dL/dZ`` vanishes wherever the ReLU is inactive:
``Z = W X + beta 1^T <= 0`` implies ``D = 0``. Hence every nonzero of the
recovered ``D`` must sit on an active neuron of the recovered ``X``. A wrong
selection of directions mixes samples; the mixed ``X`` then puts nonzeros of
``D`` on inactive neurons with overwhelming probability.
"""

import jax
import jax.numpy as jnp

from spear_jax._types import Array
from spear_jax._types import Bool
from spear_jax._types import Float

_HI = jax.lax.Precision.HIGHEST

__all__ = ["relu_certificate"]


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
     \;\Rightarrow\; Z_{ji} > -\text{slack}\, S_{ji}

  and column ``i`` of ``D`` is not identically zero.

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
  violated_b = jnp.any(nonzero_mxb & inactive_mxb, axis=0)
  finite_b = jnp.all(jnp.isfinite(inputs_bxn), axis=1)
  return (~violated_b) & (column_norm_b > 0) & finite_b
