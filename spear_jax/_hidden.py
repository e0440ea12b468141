"""Taking found samples out of the gradient through the hidden span.

With the next dense layer's weight gradient, a found column fixes its
sample's input exactly (:func:`spear_jax.attack.hidden_span_rows`), scale
included, so its whole contribution ``d x^T`` to the weight gradient and
``d`` to the bias gradient is known. Subtracting it leaves the gradient of
the other samples alone: a smaller batch of the same layer, searched as
any other. On a saved low-contrast b = 150, m = 1000 gradient the l1
search had 126 columns after 300 s and no way to the last 24 (their
restarts in the complement of the found samples kept falling back into
found basins); with those 126 samples taken out, the 24 were found and
certified in 18 s.
"""

from typing import NamedTuple

from absl import logging
import jax.numpy as jnp
import numpy as np

from spear_jax._config import AttackConfig
from spear_jax._problem import Problem
from spear_jax._problem import active_mask
from spear_jax._problem import hidden_span_rows
from spear_jax._problem import prepare_problem
from spear_jax._selection import Reconstruction
from spear_jax._selection import relu_flags

__all__ = [
  "Peel",
  "hidden_partial_result",
  "hidden_refit",
  "lift_directions",
  "peel_found",
]


class Peel(NamedTuple):
  """Samples taken out of a problem.

  Attributes:
    problem: the batch of the other samples (same layer, same hidden span).
    columns: the taken-out samples' unit columns of ``Q`` (rows, in the
      original problem's coordinates).
  """

  problem: Problem
  columns: np.ndarray


def peel_found(
  problem: Problem, found_kxb: np.ndarray, config: AttackConfig
) -> Peel | None:
  """Takes the found samples whose inputs the hidden span fixes out.

  A column ``q`` with row ``r`` of ``Q^{-1}`` (``r q = 1``) adds ``L q r R``
  to ``weight_grad = L R`` and ``L q`` to the bias gradient; the rest of
  the batch is ``L (I - sum q r) R``. Only columns that fit the span and
  fix one input (:meth:`~spear_jax.attack.HiddenFit.exact`) are taken.

  Returns:
    The :class:`Peel`, or ``None`` when no column qualifies, none would be
    left, or the rest does not have the expected rank (logged).
  """
  if problem.hidden_span is None or not found_kxb.shape[0]:
    return None
  fit = hidden_span_rows(problem, found_kxb)
  exact = fit.exact(problem.tol)
  rest = problem.b - int(exact.sum())
  if not exact.any() or rest < 1:
    return None
  rows = fit.rows[exact]
  q_kxb = found_kxb[exact] / np.sum(found_kxb[exact] * rows, axis=1)[:, None]
  l_mxb, r_bxn = np.asarray(problem.l_mxb), np.asarray(problem.r_bxn)
  weight_grad = l_mxb @ (r_bxn - q_kxb.T @ (rows @ r_bxn))
  bias_grad = np.asarray(problem.bias_grad) - l_mxb @ q_kxb.sum(axis=0)
  try:
    sub = prepare_problem(
      weight_grad,
      bias_grad,
      batch_size=rest,
      weight=problem.weight,
      bias=problem.bias,
      config=config,
      next_weight=problem.next_weight,
    )
  except ValueError as err:
    logging.info("found samples not taken out: %s", err)
    return None
  logging.info(
    "took %d found samples out of the gradient; searching the other %d",
    problem.b - rest,
    rest,
  )
  columns = q_kxb / np.linalg.norm(q_kxb, axis=1, keepdims=True)
  return Peel(sub._replace(hidden_span=problem.hidden_span), columns)


def lift_directions(
  problem: Problem, sub: Problem, directions_kxs: np.ndarray
) -> np.ndarray:
  """Directions of a peeled problem ``sub`` as unit directions of
  ``problem`` (``D``'s columns are the same vectors in both)."""
  columns_mxk = np.asarray(sub.l_mxb) @ directions_kxs.T
  lifted = (np.asarray(problem.l_mxb).T @ columns_mxk).T
  norms = np.maximum(np.linalg.norm(lifted, axis=1, keepdims=True), 1e-300)
  return lifted / norms


def _fitted_samples(problem, result, columns_kxb):
  """The columns (of the first ``k``) the span fixes, and ``result`` with
  their inputs and ``D`` columns taken from the fit.

  The fit reads only a column's pattern, so two columns with one pattern
  would give one input twice (a mixture of a nested pair next to the
  pair's column, whose pattern it shares): neither is taken then.
  """
  columns_kxb = _split_shared_patterns(problem, columns_kxb)
  fit = hidden_span_rows(problem, columns_kxb)
  _, group, count = np.unique(
    _active(problem, columns_kxb).T,
    axis=0,
    return_inverse=True,
    return_counts=True,
  )
  alone = count[group.reshape(-1)] == 1
  exact = np.flatnonzero(fit.exact(problem.tol) & alone)
  rows = fit.rows[exact]
  q_kxb = (
    columns_kxb[exact] / np.sum(columns_kxb[exact] * rows, axis=1)[:, None]
  )
  inputs, grad_z = np.array(result.inputs), np.array(result.grad_z)
  q_bxb = np.array(result.q)
  inputs[exact] = rows @ np.asarray(problem.r_bxn)
  grad_z[:, exact] = np.asarray(problem.l_mxb) @ q_kxb.T
  q_bxb[:, exact] = q_kxb.T
  return exact, result._replace(
    inputs=jnp.asarray(inputs), grad_z=jnp.asarray(grad_z), q=jnp.asarray(q_bxb)
  )


