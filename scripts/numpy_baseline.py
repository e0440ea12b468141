"""A plain NumPy implementation of SPEAR, the baseline of the JAX library.

This file implements the same algorithm as :func:`spear_jax.invert` with the
same tolerances, floor, adaptive threshold, pool, two-stage greedy selection,
scale recovery and ReLU certificate, but in straightforward vectorised NumPy
(one batched QR per block of proposals). It imports neither JAX nor
``spear_jax``, so it serves two purposes:

* the speed baseline of ``scripts/benchmark.py``;
* an independent cross-check of the library in the tests.

The random streams differ from the library's (NumPy's ``default_rng`` versus
JAX keys), so the two agree on the recovered batch, not on the number of
proposals.

Usage as a script (a quick self-check on random data, or one gradient)::

  python scripts/numpy_baseline.py --m 400 --n 3072 --b 12
  python scripts/numpy_baseline.py --gradients=IN.npz
"""

import argparse
import json
import math
import time

import numpy as np

__all__ = ["default_max_proposals", "invert_numpy", "structure_floor"]


def structure_floor(b: int, num_alive: int) -> int:
  """Fewest zeros a candidate needs: ``(b - 1) + max(3, ceil(0.02 M))``."""
  return (b - 1) + max(3, math.ceil(0.02 * num_alive))


def default_max_proposals(b: int) -> int:
  """Automatic sampling budget ``max(1e6, 100 * 2^(b-1) * H_b)``."""
  harmonic = sum(1.0 / k for k in range(1, b + 1))
  return int(max(1e6, 100 * 2.0 ** (b - 1) * harmonic))


def _as_float(value, name: str) -> np.ndarray:
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
  if np.iscomplexobj(array):
    raise ValueError(f"{name} must be real, got dtype {array.dtype}.")
  if array.dtype not in (np.float32, np.float64):
    array = array.astype(np.float64)
  return array


def _check_inputs(weight_grad, bias_grad, weight, bias):
  """Shape and value checks; returns arrays of one floating dtype."""
  weight_grad = _as_float(weight_grad, "weight_grad")
  bias_grad = _as_float(bias_grad, "bias_grad")
  if weight_grad.ndim != 2:
    raise ValueError(
      f"weight_grad must be 2-D (m, n), got shape {weight_grad.shape}."
    )
  m, n = weight_grad.shape
  if bias_grad.shape != (m,):
    raise ValueError(
      f"bias_grad must have shape ({m},), got {bias_grad.shape}."
    )
  dtype = np.promote_types(weight_grad.dtype, bias_grad.dtype)
  weight_grad = weight_grad.astype(dtype)
  bias_grad = bias_grad.astype(dtype)
  for array, name in ((weight_grad, "weight_grad"), (bias_grad, "bias_grad")):
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{name} contains NaN or infinite values.")
  if not np.any(weight_grad != 0):
    raise ValueError("weight_grad is all zeros: nothing to invert.")
  if (weight is None) != (bias is None):
    raise ValueError("give both weight and bias or neither.")
  if weight is not None:
    weight = _as_float(weight, "weight").astype(dtype)
    bias = _as_float(bias, "bias").astype(dtype)
    if weight.shape != (m, n):
      raise ValueError(f"weight must have shape {(m, n)}, got {weight.shape}.")
    if bias.shape != (m,):
      raise ValueError(f"bias must have shape ({m},), got {bias.shape}.")
  return weight_grad, bias_grad, weight, bias


