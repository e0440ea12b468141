r"""Labels from the classifier's gradient, once the inputs are known.

For a softmax cross-entropy head ``logits_i = W h_i + beta`` (``W``:
``c x k``), the head's gradient is a sum over the batch,

.. math::
  \frac{\partial L}{\partial W} = s \sum_i (p_i - e_{y_i}) h_i^T, \qquad
  \frac{\partial L}{\partial \beta} = s \sum_i (p_i - e_{y_i}),

with ``p_i = softmax(logits_i)`` and ``s = 1/b`` for the mean loss (``1``
for the sum). With the batch recovered, ``h_i`` and ``p_i`` are known, so
the per-sample output gradients ``g_i = s (p_i - e_{y_i})`` are the
solution of a linear system ``[H, 1]^T G = [dW, dbeta]^T`` and
``e_{y_i} = p_i - g_i / s``: the one-hot vector, exactly, when the
gradient is a softmax cross-entropy gradient at these inputs.

Identifiability: ``G`` is determined where ``[H, 1]`` (``b x (k+1)``) has
full row rank. A sample whose row of ``G`` is not determined (its
``e_i`` has a component in the null space of ``[H, 1]^T``: a duplicate
sample, or ``k + 1 < b``) gets no label. The label counts
``sum_i p_i - dbeta / s`` need no identifiability at all.

Unknown scale (FedAvg deltas, DP-SGD's per-sample clipping): ``p_i -
e_{y_i}`` has exactly one negative entry, at ``y_i``, so the label is
the most negative entry of ``g_i`` for any positive scale. The common
scale is then inferred from the data; a sample is verified only when its
one-hot vector comes out exactly (one local step, no noise).
"""

from typing import NamedTuple

import numpy as np

from spear_jax._types import ArrayLike

__all__ = ["LabelResult", "label_accuracy", "recover_labels"]

LOSSES = ("softmax_cross_entropy",)


class LabelResult(NamedTuple):
  """Recovered labels.

  Attributes:
    labels: ``(b,)`` integer labels in the order of the given inputs;
      ``-1`` where no label could be read (see ``reason``).
    verified: ``(b,)`` whether ``p_i - g_i / s`` is the one-hot vector of
      the label to within ``tol`` (exact recovery).
    identifiable: ``(b,)`` whether the sample's output gradient is
      determined by the head's gradient at all.
    counts: ``(c,)`` how many samples carry each label, from the bias
      gradient (NaN when the scale could not be determined).
    scale: the scale ``s`` used (given) or inferred (NaN if neither).
    residual: relative residual of the linear solve (0 for a consistent
      system).
    reason: ``""`` when every sample got a label, else why not all did.
  """

  labels: np.ndarray
  verified: np.ndarray
  identifiable: np.ndarray
  counts: np.ndarray
  scale: float
  residual: float
  reason: str


def _softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  exp = np.exp(shifted)
  return exp / exp.sum(axis=1, keepdims=True)


def _refused(b, c, reason, residual=np.nan, scale=np.nan, counts=None):
  return LabelResult(
    labels=np.full(b, -1, np.int64),
    verified=np.zeros(b, bool),
    identifiable=np.zeros(b, bool),
    counts=np.full(c, np.nan) if counts is None else counts,
    scale=float(scale),
    residual=float(residual),
    reason=reason,
  )


def _head_arrays(*arrays):
  """The head's arrays in float64, their shapes checked."""
  h, w, beta, dw, dbeta = (np.asarray(a, np.float64) for a in arrays)
  if h.ndim != 2 or w.ndim != 2 or w.shape[1] != h.shape[1]:
    raise ValueError(
      f"head_inputs {h.shape} and head_weight {w.shape} must be (b, k) "
      "and (c, k)."
    )
  c = w.shape[0]
  if dw.shape != w.shape or beta.shape != (c,) or dbeta.shape != (c,):
    raise ValueError(
      f"head shapes disagree: weight {w.shape}, bias {beta.shape}, weight "
      f"gradient {dw.shape}, bias gradient {dbeta.shape}."
    )
  return h, w, beta, dw, dbeta


def _output_gradients(h, dw, dbeta, rank_rtol):
  """``G`` (b x c) of ``[H, 1]^T G = [dW, dbeta]^T``; which rows are fixed."""
  b = h.shape[0]
  a = np.concatenate([h, np.ones((b, 1))], axis=1)
  r = np.concatenate([dw, dbeta[:, None]], axis=1)
  u, sv, vt = np.linalg.svd(a, full_matrices=True)
  rank = int(np.sum(sv > rank_rtol * max(sv[0], 1e-300)))
  # Minimum-norm G = A^{T+} R^T; a row of G is determined when its e_i has
  # no component in the null space of A^T (spanned by u[:, rank:]).
  inv = np.where(np.arange(sv.size) < rank, 1.0 / np.where(sv > 0, sv, 1), 0)
  g = u[:, : sv.size] @ (inv[:, None] * (vt[: sv.size] @ r.T))
  identifiable = np.linalg.norm(u[:, rank:], axis=1) <= 1e-6
  residual = np.linalg.norm(a.T @ g - r.T) / max(np.linalg.norm(r), 1e-300)
  return g, identifiable, rank, float(residual)


