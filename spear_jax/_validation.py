"""Checks of user input: one clear ``ValueError`` per problem."""

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax._types import ArrayLike

__all__ = [
  "FullRankError",
  "check_batch_size",
  "check_inputs",
  "check_rank",
]


class FullRankError(ValueError):
  """The gradient has full numerical rank: noisy, aggregated or too big."""


def _as_float_array(value: ArrayLike, name: str) -> jax.Array:
  array: jax.Array | np.ndarray
  if isinstance(value, jax.Array):
    array = value  # no host copy of a (possibly 1.2 GB) device array
  else:
    try:
      array = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - any conversion failure is bad input
      raise ValueError(f"{name} is not an array: {err}") from None
  if array.dtype == object or not (
    np.issubdtype(array.dtype, np.number) or array.dtype == bool
  ):
    raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
  if np.issubdtype(array.dtype, np.complexfloating):
    raise ValueError(f"{name} must be real, got dtype {array.dtype}.")
  out = jnp.asarray(array)
  if not jnp.issubdtype(out.dtype, jnp.floating) or out.dtype.itemsize < 4:
    out = out.astype(jnp.result_type(float))
  return out


@jax.jit
def _finite_and_nonzero(array):
  return jnp.isfinite(array).all(), jnp.any(array != 0)


def _check_finite(array, name):
  # One fused reduction: a whole-array np.isfinite would allocate a bool
  # copy (and np.asarray a host copy) of an m x n gradient.
  finite, _ = _finite_and_nonzero(array)
  if not bool(finite):
    raise ValueError(f"{name} contains NaN or infinite values.")


def _cast(array: jax.Array, dtype) -> jax.Array:
  """``array`` in ``dtype``; no copy when it already is (1.2 GB layers)."""
  return array if array.dtype == dtype else array.astype(dtype)


def check_inputs(
  weight_grad: ArrayLike,
  bias_grad: ArrayLike,
  weight: ArrayLike | None,
  bias: ArrayLike | None,
  batch_size: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
  """Validates shapes, dtypes and values; returns JAX arrays of one dtype.

  Raises:
    ValueError: with a one-line message naming the offending argument.
  """
  weight_grad = _as_float_array(weight_grad, "weight_grad")
  bias_grad = _as_float_array(bias_grad, "bias_grad")
  if weight_grad.ndim != 2:
    raise ValueError(
      f"weight_grad must be 2-D (m, n), got shape {tuple(weight_grad.shape)}."
    )
  m, n = weight_grad.shape
  if m < 2 or n < 1:
    raise ValueError(f"weight_grad shape {(m, n)} is too small.")
  if bias_grad.shape != (m,):
    raise ValueError(
      f"bias_grad must have shape ({m},) to match weight_grad {(m, n)}, got "
      f"{tuple(bias_grad.shape)}."
    )
  dtype = jnp.promote_types(weight_grad.dtype, bias_grad.dtype)
  weight_grad, bias_grad = _cast(weight_grad, dtype), _cast(bias_grad, dtype)
  _check_finite(weight_grad, "weight_grad")
  _check_finite(bias_grad, "bias_grad")
  if not bool(_finite_and_nonzero(weight_grad)[1]):
    raise ValueError("weight_grad is all zeros: nothing to invert.")
  if (weight is None) != (bias is None):
    raise ValueError(
      "give both weight and bias (for the certificate) or neither."
    )
  layer_weight = layer_bias = None
  if weight is not None and bias is not None:
    layer_weight = _cast(_as_float_array(weight, "weight"), dtype)
    layer_bias = _cast(_as_float_array(bias, "bias"), dtype)
    if layer_weight.shape != (m, n):
      raise ValueError(
        f"weight must have shape {(m, n)} like weight_grad, got "
        f"{tuple(layer_weight.shape)} (flax kernels are (n, m): transpose "
        "them)."
      )
    if layer_bias.shape != (m,):
      raise ValueError(
        f"bias must have shape ({m},), got {tuple(layer_bias.shape)}."
      )
    _check_finite(layer_weight, "weight")
    _check_finite(layer_bias, "bias")
  if batch_size is not None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size:
      raise ValueError(f"batch_size must be an integer, got {batch_size!r}.")
    if not 1 <= batch_size < min(m, n):
      raise ValueError(
        f"batch_size must lie in [1, {min(m, n) - 1}] for a {m} x {n} "
        f"gradient, got {batch_size}."
      )
  return weight_grad, bias_grad, layer_weight, layer_bias


def check_next_weight(
  next_weight: ArrayLike | None, m: int, dtype, name: str = "next_weight"
) -> np.ndarray | None:
  """Validates the next layer's weight or weight gradient (``c x m``).

  Returns:
    A host array, or ``None`` for ``None``.

  Raises:
    ValueError: with a one-line message (shape, non-finite values).
  """
  if next_weight is None:
    return None
  array = _cast(_as_float_array(next_weight, name), dtype)
  if array.ndim != 2 or array.shape[1] != m:
    raise ValueError(
      f"{name} must have shape (c, {m}) (the next dense layer's, reading "
      f"this layer's {m} outputs, in the paper's layout), got "
      f"{tuple(array.shape)} (flax kernels are (m, c): transpose them)."
    )
  _check_finite(array, name)
  return np.asarray(array)


def check_rank(rank: int, batch_size: int | None, m: int, n: int) -> int:
  """Checks the numerical rank against the shape and the requested ``b``.

  A ``batch_size`` above the rank is not an error here: duplicated (or
  otherwise linearly dependent) inputs, and all-zero ones, give a gradient
  of rank below ``b`` (see :func:`check_batch_size`).

  Returns:
    The numerical rank.

  Raises:
    ValueError: if the gradient has full rank (no low-rank structure) or
      its rank exceeds ``batch_size``.
  """
  if rank >= min(m, n):
    raise FullRankError(
      f"weight_grad has full numerical rank {rank} = min(m, n): no low-rank "
      "structure to invert (noisy, aggregated, or a batch at least as large "
      "as the layer)."
    )
  if batch_size is not None and batch_size < rank:
    raise ValueError(
      f"batch_size={batch_size} contradicts the numerical rank {rank} of "
      f"weight_grad: a batch of {batch_size} gives a rank of at most "
      f"{batch_size}."
    )
  return rank


def check_batch_size(
  batch_size: int | None, samples: int, zero_input: bool
) -> int:
  """The requested ``batch_size`` against the samples the gradient shows.

  Args:
    batch_size: the requested ``b`` (``None``: not given).
    samples: the rank, plus one when the bias gradient shows zero inputs.
    zero_input: whether it does.

  Returns:
    ``batch_size - samples`` (``0`` without ``batch_size``): inputs that
    are linear combinations of the others, e.g. duplicates.

  Raises:
    ValueError: if ``batch_size`` is below ``samples``.
  """
  if batch_size is None:
    return 0
  if batch_size < samples:
    raise ValueError(
      f"batch_size={batch_size} contradicts the gradients: weight_grad has "
      f"rank {samples - zero_input}, and the bias gradient shows an all-zero "
      "input besides."
    )
  if batch_size > samples:
    logging.warning(
      "the gradients show %d samples < batch_size=%d: %d inputs are linear "
      "combinations of the others (duplicates?); recovering %d samples.",
      samples,
      batch_size,
      batch_size - samples,
      samples,
    )
  return batch_size - samples