class _Problem:
  """Factors, certificate inputs and tolerances of one inversion."""

  def __init__(
    self, l_mxb, r_bxn, bias_grad, weight, bias, zero_tol, cert_slack
  ):
    self.l_mxb, self.r_bxn, self.bias_grad = l_mxb, r_bxn, bias_grad
    self.weight, self.bias = weight, bias
    self.zero_tol, self.cert_slack = zero_tol, cert_slack

  def reconstruct(self, directions_bxb):
    """Scale recovery, batch and certificate for directions as columns.

    Args:
      directions_bxb: unit directions as columns (``Qbar``).

    Returns:
      ``(inputs, grad_z, q, verified)``.
    """
    target_b = self.l_mxb.T @ self.bias_grad
    with np.errstate(all="ignore"):
      try:
        scales_b = np.linalg.solve(directions_bxb, target_b)
        q_bxb = directions_bxb * scales_b[None, :]
        inputs_bxn = np.linalg.solve(q_bxb, self.r_bxn)
      except np.linalg.LinAlgError:
        b = directions_bxb.shape[0]
        q_bxb = np.full((b, b), np.nan, self.l_mxb.dtype)
        inputs_bxn = np.full(self.r_bxn.shape, np.nan, self.l_mxb.dtype)
      grad_z_mxb = self.l_mxb @ q_bxb
    if self.weight is None:
      verified = np.zeros((q_bxb.shape[0],), bool)
    else:
      verified = self.certificate(inputs_bxn, grad_z_mxb)
    return inputs_bxn, grad_z_mxb, q_bxb, verified

  def certificate(self, inputs_bxn, grad_z_mxb):
    """Per-sample ReLU certificate (nonzeros of ``D`` on active neurons)."""
    with np.errstate(all="ignore"):
      z_mxb = self.weight @ inputs_bxn.T + self.bias[:, None]
      scale_mxb = (
        np.abs(self.weight) @ np.abs(inputs_bxn).T + np.abs(self.bias)[:, None]
      )
      column_norm_b = np.linalg.norm(grad_z_mxb, axis=0)
      nonzero_mxb = np.abs(grad_z_mxb) > self.zero_tol * column_norm_b[None, :]
      inactive_mxb = z_mxb <= -self.cert_slack * scale_mxb
    violated_b = np.any(nonzero_mxb & inactive_mxb, axis=0)
    finite_b = np.all(np.isfinite(inputs_bxn), axis=1)
    return (~violated_b) & (column_norm_b > 0) & finite_b


def _propose(rng, l_alive_mxb, num_alive, b, block_size, screen_tol):
  """One block of proposals: kernel directions and their zero counts.

  Args:
    rng: NumPy generator.
    l_alive_mxb: the alive rows of ``L``.
    num_alive: ``M``.
    b: batch size.
    block_size: ``N``.
    screen_tol: zero tolerance of the screen.

  Returns:
    ``(directions (N, b), zeros (N,))``.
  """
  n_prop = block_size
  if b == 1:
    q_nxb = np.ones((n_prop, 1), l_alive_mxb.dtype)
  else:
    # A uniformly random (b-1)-subset of the alive rows per proposal.
    keys = rng.random((n_prop, num_alive))
    rows = np.argpartition(keys, b - 2, axis=1)[:, : b - 1]
    a_nxkxb = l_alive_mxb[rows]
    # The last column of the complete QR of A^T spans ker(A).
    q_full, _ = np.linalg.qr(np.swapaxes(a_nxkxb, 1, 2), mode="complete")
    q_nxb = q_full[:, :, -1]
  v_nxm = q_nxb @ l_alive_mxb.T
  zeros = np.sum(np.abs(v_nxm) <= screen_tol, axis=1)
  return q_nxb, zeros