def _read_labels(g, probs, dbeta, identifiable, scale, tol):
  """Labels (argmin of each row), exactness, the scale and label counts."""
  b, c = g.shape
  labels = np.argmin(g, axis=1)
  if scale is None:
    # g_iy = s (p_iy - 1): one estimate of s per identifiable sample.
    rows = np.flatnonzero(identifiable)
    estimates = -g[rows, labels[rows]] / np.maximum(
      1.0 - probs[rows, labels[rows]], 1e-300
    )
    used = float(np.median(estimates)) if estimates.size else np.nan
  else:
    used = float(scale)
  counts = np.full(c, np.nan)
  verified = np.zeros(b, bool)
  if np.isfinite(used) and used > 0:
    counts = probs.sum(axis=0) - dbeta / used
    deviation = np.abs(probs - g / used - np.eye(c)[labels]).max(axis=1)
    verified = identifiable & (deviation <= tol)
  return labels, verified, used, counts


def recover_labels(
  head_inputs: ArrayLike,
  head_weight: ArrayLike,
  head_bias: ArrayLike,
  head_weight_grad: ArrayLike,
  head_bias_grad: ArrayLike,
  *,
  scale: float | None = None,
  loss: str = "softmax_cross_entropy",
  tol: float | None = None,
  rank_rtol: float = 1e-10,
) -> LabelResult:
  """Reads each sample's label off the classifier's gradient.

  Args:
    head_inputs: ``(b, k)`` the inputs of the last (classifier) layer of
      the recovered samples, one per row (penultimate features).
    head_weight: ``(c, k)`` the classifier's weight in the paper's layout.
    head_bias: ``(c,)`` its bias.
    head_weight_grad: ``(c, k)`` what the client sent for the weight: the
      gradient, or a positive multiple of a sum of gradients (a FedAvg
      delta, server minus client).
    head_bias_grad: ``(c,)`` the same for the bias.
    scale: ``s`` in ``dW = s sum_i (p_i - e_{y_i}) h_i^T``: ``1/b`` for the
      mean loss, ``1`` for the sum; ``None`` infers a common positive
      scale from the data (FedAvg, DP-SGD).
    loss: the client's loss; only ``"softmax_cross_entropy"`` identifies
      labels this way, anything else is refused with a reason.
    tol: largest deviation of ``p_i - g_i / s`` from a one-hot vector for
      a verified label; default ``1e-6`` in float64, ``1e-2`` otherwise.
    rank_rtol: singular values of ``[H, 1]`` below this times the largest
      count as zero.

  Returns:
    A :class:`LabelResult`.
  """
  if tol is None:
    exact = np.result_type(np.asarray(head_inputs).dtype, np.float32)
    tol = 1e-6 if exact == np.float64 else 1e-2
  h, w, beta, dw, dbeta = _head_arrays(
    head_inputs, head_weight, head_bias, head_weight_grad, head_bias_grad
  )
  if scale is not None and not scale > 0:
    raise ValueError(f"scale must be positive, got {scale}.")
  b, c = h.shape[0], w.shape[0]
  if loss not in LOSSES:
    return _refused(
      b, c, f"labels are read off softmax cross-entropy only, not {loss!r}."
    )
  if not (np.isfinite(h).all() and np.isfinite(dw).all()):
    return _refused(b, c, "non-finite head inputs or gradient.")
  probs = _softmax(h @ w.T + beta[None, :])
  g, identifiable, rank, residual = _output_gradients(h, dw, dbeta, rank_rtol)
  labels, verified, used, counts = _read_labels(
    g, probs, dbeta, identifiable, scale, tol
  )
  if scale is None and not (np.isfinite(used) and used > 0):
    return _refused(
      b,
      c,
      "the head's update is not a positive multiple of a softmax "
      "cross-entropy gradient at these inputs.",
      residual,
      used,
    )
  if scale is not None and identifiable.any() and not verified.any():
    return _refused(
      b,
      c,
      f"the head's gradient is not a softmax cross-entropy gradient at "
      f"scale {scale:g} of these inputs (no sample's one-hot vector comes "
      f"out; residual {residual:.1e}): wrong inputs, loss or reduction.",
      residual,
      used,
      counts,
    )
  labels = np.where(identifiable, labels, -1)
  reason = ""
  if not identifiable.all():
    reason = (
      f"{int((~identifiable).sum())} of {b} samples are not identifiable: "
      f"their head inputs [h, 1] span rank {rank} < b = {b} (duplicate "
      "samples, or a head narrower than the batch); their labels are only "
      "known as counts."
    )
  elif not verified.all():
    reason = (
      f"{int((~verified).sum())} of {b} labels are read off the sign "
      "pattern but not verified exactly (drift, noise or inexact inputs)."
    )
  return LabelResult(
    labels=labels.astype(np.int64),
    verified=verified,
    identifiable=identifiable,
    counts=counts,
    scale=used,
    residual=residual,
    reason=reason,
  )


def label_accuracy(labels: ArrayLike, truth: ArrayLike) -> float:
  """Share of samples whose label equals the truth (a refused ``-1`` is wrong).

  Both arrays must be in the same sample order (match the reconstruction
  to the truth first).
  """
  labels, truth = np.asarray(labels), np.asarray(truth)
  if labels.shape != truth.shape:
    raise ValueError(f"shapes differ: {labels.shape} vs {truth.shape}.")
  return float(np.mean(labels == truth)) if labels.size else float("nan")
