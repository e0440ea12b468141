"""Synthetic problems built independently of the code under test."""

import itertools

import numpy as np


def relu_layer_problem(seed, m, n, b, centred=True, bias_scale=0.1):
  """A random ReLU layer, batch and ``D`` with exact ReLU zeros (numpy).

  ``D = 1[W X + beta > 0] * G`` with ``G`` Gaussian stands in for the
  backpropagated ``dL/dY``; the shared gradients are ``D X^T`` and ``D 1``.
  """
  rng = np.random.default_rng(seed)
  x_nxb = rng.standard_normal((n, b))
  if not centred:
    x_nxb = rng.random((n, b))
  return layer_for_inputs(rng, x_nxb, m, bias_scale)


def layer_for_inputs(rng, x_nxb, m, bias_scale=0.1):
  """A random width-``m`` ReLU layer on given inputs (``n x b``), as
  :func:`relu_layer_problem` draws it, and what it shares."""
  n = x_nxb.shape[0]
  w_mxn = rng.standard_normal((m, n)) / np.sqrt(n)
  beta_m = bias_scale * rng.standard_normal(m)
  return _layer_gradients(rng, x_nxb, w_mxn, beta_m)


def _layer_gradients(rng, x_nxb, w_mxn, beta_m):
  """``D = 1[W X + beta > 0] * G`` (``G`` Gaussian) and what it shares."""
  z_mxb = w_mxn @ x_nxb + beta_m[:, None]
  d_mxb = (z_mxb > 0) * rng.standard_normal(z_mxb.shape)
  return {
    "weight_grad": d_mxb @ x_nxb.T,
    "bias_grad": d_mxb.sum(axis=1),
    "weight": w_mxn,
    "bias": beta_m,
    "inputs": x_nxb.T,
    "grad_z": d_mxb,
  }


def true_columns(l_mxb, grad_z_mxb):
  """The unit columns of ``Q`` with ``D = L Q`` (least squares), the truth
  the attack's directions are compared with."""
  q_bxb = np.linalg.lstsq(np.asarray(l_mxb), np.asarray(grad_z_mxb), None)[0]
  return q_bxb / np.linalg.norm(q_bxb, axis=0)


def match_rows(recovered_bxn, truth_bxn):
  """Index of the truth row closest in angle to each recovered row."""
  rec = recovered_bxn / np.linalg.norm(recovered_bxn, axis=1, keepdims=True)
  tru = truth_bxn / np.linalg.norm(truth_bxn, axis=1, keepdims=True)
  return np.argmax(np.abs(rec @ tru.T), axis=1)