def _polish(directions_kxb, l_mxb, alive_m, screen_tol, zero_tol):
  """Snaps sparse directions to the exact ones (batched ``eigh``).

  Args:
    directions_kxb: unit directions, one per row.
    l_mxb: the left factor ``L``.
    alive_m: mask of alive rows.
    screen_tol: zero tolerance defining the zero set.
    zero_tol: zero tolerance of the returned counts.

  Returns:
    ``(polished (k, b), zeros (k,))``.
  """
  polished = directions_kxb
  for _ in range(3):  # refit on the zero set three times, as the library
    v_kxm = polished @ l_mxb.T
    in_zero_set = (np.abs(v_kxm) <= screen_tol) & alive_m[None, :]
    masked_kxmxb = l_mxb[None, :, :] * in_zero_set[:, :, None]
    gram_kxbxb = np.swapaxes(masked_kxmxb, 1, 2) @ masked_kxmxb
    _, eigvecs = np.linalg.eigh(gram_kxbxb)
    refit = eigvecs[:, :, 0]
    sign = np.where(np.sum(refit * directions_kxb, axis=1) < 0, -1.0, 1.0)
    polished = refit * sign[:, None].astype(refit.dtype)
  v_kxm = polished @ l_mxb.T
  zeros = np.sum((np.abs(v_kxm) <= zero_tol) & alive_m[None, :], axis=1)
  if l_mxb.shape[1] < 2:
    return polished, zeros, np.zeros(zeros.shape)
  # Mixture test: the largest leverage of a zero-set row in the complement
  # of the direction (1 for the rows that pinned a mixture), or inf when the
  # zero set leaves a null space of dimension two or more.
  eigvals, eigvecs = np.linalg.eigh(
    np.swapaxes(masked_kxmxb, 1, 2) @ masked_kxmxb
  )
  coords = (l_mxb[None, :, :] @ eigvecs)[:, :, 1:]
  lam = np.maximum(eigvals[:, 1:], np.finfo(l_mxb.dtype).tiny)
  leverage = np.sum(coords**2 / lam[:, None, :], axis=2)
  max_leverage = np.max(np.where(in_zero_set, leverage, 0.0), axis=1)
  eps = np.finfo(l_mxb.dtype).eps
  degenerate = eigvals[:, 1] <= np.sqrt(eps) * eigvals[:, -1]
  return polished, zeros, np.where(degenerate, np.inf, max_leverage)


def _merge(pool_dirs, pool_zeros, dirs, zeros, dedup_tol, capacity):
  """Adds new directions to the pool, merging duplicates.

  Returns:
    ``(pool_dirs, pool_zeros, num_new)``.
  """
  if dirs.shape[0] == 0:
    return pool_dirs, pool_zeros, 0
  pool_dirs, pool_zeros = pool_dirs.copy(), pool_zeros.copy()
  if pool_dirs.shape[0]:
    sim = np.abs(dirs @ pool_dirs.T)
    is_known = np.any(sim >= 1.0 - dedup_tol, axis=1)
    for i in np.flatnonzero(is_known):  # keep the sparser copy
      j = int(np.argmax(sim[i]))
      if zeros[i] > pool_zeros[j]:
        pool_dirs[j], pool_zeros[j] = dirs[i], zeros[i]
    dirs, zeros = dirs[~is_known], zeros[~is_known]
  order = np.argsort(-zeros, kind="stable")
  dirs, zeros = dirs[order], zeros[order]
  keep = np.ones(dirs.shape[0], bool)
  if dirs.shape[0] > 1:
    sim = np.abs(dirs @ dirs.T) >= 1.0 - dedup_tol
    for i in range(dirs.shape[0]):
      if keep[i]:
        dup = sim[i] & keep
        dup[: i + 1] = False
        keep[dup] = False
  dirs, zeros = dirs[keep], zeros[keep]
  pool_dirs = np.concatenate([pool_dirs, dirs])
  pool_zeros = np.concatenate([pool_zeros, zeros])
  if pool_zeros.shape[0] > capacity:
    order = np.argsort(-pool_zeros, kind="stable")[:capacity]
    pool_dirs, pool_zeros = pool_dirs[order], pool_zeros[order]
  return pool_dirs, pool_zeros, int(dirs.shape[0])


def _threshold(pool_zeros, b, floor, tau_relative):
  """Adaptive sparsity threshold from the ``b`` sparsest candidates."""
  if pool_zeros.shape[0] == 0:
    return floor
  top = np.sort(pool_zeros)[::-1][:b]
  if tau_relative is None:
    tau_relative = 1e-3 ** (1.0 / (b - 1))
  return max(floor, math.ceil(tau_relative * float(np.median(top))))


def _select_independent(pool_dirs, pool_zeros, threshold, indep_tol, b):
  """Stage 1: sparsest first, keep the independent ones (Gram-Schmidt x2).

  Returns:
    Pool indices of the kept candidates (at most ``b``).
  """
  order = np.argsort(-pool_zeros, kind="stable")
  basis_bxb = np.zeros((b, b), pool_dirs.dtype)
  chosen = []
  for idx in order:
    if len(chosen) == b:
      break
    if pool_zeros[idx] < threshold:
      continue
    q = pool_dirs[idx]
    for _ in range(2):
      q = q - (basis_bxb @ q) @ basis_bxb
    norm = np.linalg.norm(q)
    if norm >= indep_tol:
      basis_bxb[len(chosen)] = q / norm
      chosen.append(int(idx))
  return np.asarray(chosen, dtype=np.int64)


