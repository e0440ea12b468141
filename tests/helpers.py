"""Synthetic problems built independently of the code under test."""

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
  w_mxn = rng.standard_normal((m, n)) / np.sqrt(n)
  beta_m = bias_scale * rng.standard_normal(m)
  z_mxb = w_mxn @ x_nxb + beta_m[:, None]
  d_mxb = (z_mxb > 0) * rng.standard_normal((m, b))
  return {
    "weight_grad": d_mxb @ x_nxb.T,
    "bias_grad": d_mxb.sum(axis=1),
    "weight": w_mxn,
    "bias": beta_m,
    "inputs": x_nxb.T,
    "grad_z": d_mxb,
  }


def match_rows(recovered_bxn, truth_bxn):
  """Index of the truth row closest in angle to each recovered row."""
  rec = recovered_bxn / np.linalg.norm(recovered_bxn, axis=1, keepdims=True)
  tru = truth_bxn / np.linalg.norm(truth_bxn, axis=1, keepdims=True)
  return np.argmax(np.abs(rec @ tru.T), axis=1)