def mlp_problem(
  seed, sizes, labels, reduction="mean", scale_inputs=1.0, inputs=None
):
  """A ReLU MLP with softmax cross-entropy and its gradients, by hand.

  ``sizes = (n, m_0, ..., m_{K-2}, c)``; every layer but the last is
  followed by ReLU. Forward and backward passes are written out in numpy
  (paper layout: ``weight_k`` is ``m_k x n_k``), independently of JAX and
  the library. Returns the npz-style dict of ``weight_k``, ``bias_k``,
  ``weight_grad_k``, ``bias_grad_k``, ``grad_z_k`` (``m_k x b``, the
  layer's ``dL/dZ``), plus ``inputs``, ``labels``, ``features`` (the
  classifier's inputs) and ``logits``.
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  b = labels.shape[0]
  drawn = scale_inputs * rng.standard_normal((b, sizes[0]))
  inputs = drawn if inputs is None else np.asarray(inputs, float)
  weights, biases = [], []
  for fan_in, fan_out in itertools.pairwise(sizes):
    bound = 1.0 / np.sqrt(fan_in)
    weights.append(rng.uniform(-bound, bound, (fan_out, fan_in)))
    biases.append(rng.uniform(-bound, bound, fan_out))
  activations, pre = [inputs], []
  for k, (w, beta) in enumerate(zip(weights, biases)):
    z = activations[-1] @ w.T + beta
    pre.append(z)
    if k < len(weights) - 1:
      activations.append(np.maximum(z, 0.0))
  logits = pre[-1]
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  grad = probs - np.eye(sizes[-1])[labels]
  if reduction == "mean":
    grad = grad / b
  out = {}
  for k in reversed(range(len(weights))):
    out[f"grad_z_{k}"] = grad.T
    out[f"weight_grad_{k}"] = grad.T @ activations[k]
    out[f"bias_grad_{k}"] = grad.sum(axis=0)
    if k:
      grad = (grad @ weights[k]) * (pre[k - 1] > 0)
  for k, (w, beta) in enumerate(zip(weights, biases)):
    out[f"weight_{k}"] = w
    out[f"bias_{k}"] = beta
  out.update(
    inputs=inputs, labels=labels, features=activations[-1], logits=logits
  )
  return out


def nested_twin_problem(seed, m, n, b):
  """A ReLU layer whose samples 0 and 1 are near-twins with nested patterns.

  ``x_1 = x_0 + t delta`` with ``t`` between the first two breakpoints of
  ``W (x_0 + t delta) + beta`` along a random ``delta``: the two ReLU
  patterns differ in exactly one neuron, so one zero set contains the
  other. Returns the ``relu_layer_problem`` dict plus ``"row"``, that
  neuron, and ``"larger"``, the sample whose zero set is the larger one.
  """
  rng = np.random.default_rng(seed)
  x_nxb = rng.standard_normal((n, b))
  w_mxn = rng.standard_normal((m, n)) / np.sqrt(n)
  beta_m = 0.1 * rng.standard_normal(m)
  delta = rng.standard_normal(n)
  z0, slope = w_mxn @ x_nxb[:, 0] + beta_m, w_mxn @ delta
  crossing = -z0 / slope
  first, second = np.sort(crossing[crossing > 0])[:2]
  x_nxb[:, 1] = x_nxb[:, 0] + 0.5 * (first + second) * delta
  z_mxb = w_mxn @ x_nxb + beta_m[:, None]
  row = int(np.flatnonzero((z_mxb[:, 0] > 0) != (z_mxb[:, 1] > 0))[0])
  return {
    **_layer_gradients(rng, x_nxb, w_mxn, beta_m),
    "row": row,
    "larger": 0 if z_mxb[row, 0] <= 0 else 1,
  }


def crossed_twin_problem(seed, m, n, b, own=(1, 2)):
  """A ReLU layer whose samples 0 and 1 are near-twins, each with zeros of
  its own.

  ``x_1 = x_0 + t delta`` with ``t`` just past the first ``own[0] +
  own[1]`` breakpoints of ``W (x_0 + t delta) + beta`` along a ``delta``
  redrawn until ``own[0]`` of them switch a neuron on (a zero of sample 0
  only) and ``own[1]`` switch one off (a zero of sample 1 only): neither
  zero set contains the other. Returns the ``relu_layer_problem`` dict.
  """
  rng = np.random.default_rng(seed)
  x_nxb = rng.standard_normal((n, b))
  w_mxn = rng.standard_normal((m, n)) / np.sqrt(n)
  beta_m = 0.1 * rng.standard_normal(m)
  z0 = w_mxn @ x_nxb[:, 0] + beta_m
  k = own[0] + own[1]
  while True:
    delta = rng.standard_normal(n)
    slope = w_mxn @ delta
    crossing = np.where(-z0 / slope > 0, -z0 / slope, np.inf)
    order = np.argsort(crossing)[: k + 1]
    if np.sum(slope[order[:k]] > 0) == own[0]:
      break
  t = 0.5 * (crossing[order[k - 1]] + crossing[order[k]])
  x_nxb[:, 1] = x_nxb[:, 0] + t * delta
  return _layer_gradients(rng, x_nxb, w_mxn, beta_m)


def alike_inputs(rng, b, n, twins=0, jitter=0.0):
  """``b`` alike inputs (a shared offset plus half-size noise); the first
  ``twins`` follow their predecessor up to ``jitter`` noise."""
  x = rng.normal(size=(b, 1)) + 0.5 * rng.normal(size=(b, n))
  for i in range(min(twins, b - 1)):
    x[i + 1] = x[i] + jitter * rng.normal(size=n)
  return x