def _swap_stage(
  problem, pool_dirs, pool_zeros, chosen, threshold, budget, tried, indep_tol
):
  """Stage 2: swap in other candidates while more samples verify.

  Returns:
    ``(chosen, result)`` with ``result = (inputs, grad_z, q, verified)``.
  """
  b = chosen.shape[0]
  best = problem.reconstruct(pool_dirs[chosen].T)
  best_count = int(np.sum(best[3]))
  tried.add(frozenset(chosen.tolist()))
  in_selection = set(chosen.tolist())
  others = [
    int(c)
    for c in np.argsort(-pool_zeros, kind="stable")
    if pool_zeros[c] >= threshold and int(c) not in in_selection
  ]
  trials = 0
  improved = True
  while improved and best_count < b and trials < budget:
    improved = False
    failing = np.flatnonzero(~best[3])
    for slot, c in ((s, c) for s in failing for c in others):
      trial = chosen.copy()
      trial[slot] = c
      signature = frozenset(trial.tolist())
      if signature in tried:
        continue
      tried.add(signature)
      basis = pool_dirs[trial]
      if np.linalg.matrix_rank(basis, tol=indep_tol) < b:
        continue
      trials += 1
      result = problem.reconstruct(basis.T)
      count = int(np.sum(result[3]))
      if count > best_count:
        others = [o for o in others if o != c] + [int(chosen[slot])]
        chosen, best, best_count, improved = trial, result, count, True
        break
      if trials >= budget:
        break
  return chosen, best


def _complete(directions_sxb, b):
  """Completes ``s < b`` independent directions to a basis (columns)."""
  s = directions_sxb.shape[0]
  if s == b:
    return directions_sxb.T
  rng = np.random.default_rng(0)
  filler = rng.standard_normal((b - s, b)).astype(directions_sxb.dtype)
  basis, _ = np.linalg.qr(np.concatenate([directions_sxb, filler]).T)
  return np.concatenate([directions_sxb.T, basis[:, s:]], axis=1)