def _active(problem, columns_kxb):
  return active_mask(problem, np.asarray(problem.l_mxb) @ columns_kxb.T)


def _split_shared_patterns(problem, columns_kxb):
  """Two columns with one pattern: the second becomes the nested
  sample's column of their plane, where the span finds exactly one.

  Of a nested pair (one sample's zero set that of the other plus a few
  rows) every mixture has the larger sample's pattern, and the search can
  end with two such mixtures. The nested sample's column vanishes on one
  more row of that pattern, and its pattern fits the hidden span; the
  plane vectors vanishing on other rows are mixtures and do not (on a
  shifted b = 100 batch: residual 6e-15 against 5e-4 and more). Groups of
  three or more are left alone.
  """
  active = _active(problem, columns_kxb)
  _, group, count = np.unique(
    active.T, axis=0, return_inverse=True, return_counts=True
  )
  group = group.reshape(-1)
  l_mxb = np.asarray(problem.l_mxb)
  columns_kxb = columns_kxb.copy()
  for g in np.flatnonzero(count == 2):
    pair = np.flatnonzero(group == g)
    plane_mx2 = l_mxb @ columns_kxb[pair].T
    rows = np.flatnonzero(active[:, pair[0]])
    # The plane vector vanishing at row i is (p_i1, -p_i0) in pair coords.
    coef_rx2 = np.stack([plane_mx2[rows, 1], -plane_mx2[rows, 0]], axis=1)
    coef_rx2 /= np.linalg.norm(coef_rx2, axis=1, keepdims=True)
    # Each such vector has one zero more; the nested column is the one
    # whose pattern fits the span (the others are mixtures cancelling on
    # one row).
    fit = hidden_span_rows(problem, coef_rx2 @ columns_kxb[pair])
    exact = np.flatnonzero(fit.exact(problem.tol))
    if exact.size == 1:
      column = coef_rx2[exact[0]] @ columns_kxb[pair]
      columns_kxb[pair[1]] = column / np.linalg.norm(column)
  return columns_kxb


def hidden_partial_result(
  problem: Problem, result: Reconstruction, found_kxb: np.ndarray
) -> Reconstruction:
  """A partial reconstruction's found samples, from the hidden span.

  ``result`` rebuilds ``k < b`` found columns (its first ``k``) and
  fillers. ``X^T = Q^{-1} R`` puts every filler into every sample, so
  nothing of it is verified; but a found column that fits the hidden span
  and fixes one input (:func:`~spear_jax.attack.hidden_span_rows`) gives
  that sample's input and scaled column on its own. Those replace the
  rebuilt ones and are verified by the ReLU certificate, sample by
  sample (no other column enters them). Without the span nothing is
  verified.
  """
  verified = np.zeros(problem.b, bool)
  if problem.hidden_span is None or not found_kxb.shape[0]:
    return result._replace(verified=jnp.asarray(verified))
  exact, result = _fitted_samples(problem, result, found_kxb)
  verified[exact] = np.asarray(
    relu_flags(problem, result.inputs, result.grad_z)
  )[exact]
  return result._replace(verified=jnp.asarray(verified))


def hidden_refit(
  problem: Problem, result: Reconstruction
) -> tuple[Reconstruction, np.ndarray, np.ndarray]:
  """A full reconstruction's inputs from the hidden span where it fixes
  them.

  ``X^T = Q^{-1} R`` inherits the conditioning of ``R``: nearly dependent
  inputs (shifted frames) come out to about ``eps s_1 / s_b``, 1e-8 on a
  b = 100 batch. The span's fit solves in orthonormal input coordinates
  from the sample's own pattern (condition 6e-3 on such a batch). It also
  fixes inputs whose ``D`` columns the zero sets do not: of a nested pair
  (one sample's zeros those of the other plus one row) every mixture
  shares the larger pattern, but that pattern still pins one input.

  Returns:
    ``(result, refitted, certified)``: the result with the refitted inputs
    and columns, which samples were refitted, and which of those pass the
    ReLU certificate (nothing without the span).
  """
  refitted = np.zeros(problem.b, bool)
  if problem.hidden_span is None:
    return result, refitted, refitted
  exact, result = _fitted_samples(problem, result, np.asarray(result.q).T)
  refitted[exact] = True
  return (
    result,
    refitted,
    refitted & np.asarray(relu_flags(problem, result.inputs, result.grad_z)),
  )