def invert_numpy(
  weight_grad,
  bias_grad,
  *,
  seed,
  weight=None,
  bias=None,
  batch_size=None,
  block_size=8192,
  max_candidates_per_block=256,
  max_proposals=None,
  time_budget_s=None,
  tau_relative=None,
  pool_capacity=512,
) -> dict:
  r"""Recovers the batch from one linear layer's gradients (SPEAR, NumPy).

  ``weight_grad = D X^T`` and ``bias_grad = D 1`` with ``D = dL/dZ``. The
  SVD gives ``weight_grad = L R``; kernels of random ``(b-1)``-row
  submatrices of ``L`` propose columns of ``Q`` (``D = L Q``); sparse
  proposals are polished, deduplicated and selected; the bias gradient fixes
  their scales and ``X^T = Q^{-1} R``.

  Args:
    weight_grad: ``dL/dW``, shape ``(m, n)``.
    bias_grad: ``dL/dbeta``, shape ``(m,)``.
    seed: seed of ``np.random.default_rng``.
    weight: the layer's weight ``W`` for the certificate, or ``None``.
    bias: the layer's bias for the certificate, or ``None``.
    batch_size: ``b``, or ``None`` for the numerical rank.
    block_size: proposals per block.
    max_candidates_per_block: at most this many filter-passing proposals of a
      block (the first ones) are polished.
    max_proposals: sampling budget; ``None`` for
      :func:`default_max_proposals`.
    time_budget_s: wall-time budget in seconds, or ``None``.
    tau_relative: fraction of the typical zero count of the adaptive
      threshold; ``None`` uses ``1e-3 ** (1 / (b - 1))`` as the library.
    pool_capacity: maximum number of distinct candidates kept.

  Returns:
    A dict with ``inputs`` (``b x n``), ``grad_z`` (``m x b``), ``verified``
    (``(b,)`` bool), ``success``, ``proposals``, ``blocks``, ``candidates``,
    ``seconds`` and ``stop_reason``.

  Raises:
    ValueError: on invalid input or a rank that contradicts ``batch_size``.
  """
  start = time.perf_counter()
  weight_grad, bias_grad, weight, bias = _check_inputs(
    weight_grad, bias_grad, weight, bias
  )
  m, n = weight_grad.shape
  dtype = weight_grad.dtype
  eps = float(np.finfo(dtype).eps)
  screen_tol = eps**0.5
  zero_tol = eps ** (2 / 3)
  dedup_tol = eps ** (2 / 3)
  indep_tol = eps ** (1 / 3)
  cert_slack = eps**0.5

  u, s, vt = np.linalg.svd(weight_grad, full_matrices=False)
  rank = int(np.sum(s > 10.0 * max(m, n) * eps * s[0])) if s[0] > 0 else 0
  if rank >= min(m, n):
    raise ValueError(
      f"weight_grad has full numerical rank {rank}: no low-rank structure."
    )
  if batch_size is not None and batch_size != rank:
    raise ValueError(
      f"batch_size={batch_size} contradicts the numerical rank {rank}."
    )
  b = rank
  l_mxb = u[:, :b]
  r_bxn = s[:b, None] * vt[:b]

  row_scale = np.max(np.abs(weight_grad), axis=1)
  alive = row_scale > eps * row_scale.max()
  num_alive = int(alive.sum())
  if num_alive < b:
    raise ValueError(
      f"only {num_alive} neurons have a nonzero gradient, fewer than b={b}."
    )
  alive_idx = np.flatnonzero(alive)
  l_alive = np.ascontiguousarray(l_mxb[alive_idx])
  floor = structure_floor(b, num_alive)
  if max_proposals is None:
    max_proposals = default_max_proposals(b)

  problem = _Problem(
    l_mxb, r_bxn, bias_grad, weight, bias, zero_tol, cert_slack
  )
  rng = np.random.default_rng(seed)
  pool_dirs = np.zeros((0, b), dtype)
  pool_zeros = np.zeros((0,), np.int64)
  proposals = blocks = 0
  chosen = np.zeros((0,), np.int64)
  result = None
  threshold = floor
  tried = set()
  stop_reason = "max_proposals"
  if b == 1:  # Q is 1 x 1: only the scale is unknown, nothing to sample
    pool_dirs = np.ones((1, 1), dtype)
    pool_zeros = np.zeros((1,), np.int64)
    chosen = np.zeros((1,), np.int64)
    result = problem.reconstruct(pool_dirs.T)
    stop_reason = (
      "recovered"
      if weight is None
      else ("certified" if np.all(result[3]) else "not_certified")
    )
  while b > 1:
    dirs, zeros = _propose(rng, l_alive, num_alive, b, block_size, screen_tol)
    proposals += block_size
    blocks += 1
    passers = np.flatnonzero(zeros >= floor)[:max_candidates_per_block]
    num_new = 0
    if passers.size:
      polished, new_zeros, leverage = _polish(
        dirs[passers], l_mxb, alive, screen_tol, zero_tol
      )
      keep = (new_zeros >= floor) & (leverage < 1.0 - eps ** (1 / 3))
      pool_dirs, pool_zeros, num_new = _merge(
        pool_dirs,
        pool_zeros,
        polished[keep],
        new_zeros[keep].astype(np.int64),
        dedup_tol,
        pool_capacity,
      )
    if num_new:
      threshold = _threshold(pool_zeros, b, floor, tau_relative)
      chosen = _select_independent(
        pool_dirs, pool_zeros, threshold, indep_tol, b
      )
      if chosen.shape[0] == b:
        result = problem.reconstruct(pool_dirs[chosen].T)
        if weight is None:
          stop_reason = "recovered"
          break
        if not np.all(result[3]):
          chosen, result = _swap_stage(
            problem,
            pool_dirs,
            pool_zeros,
            chosen,
            threshold,
            2 * b,
            tried,
            indep_tol,
          )
        if np.all(result[3]):
          stop_reason = "certified"
          break
    if proposals >= max_proposals:
      stop_reason = "max_proposals"
      break
    if (
      time_budget_s is not None and time.perf_counter() - start >= time_budget_s
    ):
      stop_reason = "time_budget"
      break

  if result is None or chosen.shape[0] < b:
    result = problem.reconstruct(_complete(pool_dirs[chosen], b))
  inputs, grad_z, _, verified = result
  recovered = chosen.shape[0] == b
  success = bool(recovered and (weight is None or np.all(verified)))
  return {
    "inputs": inputs,
    "grad_z": grad_z,
    "verified": np.asarray(verified, bool),
    "success": success,
    "proposals": proposals,
    "blocks": blocks,
    "candidates": int(pool_zeros.shape[0]),
    "seconds": time.perf_counter() - start,
    "stop_reason": stop_reason,
  }


def make_problem(m, n, b, seed, dtype=np.float64):
  """Random layer and batch: ``X`` standardised, ``W ~ N(0, 1/n)``.

  Returns:
    ``(weight_grad, bias_grad, weight, bias, x_bxn, d_mxb)``.
  """
  rng = np.random.default_rng(seed)
  x_bxn = rng.standard_normal((b, n))
  x_bxn = (x_bxn - x_bxn.mean(1, keepdims=True)) / x_bxn.std(1, keepdims=True)
  weight = rng.standard_normal((m, n)) / np.sqrt(n)
  bias = 0.1 * rng.standard_normal(m)
  z_mxb = weight @ x_bxn.T + bias[:, None]
  d_mxb = (z_mxb > 0) * rng.standard_normal((m, b))
  cast = lambda a: a.astype(dtype)
  return (
    cast(d_mxb @ x_bxn),
    cast(d_mxb.sum(1)),
    cast(weight),
    cast(bias),
    x_bxn,
    d_mxb,
  )


def _jsonable(value):
  return value.item() if isinstance(value, np.generic) else value


def _main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--m", type=int, default=400)
  parser.add_argument("--n", type=int, default=3072)
  parser.add_argument("--b", type=int, nargs="+", default=[12])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-certificate", action="store_true")
  parser.add_argument(
    "--gradients",
    help="invert this npz (weight_grad, bias_grad[, weight, bias]) instead; "
    "prints a JSON summary and exits 0 on a certified recovery, else 1",
  )
  args = parser.parse_args()
  if args.gradients:
    with np.load(args.gradients) as f:
      arrays = {k: f[k] for k in f.files}
    cert = {k: arrays[k] for k in ("weight", "bias") if k in arrays}
    out = invert_numpy(
      arrays["weight_grad"], arrays["bias_grad"], seed=args.seed, **cert
    )
    keys = ("success", "stop_reason", "proposals", "candidates", "seconds")
    print(json.dumps({k: _jsonable(out[k]) for k in keys}))
    raise SystemExit(0 if out["success"] else 1)
  for b in args.b:
    wg, bg, w, bi, x_bxn, _ = make_problem(args.m, args.n, b, args.seed)
    cert = {} if args.no_certificate else {"weight": w, "bias": bi}
    out = invert_numpy(wg, bg, seed=args.seed, **cert)
    cos = np.abs(
      (out["inputs"] / np.linalg.norm(out["inputs"], axis=1, keepdims=True))
      @ (x_bxn / np.linalg.norm(x_bxn, axis=1, keepdims=True)).T
    )
    match = np.argmax(cos, axis=1)
    err = float(np.max(np.abs(out["inputs"] - x_bxn[match])))
    print(
      f"m={args.m} n={args.n} b={b}: success={out['success']} "
      f"({out['stop_reason']}), verified={int(out['verified'].sum())}/{b}, "
      f"max|err|={err:.2e}, {out['proposals']} proposals in "
      f"{out['seconds']:.2f} s ({out['proposals'] / out['seconds']:.0f}/s), "
      f"{out['candidates']} candidates"
    )


if __name__ == "__main__":
  _main()
