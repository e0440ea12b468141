"""SPEAR++: sparse directions by dictionary learning, then exact rounding.

After the SVD, ``L`` (orthonormal columns) is already whitened, and each
column ``q_i`` of ``Q`` is a direction on the unit sphere for which ``L q``
is as sparse as possible (``D = L Q``): complete sparsely-used dictionary
learning. A continuous optimiser from many restarts finds approximately
sparse directions in polynomial time; rounding snaps each to an exact
column by taking the kernel of ``b - 1`` rows where ``L q`` is nearly zero.
Once some columns are found, restarts are deflated: restricted to the
zero set of one found column, or, with the layer's weights, confined to
the complement of the found samples' rows of ``Q^{-1}`` estimated from
their ReLU patterns, where only the missing columns are left.

References:
  Bakarsky, Dimitrov, Baader, Vechev. SPEAR++: Scaling Gradient Inversion
  via Sparsely-Used Dictionary Learning. arXiv:2510.24200, 2025.
  Bai, Jiang, Sun. Subgradient Descent Learns Orthogonal Dictionaries.
  ICLR 2019.
"""

from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spear_jax._config import LearnerConfig
from spear_jax._linalg import distinct_directions
from spear_jax._linalg import null_vector
from spear_jax._linalg import rows_gram_eigh
from spear_jax._types import Array
from spear_jax._types import Bool
from spear_jax._types import Float
from spear_jax._types import Int
from spear_jax._types import PRNGKeyArray

_HI = jax.lax.Precision.HIGHEST

__all__ = [
  "LearnerState",
  "complete_from_bias",
  "complete_last_column",
  "dictionary_objective",
  "estimate_found_rows",
  "learn_directions",
  "learn_directions_constrained",
  "make_dictionary_learner",
  "pattern_problem",
  "relu_guided_direction",
  "round_direction",
  "round_with_pattern",
  "round_with_pattern_rows",
  "sample_last_column",
]


class LearnerState(NamedTuple):
  """State of one restart: a point on the sphere and its optimiser state."""

  direction: Float[Array, " b"]
  opt_state: optax.OptState
  step: Int[Array, ""]


def dictionary_objective(
  objective: str, mu: float = 0.1
) -> Callable[
  [Float[Array, " b"], Float[Array, "m b"], Bool[Array, " m"]], Float[Array, ""]
]:
  r"""The sparsity objective ``f(q)`` over alive rows, to be minimised.

  * ``"l1"``: :math:`\frac{1}{M}\sum_j |L_j q|`;
  * ``"logcosh"``: :math:`\frac{1}{M}\sum_j \nu \log\cosh(L_j q/\nu)` with
    :math:`\nu = \mu / \sqrt{M}`, a smooth surrogate of l1 (Sun, Qu, Wright);
  * ``"l4"``: :math:`-\sum_j (L_j q)^4` (maximising the l4 norm, MSP).
  """

  def f(q_b, l_mxb, alive_m):
    v_m = jnp.dot(l_mxb, q_b, precision=_HI)
    weight_m = alive_m.astype(v_m.dtype)
    count = jnp.maximum(jnp.sum(weight_m), 1.0)
    if objective == "l1":
      return jnp.sum(weight_m * jnp.abs(v_m)) / count
    if objective == "logcosh":
      nu = mu / jnp.sqrt(count)
      return jnp.sum(weight_m * nu * jnp.logaddexp(v_m / nu, -v_m / nu)) / count
    if objective == "l4":
      return -jnp.sum(weight_m * v_m**4)
    raise ValueError(f"Unknown objective {objective!r}.")

  return f


def make_dictionary_learner(
  config: LearnerConfig,
  optimizer: optax.GradientTransformation | None = None,
):
  r"""The search as a pure ``(init_fn, step_fn)`` pair over one restart.

  ``step_fn`` takes a Riemannian (sub)gradient step on the unit sphere:
  the Euclidean gradient ``g`` of the objective is projected on the
  tangent space, ``g - <q, g> q``, transformed by ``optimizer`` and applied;
  the result is retracted to the sphere by normalising. For ``"l1"`` the
  subgradient ``L^T sign(L q) / M`` is written out (no autodiff of ``|.|``
  at zero).

  With ``project`` (the orthogonal projector ``P`` onto a subspace that
  contains the current direction) the step stays on the unit sphere of that
  subspace: the gradient is ``P g`` and the updated point is projected by
  ``P`` before normalising (an adaptive optimiser rescales coordinates and
  would otherwise leave the subspace).

  Args:
    config: the learner settings.
    optimizer: any ``optax.GradientTransformation``; ``None`` means RAdam
      with a cosine-decayed learning rate from ``config.learning_rate``.

  Returns:
    ``(init_fn, step_fn)`` with ``init_fn(direction) -> LearnerState`` and
    ``step_fn(state, l_mxb, alive_m, project=None) -> (state, loss)``.
  """
  if optimizer is None:
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
    optimizer = optax.radam(schedule)
  objective = dictionary_objective(config.objective, config.logcosh_mu)

  def euclidean_grad(q_b, l_mxb, alive_m):
    if config.objective == "l1":
      v_m = jnp.dot(l_mxb, q_b, precision=_HI)
      weight_m = alive_m.astype(v_m.dtype)
      count = jnp.maximum(jnp.sum(weight_m), 1.0)
      return jnp.dot(l_mxb.T, weight_m * jnp.sign(v_m), precision=_HI) / count
    return jax.grad(objective)(q_b, l_mxb, alive_m)

  def init_fn(direction_b):
    direction_b = direction_b / jnp.linalg.norm(direction_b)
    return LearnerState(
      direction_b, optimizer.init(direction_b), jnp.zeros((), jnp.int32)
    )

  def step_fn(state, l_mxb, alive_m, project=None):
    project = (lambda v_b: v_b) if project is None else project
    q_b = state.direction
    g_b = project(euclidean_grad(q_b, l_mxb, alive_m))
    g_b = g_b - jnp.dot(q_b, g_b) * q_b
    updates, opt_state = optimizer.update(g_b, state.opt_state, q_b)
    q_b = project(optax.apply_updates(q_b, updates))
    q_b = q_b / jnp.linalg.norm(q_b)
    loss = objective(q_b, l_mxb, alive_m)
    return LearnerState(q_b, opt_state, state.step + 1), loss

  return init_fn, step_fn


@functools.partial(jax.jit, static_argnames=("config",))
def learn_directions(
  initial_kxb: Float[Array, "K b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  *,
  config: LearnerConfig,
) -> tuple[Float[Array, "K b"], Float[Array, "K T"]]:
  """Runs ``config.steps`` steps from every initial direction (``vmap``).

  Returns:
    ``(directions, losses)``: the final unit directions and every restart's
    loss after each step.
  """
  init_fn, step_fn = make_dictionary_learner(config)

  def one(direction_b):
    def body(state, _):
      return step_fn(state, l_mxb, alive_m)

    state, losses = jax.lax.scan(
      body, init_fn(direction_b), None, length=config.steps
    )
    return state.direction, losses

  # optax's RAdam mixes its integer step count with floats; let it promote
  # even where the caller runs JAX with strict dtype promotion (our tests).
  with jax.numpy_dtype_promotion("standard"):
    return jax.vmap(one)(initial_kxb)


@functools.partial(jax.jit, static_argnames=("config",))
def learn_directions_constrained(
  initial_kxb: Float[Array, "K b"],
  pivot_kxb: Float[Array, "K b"] | Float[Array, "K t b"],
  in_subspace_k: Bool[Array, " K"],
  exclude_bxb: Float[Array, "b b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  *,
  config: LearnerConfig,
) -> tuple[Float[Array, "K b"], Float[Array, "K b"]]:
  r"""Deflated search towards missing columns, then the usual one from there.

  Stage 1 minimises the l1 objective on the unit sphere of a subspace, over
  a subset of the rows, one of two kinds per restart:

  * ``in_subspace_k[k]``: the orthogonal complement of the rows of
    ``exclude_bxb`` (orthonormal rows, zero rows are padding), over all
    alive rows. With ``exclude`` an orthonormal basis of the estimated
    rows ``r_a`` of ``Q^{-1}`` of the found samples
    (:func:`estimate_found_rows`), every missing column ``q_i`` satisfies
    ``r_a q_i = 0`` (``Q^{-1} Q = I``), so the complement holds (nearly)
    only the missing columns: a small dictionary problem whose basins no
    longer compete with the columns already found.
  * otherwise: orthogonal to the unit pivot ``q_f = pivot_kxb[k]`` (a found
    column), over the alive rows where ``L q_f`` vanishes
    (``|L_j q_f| <= screen_tol``). On those rows the sample ``f`` is
    inactive, ``q_f`` drops out of the problem exactly, and every other
    column is relatively sparser there. A zero pivot gives the plain
    unconstrained search. ``pivot_kxb`` may also be ``(K, t, b)``: per
    restart ``t`` orthonormal rows, the pivot first (its zero set picks
    the rows) and then further directions projected out with it (the
    pivot's found near-twins, whose differences are otherwise the
    sparsest directions on those rows; zero rows are padding).

  One shared ``exclude_bxb`` (padded to ``b`` rows so the shapes do not
  change between rounds) and a per-restart pivot and flag keep the memory
  at ``O(K b + b^2)``. Stage 2 runs :func:`learn_directions`' full search
  from the stage-1 end points, which lie in the basin of a true column when
  the estimate is inexact, so rounding sees an ordinary approximate column.

  Returns:
    ``(stage1, stage2)``: the unit end points of both stages.
  """
  init_fn, step_fn = make_dictionary_learner(config)

  def one(direction_b, pivot_tb, in_subspace):
    flag = in_subspace.astype(l_mxb.dtype)
    rows_m = alive_m & (
      in_subspace
      | (jnp.abs(jnp.dot(l_mxb, pivot_tb[0], precision=_HI)) <= screen_tol)
    )

    def project(v_b):
      v_b = v_b - flag * jnp.dot(
        exclude_bxb.T, jnp.dot(exclude_bxb, v_b, precision=_HI), precision=_HI
      )
      return v_b - jnp.dot(
        pivot_tb.T, jnp.dot(pivot_tb, v_b, precision=_HI), precision=_HI
      )

    def body(state, _):
      return step_fn(state, l_mxb, rows_m, project)

    state, _ = jax.lax.scan(
      body, init_fn(project(direction_b)), None, length=config.steps
    )
    return state.direction

  pivot_ktb = pivot_kxb if pivot_kxb.ndim == 3 else pivot_kxb[:, None, :]
  with jax.numpy_dtype_promotion("standard"):
    stage1_kxb = jax.vmap(one)(initial_kxb, pivot_ktb, in_subspace_k)
  stage2_kxb, _ = learn_directions(stage1_kxb, l_mxb, alive_m, config=config)
  return stage1_kxb, stage2_kxb


def round_direction(
  key: PRNGKeyArray,
  approx_b: Float[Array, " b"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  *,
  tries: int,
  pool: int,
) -> tuple[Float[Array, " b"], Int[Array, ""]]:
  r"""Sampling-based rounding of an approximately sparse direction.

  Rows are ranked by ``c_j = |L_j q| / ||L_j||`` (normalising keeps
  near-dead rows, whose ``L_j`` is tiny, from looking like zeros). The
  first try takes the kernel of the ``b - 1`` smallest; the others the
  kernels of random ``(b-1)``-subsets of the ``pool`` smallest, which
  tolerates a few impurities among the small rows. The try whose kernel has
  the most zeros wins.

  Returns:
    ``(direction, zeros)``: the best rounded unit direction and its number
    of zeros (``screen_tol``) over alive rows.
  """
  v_m = jnp.dot(l_mxb, approx_b, precision=_HI)
  norms_m = jnp.linalg.norm(l_mxb, axis=1)
  tiny = jnp.finfo(l_mxb.dtype).tiny
  score_m = jnp.where(
    alive_m, jnp.abs(v_m) / jnp.maximum(norms_m, tiny), jnp.inf
  )
  return _lowest_rows_kernel(
    key, score_m, l_mxb, alive_m, screen_tol, tries, pool
  )


def relu_guided_direction(
  key: PRNGKeyArray,
  guess_b: Float[Array, " b"],
  a_mxb: Float[Array, "m b"],
  bias_m: Float[Array, " m"],
  l_mxb: Float[Array, "m b"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  away_bxb: Float[Array, "b b"],
  *,
  tries: int,
  pool: int,
) -> tuple[Float[Array, " b"], Int[Array, ""]]:
  r"""A column proposed through the layer's ReLU from a guessed input.

  The guess is an input ``x = R^T y`` in the span of the batch's inputs
  (``A = W R^T``, so its pre-activations are ``A y + beta``). The rows
  deepest on its inactive side, ranked by ``(A_j y + beta_j) / ||A_j||``,
  stay inactive for every input whose pattern is close to the guess's, so
  the kernel of ``b - 1`` of them is often exactly one sample's column even
  from a random guess when the batch's inputs are alike (near-duplicates,
  low contrast, faces), where the l1 search's end points are mixtures of
  twins. The first try takes the ``b - 1`` deepest rows, the others random
  ``(b-1)``-subsets of the ``pool`` deepest (SPEAR's sampling, with rows
  ranked by the model instead of uniformly); ``away_bxb`` (the complement
  of the found columns, zero columns pad) keeps only kernels with a
  component outside the found columns.

  Returns:
    ``(direction, zeros)``: the kernel with the most zeros (``screen_tol``,
    alive rows) and that count (-1 when no kernel counts).
  """
  norms_m = jnp.linalg.norm(a_mxb, axis=1)
  tiny = jnp.finfo(a_mxb.dtype).tiny
  margin_m = jnp.where(
    alive_m & (norms_m > tiny),
    (jnp.dot(a_mxb, guess_b, precision=_HI) + bias_m)
    / jnp.maximum(norms_m, tiny),
    jnp.inf,
  )
  return _lowest_rows_kernel(
    key, margin_m, l_mxb, alive_m, screen_tol, tries, pool, away_bxb
  )


def _lowest_rows_kernel(
  key, score_m, l_mxb, alive_m, screen_tol, tries, pool, away_bxd=None
):
  """:func:`_best_sampled_kernel` over the ``pool`` rows (at least ``b -
  1``, at most ``m``) with the lowest ``score_m``, lowest first."""
  m, b = l_mxb.shape
  _, lowest = jax.lax.top_k(-score_m, min(max(pool, b - 1), m))
  return _best_sampled_kernel(
    key, lowest, l_mxb, alive_m, screen_tol, tries, away_bxd
  )


def _best_sampled_kernel(
  key, ranked_k, l_mxb, alive_m, screen_tol, tries, away_bxd=None
):
  """The kernel with most zeros among ``tries`` sets of ``b - 1`` rows.

  The first set is the first ``b - 1`` of ``ranked_k`` (rows, best
  first); the others are random ``(b-1)``-subsets of all of them, which
  tolerates a few impurities among the ranked rows. With ``away_bxd`` (an
  orthonormal basis of the complement of the found columns), only kernels
  with a component in it count: rows deep for a missing sample are zeros
  of found columns too, whose kernels have more zeros. Returns
  ``(direction, zeros)`` (zeros: ``screen_tol`` over alive rows; -1 when
  no kernel counts).
  """
  b = l_mxb.shape[1]

  def rows_for(i, subkey):
    shuffled = jax.random.permutation(subkey, ranked_k)
    return jnp.where(i == 0, ranked_k[: b - 1], shuffled[: b - 1])

  keys = jax.random.split(key, tries)
  rows_txk = jax.vmap(rows_for)(jnp.arange(tries), keys)
  q_txb = jax.vmap(null_vector)(l_mxb[rows_txk])
  v_txm = jnp.dot(q_txb, l_mxb.T, precision=_HI)
  zeros_t = jnp.sum((jnp.abs(v_txm) <= screen_tol) & alive_m[None, :], axis=1)
  if away_bxd is not None:
    along_t = jnp.linalg.norm(jnp.dot(q_txb, away_bxd, precision=_HI), axis=1)
    zeros_t = jnp.where(along_t > 1e-6, zeros_t, -1)
  best = jnp.argmax(zeros_t)
  return q_txb[best], zeros_t[best]


def complete_from_bias(
  found_bxk: np.ndarray,
  l_mxb: np.ndarray,
  bias_grad_m: np.ndarray,
  alive_m: np.ndarray,
) -> np.ndarray:
  r"""The last missing column of ``Q`` from the bias gradient, no weights.

  With ``D = L Q`` and ``bias_grad = D 1``, ``t = L^T bias_grad = Q 1`` is
  the sum of the (scaled) columns of ``Q``. Given ``k = b - 1`` found
  columns ``F`` (up to scale), the missing one is ``t - F s`` for unknown
  scales ``s``, and ``L (t - F s)`` is a column of ``D``: exactly zero on
  about half of the rows. So ``s`` is the solution of the sparse error
  correction problem ``L t = (L F) s + e`` with ``e`` sparse, solved by
  least absolute deviations (a linear program, HiGHS). Unlike
  :func:`complete_last_column` this needs neither the layer's weights nor
  its ReLU pattern, so it survives the local drift of a FedAvg update. It
  is only a cheap extra proposal, not a guarantee: the columns of ``L F``
  are themselves sparse, which defeats l1 decoding's genericity, and on
  one b = 32, m = 1000 FedAvg gradient it returned the exact missing
  column for 3 of the 32 leave-one-out cases (BUILD_NOTES.md); a wrong
  result is discarded by the usual filter.

  Returns:
    The missing direction (unit ``b``-vector); the caller polishes it and
    keeps it only if it passes the usual filter.
  """
  from scipy.optimize import linprog  # pylint: disable=g-import-not-at-top

  rows = np.flatnonzero(alive_m)
  target = l_mxb.T @ bias_grad_m
  y = l_mxb[rows] @ target
  a = l_mxb[rows] @ found_bxk
  scale = max(float(np.abs(y).max()), np.finfo(y.dtype).tiny)
  m, k = a.shape
  # Variables (s, u): minimise sum(u) subject to -u <= y - a s <= u.
  eye = np.eye(m)
  solution = linprog(
    np.concatenate([np.zeros(k), np.ones(m)]),
    A_ub=np.block([[a, -eye], [-a, -eye]]),
    b_ub=np.concatenate([y, -y]) / scale,
    bounds=[(None, None)] * k + [(0, None)] * m,
    method="highs",
  )
  if solution.status != 0:
    return np.zeros_like(target)
  direction = target - found_bxk @ (solution.x[:k] * scale)
  norm = np.linalg.norm(direction)
  return direction / norm if norm > 0 else direction


# Relative eigenvalue of L_I^T L_I below which a second null direction is
# read as exact (eps^(2/3) of float64; exact zeros give about 1e-30).
_PLANE_RTOL = 3.7e-11


def _last_row_breakpoints(found_bxk, r_bxn, weight_mxn, bias_m, alive_m):
  """The missing sample's row ``r`` of ``Q^{-1}`` (the null vector of the
  found columns as rows), ``u = W (r R)``, and the sorted breakpoints
  ``-beta_j / u_j`` of its alive rows (``inf`` where ``u_j = 0``)."""
  _, _, vt = jnp.linalg.svd(found_bxk.T, full_matrices=True)
  r_b = vt[-1]
  u_m = jnp.dot(weight_mxn, jnp.dot(r_b, r_bxn, precision=_HI), precision=_HI)
  safe_u = jnp.where(u_m == 0, 1.0, u_m)
  breaks = jnp.sort(jnp.where(alive_m & (u_m != 0), -bias_m / safe_u, jnp.inf))
  return r_b, u_m, breaks


@jax.jit
def complete_last_column(
  found_bxk: Float[Array, "b k"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  alive_m: Bool[Array, " m"],
  bias_grad_m: Float[Array, " m"] | None = None,
) -> tuple[Float[Array, " b"], Float[Array, ""]]:
  r"""The last missing column of ``Q`` from the ReLU pattern (``k = b - 1``).

  Row ``r`` of ``Q^{-1}`` belonging to the missing sample is orthogonal to
  the ``b - 1`` found columns, so ``x_miss = alpha (r R)`` up to one scalar.
  Its inactive neurons ``{j : alpha (W x)_j + beta_j <= 0}`` change only at
  the ``m`` breakpoints ``alpha_j = -beta_j / (W x)_j``; the missing column
  vanishes on the inactive set of the true ``alpha``. For every interval
  between breakpoints we take the eigenpair of ``L_I^T L_I`` over its
  inactive alive rows ``I`` with the smallest eigenvalue (relative to the
  largest) per squared component along ``r`` (components under ``1e-6``
  are not the missing column: found columns have none), in intervals
  whose second eigenvalue is not zero too (``I`` inside a twin pair's
  shared zeros pins no column); the interval whose score is smallest
  gives the column.

  With ``bias_grad_m`` (a FedSGD gradient, where ``D 1`` is exact) the
  scale is known: ``t = L^T bias_grad = Q 1`` gives ``r . t = 1`` for the
  row scaled as in ``Q^{-1}``, so ``alpha = 1 / (r . t)`` for unit ``r``.
  Its inactive set is used when ``L`` has an exact null vector there
  (relative eigenvalue under ``_PLANE_RTOL``); the scan alone can tie:
  near-twins with one and two own zeros left an interval whose inactive
  set (the shared zeros plus one row where a mixture of the pair vanishes)
  has an exact null vector too, and argmin over round-off chose it.

  Returns:
    ``(direction, score)`` (that relative eigenvalue per squared
    component); the caller polishes the direction and keeps it only if it
    passes the usual filter.
  """
  b = l_mxb.shape[1]
  r_b, u_m, breaks = _last_row_breakpoints(
    found_bxk, r_bxn, weight_mxn, bias_m, alive_m
  )
  finite = jnp.isfinite(breaks)
  last = jnp.max(jnp.where(finite, breaks, -jnp.inf))
  first = jnp.min(breaks)
  mids = jnp.concatenate(
    [
      (first - 1.0 - jnp.abs(first))[None],
      0.5 * (breaks[:-1] + breaks[1:]),
      (last + 1.0 + jnp.abs(last))[None],
    ]
  )
  mids = jnp.where(jnp.isfinite(mids), mids, last + 1.0 + jnp.abs(last))

  def kernel_at(alpha):
    inactive = (alpha * u_m + bias_m <= 0) & alive_m
    return (inactive, *rows_gram_eigh(l_mxb, inactive))

  def evaluate(inactive, eigvals, eigvecs):
    # The missing column has a component along r; a found column has none
    # (its twin's zero set holds an interval's inactive set too, and its
    # exact null vector used to win: a pair with one and two own zeros).
    # An inactive set inside a twin pair's shared zeros has a kernel of two
    # dimensions, any direction of which scores 0: such an interval does
    # not determine the column.
    along = jnp.dot(r_b, eigvecs, precision=_HI) ** 2
    relative = eigvals / jnp.maximum(eigvals[-1], 1e-300)
    scores = jnp.where(along > 1e-6, relative / along, jnp.inf)
    best = jnp.argmin(scores)
    enough = (jnp.sum(inactive) >= b + 3) & (relative[1] > _PLANE_RTOL)
    exact = enough & (relative[best] <= _PLANE_RTOL)
    return jnp.where(enough, scores[best], jnp.inf), eigvecs[:, best], exact

  relative, vectors, _ = jax.lax.map(
    lambda alpha: evaluate(*kernel_at(alpha)), mids, batch_size=32
  )
  best = jnp.argmin(relative)
  if bias_grad_m is None:
    return vectors[best], relative[best]
  target_b = jnp.dot(l_mxb.T, bias_grad_m, precision=_HI)
  inactive, eigvals, eigvecs = kernel_at(
    1.0 / jnp.dot(r_b, target_b, precision=_HI)
  )
  scaled, vector, exact = evaluate(inactive, eigvals, eigvecs)
  plane_vector, plane = _nested_twin_plane(
    inactive, eigvals, eigvecs, r_b, found_bxk
  )
  return (
    jnp.where(exact, vector, jnp.where(plane, plane_vector, vectors[best])),
    jnp.where(exact, scaled, jnp.where(plane, 0.0, relative[best])),
  )


def _nested_twin_plane(inactive_m, eigvals, eigvecs, r_b, found_bxk):
  """The last column when its sample's inactive set annihilates a plane.

  A nested twin (no zeros of its own) shares its zero set with a found
  twin: the kernel there is their plane, and any column in it other than
  the twin's gives the missing sample its exact input (its row of
  ``Q^{-1}`` is ``r`` whatever the column) while the twin's input is not
  determined (:func:`spear_jax.attack.identifiable_inputs`). Returns the
  plane's unit vector orthogonal to the twin (the projection of ``r``)
  and whether the kernel is exactly a plane holding a found column, from
  the inactive set and the ascending eigenpairs of ``L_I^T L_I``.
  """
  b = eigvecs.shape[0]
  relative = eigvals / jnp.maximum(eigvals[-1], 1e-300)
  plane_bx2 = eigvecs[:, :2]
  coords_2 = jnp.dot(plane_bx2.T, r_b, precision=_HI)
  coords_2 = coords_2 / jnp.maximum(jnp.linalg.norm(coords_2), 1e-300)
  vector_b = jnp.dot(plane_bx2, coords_2, precision=_HI)
  twin_b = jnp.dot(plane_bx2, jnp.stack([-coords_2[1], coords_2[0]]))
  found_bxk = found_bxk / jnp.maximum(
    jnp.linalg.norm(found_bxk, axis=0, keepdims=True), 1e-300
  )
  holds_found = jnp.max(jnp.abs(jnp.dot(twin_b, found_bxk))) > 1 - 1e-9
  plane = (
    (jnp.sum(inactive_m) >= b + 3)
    & (relative[1] <= _PLANE_RTOL)
    & (relative[2] > _PLANE_RTOL)
    & holds_found
  )
  return vector_b, plane


@functools.partial(jax.jit, static_argnames=("tries", "grid"))
def sample_last_column(
  key: PRNGKeyArray,
  found_bxk: Float[Array, "b k"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  alive_m: Bool[Array, " m"],
  screen_tol: Float[Array, ""],
  *,
  tries: int = 8,
  grid: int = 128,
) -> tuple[Float[Array, " b"], Int[Array, ""]]:
  r"""The last missing column when the ReLU pattern is only nearly known.

  As in :func:`complete_last_column`, the missing sample is ``x = alpha
  (r R)`` with ``r`` the null vector of the ``k = b - 1`` found columns.
  After FedAvg's local steps no single weight matrix gives the missing
  column's zero set exactly (a few percent of its rows changed sign along
  the way), so no interval's inactive set is exactly a zero set. Instead,
  for ``grid`` values of ``alpha`` (midpoints between the sorted
  breakpoints, evenly by rank), the ``4b`` alive rows deepest on the
  inactive side (margin ``(alpha (W x)_j + beta_j) / ||W_j||``) give
  ``tries`` kernels of ``(b-1)``-row subsets, the deepest ``b - 1`` first
  (:func:`round_direction`'s sampling); the kernel with most zeros and a
  component along ``r`` (found columns have none) wins.

  Returns:
    ``(direction, zeros)``; the caller filters it as any proposal.
  """
  m, b = l_mxb.shape
  row_b, u_m, breaks = _last_row_breakpoints(
    found_bxk, r_bxn, weight_mxn, bias_m, alive_m
  )
  norm_m = jnp.maximum(
    jnp.linalg.norm(weight_mxn, axis=1), jnp.finfo(l_mxb.dtype).tiny
  )
  count = jnp.maximum(jnp.sum(jnp.isfinite(breaks)), 2)
  # Interval midpoints evenly by rank, and one beyond each end.
  at = jnp.linspace(0.0, 1.0, grid) * (count - 2).astype(l_mxb.dtype)
  low = breaks[jnp.floor(at).astype(jnp.int32)]
  mids = 0.5 * (low + breaks[jnp.floor(at).astype(jnp.int32) + 1])
  ends = jnp.stack([breaks[0], breaks[count - 1]])
  mids = jnp.concatenate(
    [mids, ends + jnp.asarray([-1.0, 1.0]) * (1.0 + jnp.abs(ends))]
  )
  pool = min(4 * b, m)

  def evaluate(alpha, subkey):
    margin_m = jnp.where(alive_m, (alpha * u_m + bias_m) / norm_m, jnp.inf)
    _, deepest = jax.lax.top_k(-margin_m, pool)
    return _best_sampled_kernel(
      subkey, deepest, l_mxb, alive_m, screen_tol, tries, row_b[:, None]
    )

  keys = jax.random.split(key, mids.shape[0])
  directions, zeros = jax.lax.map(
    lambda args: evaluate(*args), (mids, keys), batch_size=16
  )
  best = jnp.argmax(zeros)
  return directions[best], zeros[best]


def _complement_basis(found_bxb, valid_b):
  """Masked found columns and an orthonormal basis of their complement.

  Returns ``(found, basis)``: ``found_bxb`` with invalid rows zeroed, and
  the left singular vectors of ``found^T`` with the columns outside the
  orthogonal complement of the found columns zeroed (complement columns
  come last).
  """
  b = found_bxb.shape[0]
  found_bxb = found_bxb * valid_b[:, None].astype(found_bxb.dtype)
  u_bxb, s_b, _ = jnp.linalg.svd(found_bxb.T)
  eps = jnp.finfo(found_bxb.dtype).eps
  complement_b = s_b <= b * eps * jnp.maximum(s_b[0], 1.0)
  return found_bxb, u_bxb * complement_b[None, :].astype(u_bxb.dtype)


@functools.partial(
  jax.jit,
  static_argnames=(
    "steps",
    "temperature",
    "learning_rate",
    "robust_temperature",
  ),
)
def estimate_found_rows(
  found_bxb: Float[Array, "b b"],
  valid_b: Bool[Array, " b"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  alive_m: Bool[Array, " m"],
  zero_tol: Float[Array, ""],
  *,
  steps: int = 400,
  temperature: float = 1e-3,
  learning_rate: float = 0.1,
  robust_temperature: float | None = None,
) -> Float[Array, "b b"]:
  r"""Rows of ``Q^{-1}`` of the found samples, from their ReLU patterns.

  The rows ``found_bxb[a]`` flagged ``valid_b`` are found unit columns
  ``q_a`` of ``Q`` (the others are zero padding, so the shapes do not
  change as columns are found). The row ``r_a`` of ``Q^{-1}`` belonging to
  ``q_a`` satisfies ``r_a q_l = 0`` for every other found column ``q_l``,
  so ``r_a = B_a y`` with ``B_a = [C, d_a / ||d_a||]``: ``C`` an
  orthonormal basis of the complement of the found columns' span and
  ``d_a`` the dual vector of ``q_a`` in that span (``d_a q_l = delta_al``);
  ``b - k + 1`` unknowns. Its sample ``x_a = R^T r_a`` switches neuron
  ``j`` on exactly where ``(L q_a)_j != 0``:

  .. math::
     \sigma_j \left(W_j R^T B_a y + \beta_j\right) \ge 0,\qquad
     \sigma_j = \pm 1 \text{ for } |L_j q_a| \gtrless \text{zero\_tol},

  one constraint per alive row, a small polyhedral cell. We return (a
  smooth version of) its Chebyshev centre: Adam on ``y`` maximises the
  soft minimum (``temperature``) of the margins normalised by
  ``||W_j R^T B_a||``. The scale of ``r_a`` (fixed by the bias; rows of
  ``Q^{-1}`` for unit columns are typically large) is found first: ``y``
  starts at ``t e`` along the dual vector, with ``t`` (of either sign) on a
  log grid satisfying the most constraints, and Adam runs on ``y / |t|``
  (the problem with bias ``beta / |t|``), so its step sizes are relative.
  The missing columns are (nearly) orthogonal to the returned rows, which
  :func:`learn_directions_constrained` exploits.

  The cell is empty when the pattern is not one weight matrix's: after
  FedAvg's local steps 5-15% of the signs disagree with the server's
  weights, and the soft minimum is then set by the worst violations. With
  ``robust_temperature``, ``y`` is instead the ridge-regularised logistic
  fit of all the signs (the pattern rounding's fit at that temperature,
  in units of the RMS bias), which the disagreeing rows only perturb.

  Returns:
    The estimated rows (unnormalised; zero for padding), one per row of
    ``found_bxb``.
  """
  b = found_bxb.shape[0]
  found_bxb, basis_bxb = _complement_basis(found_bxb, valid_b)
  dual_bxb = jnp.linalg.pinv(found_bxb.T)
  wr_mxb = jnp.dot(weight_mxn, r_bxn.T, precision=_HI)
  active_bxm = jnp.abs(jnp.dot(found_bxb, l_mxb.T, precision=_HI)) > zero_tol
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  tiny = jnp.finfo(found_bxb.dtype).tiny
  magnitudes = jnp.logspace(-4.0, 8.0, 97, dtype=found_bxb.dtype)
  scales_t = jnp.concatenate([magnitudes, -magnitudes])

  def one(dual_b, active_m):
    dual_b = dual_b / jnp.maximum(jnp.linalg.norm(dual_b), tiny)
    basis_bxd = jnp.concatenate([basis_bxb, dual_b[:, None]], axis=1)
    a_mxd = jnp.dot(wr_mxb, basis_bxd, precision=_HI)
    sign_m = jnp.where(active_m, 1.0, -1.0).astype(a_mxd.dtype)
    if robust_temperature is not None:
      fit = _logistic_problem(a_mxd, bias_m, alive_m, robust_temperature)
      labels_m = jnp.where(alive_m, sign_m, 0.0)
      y_d = _fit_pattern(fit, labels_m, _NEWTON_STEPS)
      return jnp.dot(basis_bxd, y_d, precision=_HI)
    scale_m = jnp.maximum(jnp.linalg.norm(a_mxd, axis=1), tiny)
    satisfied_t = jnp.sum(
      (
        sign_m[None, :]
        * (scales_t[:, None] * a_mxd[None, :, -1] + bias_m[None, :])
        >= 0
      )
      & alive_m[None, :],
      axis=1,
    )
    scale = scales_t[jnp.argmax(satisfied_t)]
    bias_scaled_m = bias_m / jnp.abs(scale)

    def soft_neg_margin(y_d):
      margin_m = sign_m * (jnp.dot(a_mxd, y_d, precision=_HI) + bias_scaled_m)
      margin_m = jnp.where(alive_m, margin_m / scale_m, jnp.inf)
      return temperature * jax.nn.logsumexp(-margin_m / temperature)

    def body(carry, _):
      y_d, opt_state = carry
      updates, opt_state = optimizer.update(
        jax.grad(soft_neg_margin)(y_d), opt_state
      )
      return (optax.apply_updates(y_d, updates), opt_state), None

    y_d = jnp.zeros((b + 1,), a_mxd.dtype).at[-1].set(jnp.sign(scale))
    (y_d, _), _ = jax.lax.scan(
      body, (y_d, optimizer.init(y_d)), None, length=steps
    )
    return jnp.abs(scale) * jnp.dot(basis_bxd, y_d, precision=_HI)

  with jax.numpy_dtype_promotion("standard"):
    # 16 samples at a time: each holds m x b and m x 194 arrays (4.8 GB for
    # all 210 at m = 4000 when vmapped at once).
    rows_bxb = jax.lax.map(
      lambda args: one(*args), (dual_bxb, active_bxm), batch_size=16
    )
  return rows_bxb * valid_b[:, None].astype(rows_bxb.dtype)


# Pattern rounding's passes: fractions of the predicted inactive rows taken
# as zeros, Newton steps of the logistic fit, and re-labelled passes.
PATTERN_FRACTIONS = (0.0, 0.25, 0.4, 0.6, 0.8)
_NEWTON_STEPS = 30
_REPEATS = 2
# Random (b-1)-subsets of the 4b deepest rows per pass (see
# :func:`round_with_pattern`).
_PATTERN_TRIES = 8


class _PatternProblem(NamedTuple):
  """What every column of :func:`round_with_pattern` shares (no batch axis).

  ``d`` is the padded width of the complement ``C`` (``basis_bxd``, zero
  columns pad); ``low`` and ``high`` are the rank thresholds of the labels
  (see :func:`_pattern_labels`).
  """

  l_mxb: Float[Array, "m b"]
  row_norm_m: Float[Array, " m"]
  alive_m: Bool[Array, " m"]
  zero_tol: Float[Array, ""]
  a_mxd: Float[Array, "m d"]
  a_norm_m: Float[Array, " m"]
  bias_m: Float[Array, " m"]
  scale: Float[Array, ""]
  ridge: Float[Array, ""]
  low: Float[Array, ""]
  high: Float[Array, ""]
  basis_bxd: Float[Array, "b d"]


def _pattern_subspace(found_bxb, valid_b, weight_mxn, r_bxn, max_missing):
  """Masked found columns and ``A = W R^T C`` on the padded complement.

  Returns ``(found, a_mxd, basis_bxd)``: ``found_bxb`` with invalid rows
  zeroed, ``A`` with ``A y = W x`` for ``x = R^T C y``, and ``C``, the
  last ``d = min(max_missing, b)`` columns of the complement basis (zero
  padded).
  """
  b = found_bxb.shape[0]
  found_bxb, basis_bxb = _complement_basis(found_bxb, valid_b)
  # Complement columns come last: take the last max_missing.
  width = min(max_missing, b)
  basis_bxd = basis_bxb[:, b - width :]
  a_mxd = jnp.dot(
    jnp.dot(weight_mxn, r_bxn.T, precision=_HI), basis_bxd, precision=_HI
  )
  return found_bxb, a_mxd, basis_bxd


def _label_ranks(
  found_bxb, valid_b, l_mxb, alive_m, zero_tol, n_alive, label_margin
):
  """Rank thresholds ``(low, high)`` of the inactive and active labels.

  ``low`` is ``label_margin`` times the typical zero count (the median
  over found columns; half the alive rows when none is found), ``high``
  leaves out ``label_margin / 2`` of the rows above the typical count.
  """
  dtype = l_mxb.dtype
  found_zeros_b = jnp.sum(
    (jnp.abs(jnp.dot(found_bxb, l_mxb.T, precision=_HI)) <= zero_tol)
    & alive_m[None, :],
    axis=1,
  ).astype(dtype)
  typical = jnp.median(jnp.where(valid_b, found_zeros_b, jnp.nan)) / n_alive
  typical = jnp.where(jnp.isnan(typical), 0.5, typical)
  low = label_margin * typical * n_alive
  high = (typical + 0.5 * label_margin * (1.0 - typical)) * n_alive
  return low, high


def _pattern_problem(
  found_bxb,
  valid_b,
  l_mxb,
  r_bxn,
  weight_mxn,
  bias_m,
  alive_m,
  zero_tol,
  max_missing,
  temperature,
  label_margin,
):
  """The shared data of :func:`round_with_pattern` (a ``_PatternProblem``;
  the logistic scale and ridge of :func:`_logistic_problem`)."""
  dtype = l_mxb.dtype
  found_bxb, a_mxd, basis_bxd = _pattern_subspace(
    found_bxb, valid_b, weight_mxn, r_bxn, max_missing
  )
  tiny = jnp.finfo(dtype).tiny
  a_norm_m = jnp.maximum(jnp.linalg.norm(a_mxd, axis=1), tiny)
  n_alive = jnp.maximum(jnp.sum(alive_m.astype(dtype)), 1.0)
  fit = _logistic_problem(a_mxd, bias_m, alive_m, temperature)
  row_norm_m = jnp.maximum(jnp.linalg.norm(l_mxb, axis=1), tiny)
  low, high = _label_ranks(
    found_bxb, valid_b, l_mxb, alive_m, zero_tol, n_alive, label_margin
  )
  return _PatternProblem(
    l_mxb=l_mxb,
    row_norm_m=row_norm_m,
    alive_m=alive_m,
    zero_tol=zero_tol,
    a_mxd=a_mxd,
    a_norm_m=a_norm_m,
    bias_m=bias_m,
    scale=fit.scale,
    ridge=fit.ridge,
    low=low,
    high=high,
    basis_bxd=basis_bxd,
  )


class _Logistic(NamedTuple):
  """A logistic fit of ReLU labels: margins ``(A y + beta) / scale``."""

  a_mxd: Float[Array, "m d"]
  bias_m: Float[Array, " m"]
  scale: Float[Array, ""]
  ridge: Float[Array, ""]


def _logistic_problem(a_mxd, bias_m, alive_m, temperature):
  """The :class:`_Logistic` fit of ``A``: the logistic scale is
  ``temperature`` times the RMS of the alive biases (1 if they are all
  zero); the ridge is ``1e-9`` times the mean diagonal of ``A^T A /
  scale^2`` over alive rows, plus ``tiny``."""
  dtype = a_mxd.dtype
  alive_f = alive_m.astype(dtype)
  n_alive = jnp.maximum(jnp.sum(alive_f), 1.0)
  rms_bias = jnp.sqrt(jnp.sum(alive_f * bias_m**2) / n_alive)
  scale = temperature * jnp.where(rms_bias > 0, rms_bias, 1.0)
  ridge = (
    1e-9 * jnp.sum(alive_f[:, None] * a_mxd**2) / (a_mxd.shape[1] * scale**2)
    + jnp.finfo(dtype).tiny
  )
  return _Logistic(a_mxd, bias_m, scale, ridge)


def _logistic_loss(problem, y_d, labels_m):
  """Ridge-regularised logistic loss of the labels at ``y`` (weights |l|)."""
  margin_m = (
    jnp.dot(problem.a_mxd, y_d, precision=_HI) + problem.bias_m
  ) / problem.scale
  return jnp.sum(
    jnp.abs(labels_m) * jax.nn.softplus(-labels_m * margin_m)
  ) + 0.5 * problem.ridge * jnp.dot(y_d, y_d)


def _fit_pattern(problem, labels_m, newton_steps):
  """``y`` minimising :func:`_logistic_loss`: Newton from 0, step search.

  Each step tries the Newton step scaled by ``2^-i`` (``i < 10``) and
  takes the best trial if it lowers the loss, else stays.
  """
  a_mxd, scale, ridge = problem.a_mxd, problem.scale, problem.ridge
  dtype = labels_m.dtype
  width = a_mxd.shape[1]
  steps_s = 2.0 ** -jnp.arange(10, dtype=dtype)

  def body(y_d, _):
    margin_m = (jnp.dot(a_mxd, y_d, precision=_HI) + problem.bias_m) / scale
    p_m = jax.nn.sigmoid(-labels_m * margin_m) * jnp.abs(labels_m)
    g_d = -jnp.dot(p_m * labels_m, a_mxd, precision=_HI) / scale + ridge * y_d
    h_m = p_m * (1.0 - jax.nn.sigmoid(-labels_m * margin_m)) / scale**2
    h_dxd = jnp.dot(
      a_mxd.T * h_m[None, :], a_mxd, precision=_HI
    ) + ridge * jnp.eye(width, dtype=dtype)
    step_d = jnp.linalg.solve(h_dxd, g_d)
    trial_s = jax.vmap(
      lambda t: _logistic_loss(problem, y_d - t * step_d, labels_m)
    )(steps_s)
    best = jnp.argmin(trial_s)
    better = trial_s[best] < _logistic_loss(problem, y_d, labels_m)
    return jnp.where(better, y_d - steps_s[best] * step_d, y_d), None

  y_d, _ = jax.lax.scan(
    body, jnp.zeros((width,), dtype), None, length=newton_steps
  )
  return y_d


def _zero_count(problem, q_b):
  """Number of alive rows ``j`` with ``|L_j q| <= zero_tol``."""
  return jnp.sum(
    (jnp.abs(jnp.dot(problem.l_mxb, q_b, precision=_HI)) <= problem.zero_tol)
    & problem.alive_m
  )


def _pattern_labels(problem, q_b):
  """Labels of the rows from ``q``: -1 inactive, +1 active, 0 left out.

  Alive rows ranked by ``|L_j q| / ||L_j||``: below rank ``low`` inactive,
  from rank ``high`` active; dead rows are left out.
  """
  dtype = problem.l_mxb.dtype
  score_m = jnp.where(
    problem.alive_m,
    jnp.abs(jnp.dot(problem.l_mxb, q_b, precision=_HI)) / problem.row_norm_m,
    jnp.inf,
  )
  rank_m = jnp.argsort(jnp.argsort(score_m)).astype(dtype)
  labels_m = jnp.where(
    rank_m < problem.low, -1.0, jnp.where(rank_m >= problem.high, 1.0, 0.0)
  )
  return jnp.where(problem.alive_m, labels_m, 0.0).astype(dtype)


def _deepest_rows_columns(problem, y_d, fractions):
  """Candidate columns: kernels of the rows deepest on the inactive side.

  Rows are ranked by their normalised margin ``(A_j y + beta_j) /
  ||A_j||``; for each ``f`` in ``fractions``, the ``max(floor(f N), b -
  1)`` deepest (``N`` the predicted inactive count, at least ``b - 1``)
  give the smallest eigenvector of their Gram matrix: ``(len(fractions),
  b)`` unit columns, and the alive rows deepest first.
  """
  m, b = problem.l_mxb.shape
  dtype = problem.l_mxb.dtype
  margin_m = jnp.where(
    problem.alive_m,
    (jnp.dot(problem.a_mxd, y_d, precision=_HI) + problem.bias_m)
    / problem.a_norm_m,
    jnp.inf,
  )
  negative = jnp.maximum(jnp.sum(margin_m < 0).astype(dtype), b - 1.0)
  order_m = jnp.argsort(margin_m)
  depth_m = jnp.zeros((m,), dtype).at[order_m].set(jnp.arange(m, dtype=dtype))

  def candidate(fraction):
    count = jnp.maximum(jnp.floor(fraction * negative), b - 1.0)
    _, vectors = rows_gram_eigh(problem.l_mxb, depth_m < count)
    return vectors[:, 0]

  return jax.vmap(candidate)(jnp.asarray(fractions, dtype)), order_m


def _pattern_pass(problem, q_b, key, newton_steps, fractions, tries):
  """One pass from ``q``: label, fit, and the candidate with most zeros
  (the deepest rows' kernels, then ``tries`` sampled ones)."""
  labels_m = _pattern_labels(problem, q_b)
  y_d = _fit_pattern(problem, labels_m, newton_steps)
  q_fxb, order_m = _deepest_rows_columns(problem, y_d, fractions)
  zeros_f = jax.vmap(functools.partial(_zero_count, problem))(q_fxb)
  best = jnp.argmax(zeros_f)
  q_b, zeros = q_fxb[best], zeros_f[best]
  if tries:
    m, b = problem.l_mxb.shape
    sampled_b, sampled_zeros = _best_sampled_kernel(
      key,
      order_m[: min(4 * b, m)],
      problem.l_mxb,
      problem.alive_m,
      problem.zero_tol,
      tries,
      problem.basis_bxd,
    )
    better = sampled_zeros > zeros
    q_b = jnp.where(better, sampled_b, q_b)
    zeros = jnp.where(better, sampled_zeros, zeros)
  return q_b, zeros


def _round_one_with_pattern(
  problem, q_b, key, newton_steps, fractions, repeats, tries
):
  """``repeats`` passes from ``q``, each seeded by the best column so far.

  Returns ``(column, zeros)``: ``q`` itself unless a pass finds a column
  with strictly more zeros.
  """
  best_q, best_zeros = q_b, _zero_count(problem, q_b)
  for r in range(repeats):
    q_new, zeros_new = _pattern_pass(
      problem,
      best_q,
      jax.random.fold_in(key, r),
      newton_steps,
      fractions,
      tries,
    )
    better = zeros_new > best_zeros
    best_q = jnp.where(better, q_new, best_q)
    best_zeros = jnp.where(better, zeros_new, best_zeros)
  return best_q, best_zeros


@functools.partial(
  jax.jit,
  static_argnames=(
    "max_missing",
    "fractions",
    "newton_steps",
    "repeats",
    "temperature",
    "label_margin",
    "tries",
  ),
)
def round_with_pattern(
  approx_kxb: Float[Array, "K b"],
  found_bxb: Float[Array, "b b"],
  valid_b: Bool[Array, " b"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  alive_m: Bool[Array, " m"],
  zero_tol: Float[Array, ""],
  *,
  max_missing: int,
  fractions: tuple[float, ...] = PATTERN_FRACTIONS,
  newton_steps: int = _NEWTON_STEPS,
  repeats: int = _REPEATS,
  temperature: float = 8.0,
  label_margin: float = 0.4,
  key: PRNGKeyArray | None = None,
  tries: int = _PATTERN_TRIES,
) -> tuple[Float[Array, "K b"], Int[Array, " K"]]:
  r"""Rounding of approximate missing columns through the layer's ReLU.

  With the ``k`` found columns exact (rows ``found_bxb[valid_b]``), the
  rows of ``Q^{-1}`` of the ``d = b - k`` missing samples span exactly the
  orthogonal complement ``C`` of the found columns (``Q^{-1} Q = I``), so a
  missing sample is ``x = R^T C y`` for some ``y`` in ``R^d``, and its
  inactive neurons ``{j : A_j y + beta_j <= 0}`` (``A = W R^T C``) are cut
  out by ``m`` hyperplanes in only ``d`` dimensions. Its column ``q``
  vanishes on them. From an approximate column ``q~`` (rows with the
  smallest ``|L_j q~| / ||L_j||`` labelled inactive, the largest active,
  the ambiguous middle left out) a ridge-regularised logistic regression
  in ``y`` (Newton with a step-size search; convex, so no restarts) fits
  the pattern; with ``d`` parameters and ``m`` labels it is robust to the
  labels the approximation gets wrong. The rows deepest on the inactive
  side (the fraction ``f`` of the predicted inactive rows, for every
  ``f`` in ``fractions``) are then taken as exact zeros: the smallest
  eigenvector of their Gram matrix is the candidate column; so are the
  kernels of ``tries`` random ``(b-1)``-subsets of the ``4b`` deepest rows
  (seeded by ``key``; ``None``: a fixed key), which tolerate a few
  impurities among them: after FedAvg's local steps the server's pattern
  is off on the rows that changed sign along the way, and ~1% of the
  deepest rows are not zeros. The candidate with the most zeros wins, and
  it seeds the labels of the next of ``repeats`` passes. This snaps
  columns that the plain rounding cannot, e.g. a sample whose near-twin's
  column shares most of its zero set.

  ``d`` must be at most the static ``max_missing`` (the complement is
  padded to that width, so one compilation serves every ``k``).
  ``temperature`` is the logistic scale in units of the RMS of the bias;
  ``label_margin`` the fraction of the typical zero count (the median over
  found columns) labelled inactive, ``label_margin / 2`` of the rest of
  the rows being labelled active.

  Returns:
    ``(directions, zeros)``: the best unit column per approximate one and
    its number of zeros (``zero_tol``) over alive rows.
  """
  problem = _pattern_problem(
    found_bxb,
    valid_b,
    l_mxb,
    r_bxn,
    weight_mxn,
    bias_m,
    alive_m,
    zero_tol,
    max_missing,
    temperature,
    label_margin,
  )
  key = jax.random.key(0) if key is None else key
  keys = jax.random.split(key, approx_kxb.shape[0])
  return _round_all_with_pattern(
    problem, approx_kxb, keys, newton_steps, fractions, repeats, tries
  )


def _round_all_with_pattern(
  problem, approx_kxb, keys, newton_steps, fractions, repeats, tries
):
  """:func:`_round_one_with_pattern` of every row of ``approx_kxb``."""
  return jax.vmap(
    functools.partial(
      _round_one_with_pattern,
      problem,
      newton_steps=newton_steps,
      fractions=fractions,
      repeats=repeats,
      tries=tries,
    )
  )(approx_kxb, keys)


@functools.partial(
  jax.jit, static_argnames=("max_missing", "temperature", "label_margin")
)
def pattern_problem(
  found_bxb: Float[Array, "b b"],
  valid_b: Bool[Array, " b"],
  l_mxb: Float[Array, "m b"],
  r_bxn: Float[Array, "b n"],
  weight_mxn: Float[Array, "m n"],
  bias_m: Float[Array, " m"],
  alive_m: Bool[Array, " m"],
  zero_tol: Float[Array, ""],
  *,
  max_missing: int,
  temperature: float = 8.0,
  label_margin: float = 0.4,
) -> _PatternProblem:
  """The data :func:`round_with_pattern` shares between its columns.

  Only ``m x max_missing`` and ``m x b`` arrays: the weight is read once
  here, so the per-column work (:func:`round_with_pattern_rows`) can be
  split over devices without a copy of ``weight_mxn`` on each.
  """
  return _pattern_problem(
    found_bxb,
    valid_b,
    l_mxb,
    r_bxn,
    weight_mxn,
    bias_m,
    alive_m,
    zero_tol,
    max_missing,
    temperature,
    label_margin,
  )


def round_with_pattern_rows(
  rows: tuple[Float[Array, "K b"], PRNGKeyArray],
  shared: tuple[_PatternProblem],
  *,
  tries: int = _PATTERN_TRIES,
) -> tuple[Float[Array, "K b"], Int[Array, " K"]]:
  """:func:`round_with_pattern` of ``rows = (approx_kxb, keys_k)`` given
  ``shared = (pattern_problem(...),)``, with the default passes and
  ``tries`` sampled kernels per pass (the ``rows, shared`` form of
  :func:`spear_jax._distributed.map_rows`)."""
  (approx_kxb, keys), (problem,) = rows, shared
  return _round_all_with_pattern(
    problem,
    approx_kxb,
    keys,
    _NEWTON_STEPS,
    PATTERN_FRACTIONS,
    _REPEATS,
    tries,
  )


def nested_twin_columns(
  found_bxk: np.ndarray,
  span_bx2: np.ndarray,
  l_mxb: np.ndarray,
  r_bxn: np.ndarray,
  bias_grad_m: np.ndarray,
  weight_mxn: np.ndarray,
  bias_m: np.ndarray,
  alive_m: np.ndarray,
  screen_tol: float,
  chunk: int = 256,
) -> np.ndarray:
  r"""The columns of a near-twin pair, off the ReLU pattern.

  Two missing columns span ``V`` (``k = b - 2`` found) and share the zero
  set ``S`` (the alive rows where all of ``V`` vanishes). A twin whose zero
  set is ``S`` plus the rows ``A`` is the direction ``u`` of ``V`` that
  vanishes on ``A``; for ``|A| <= 1`` its zero set looks like a pinned
  mixture and no angle cluster (:func:`spear_jax.attack.split_mixture`)
  singles it out. Every alive row ``rho`` outside ``S`` vanishes along one
  direction ``u_rho`` of ``V``: the candidates. With ``Q = [F, u_rho, w]``
  for any ``w`` in ``V`` and the scales fixed by the bias gradient
  (``t = L^T bias_grad = Q 1``), the other twin's input is
  ``x = (r R) / (r . t)`` with ``r`` orthogonal to the found columns ``F``
  and to ``u_rho``, whatever ``w``; for the right candidate it is the true
  input, inactive exactly on the other twin's zero set. Nested twins (that
  set is ``S``): a candidate is kept when ``W x + beta <= 0`` exactly on
  ``S`` among the alive rows. Otherwise the rows inactive beyond ``S`` must
  all vanish along one direction ``w`` of ``V`` (the other twin's column),
  and the pair is kept when the same test from ``w`` gives back ``u_rho``'s
  zero set (frames at m = 200 often differ in one or two neurons).

  Returns:
    The unit directions that pass (rows; usually one, or a pair; none when
    the pattern explains no candidate).
  """
  b = l_mxb.shape[1]
  coords_mx2 = l_mxb @ span_bx2
  shared = alive_m & (np.linalg.norm(coords_mx2, axis=1) <= screen_tol)
  rows = np.flatnonzero(alive_m & ~shared)
  u, _, _ = np.linalg.svd(found_bxk, full_matrices=True)
  complement_bx2 = u[:, found_bxk.shape[1] :]
  if not rows.size or not shared.any() or complement_bx2.shape[1] != 2:
    return np.zeros((0, b), l_mxb.dtype)
  alive_rows = np.flatnonzero(alive_m)
  pattern = _TwinPattern(
    span_bx2,
    complement_bx2,
    # Pre-activations per row of Q^-1 (W R^T).
    weight_mxn[alive_rows] @ r_bxn.T,
    bias_m[alive_rows],
    l_mxb.T @ bias_grad_m,
  )
  shared_a = shared[alive_rows]
  coords_ax2 = coords_mx2[alive_rows]
  nested = [np.zeros((0, b), l_mxb.dtype)]
  pairs = [np.zeros((0, b), l_mxb.dtype)]
  for start in range(0, rows.size, chunk):
    p_cx2 = coords_mx2[rows[start : start + chunk]]
    # u_rho in V with L_rho u_rho = 0.
    u_cxb = np.stack([-p_cx2[:, 1], p_cx2[:, 0]], axis=1) @ span_bx2.T
    u_cxb /= np.linalg.norm(u_cxb, axis=1, keepdims=True)
    inactive_cxa = pattern.inactive_of_other(u_cxb)
    nested.append(u_cxb[np.all(inactive_cxa == shared_a[None, :], axis=1)])
    beyond = np.all(inactive_cxa | ~shared_a[None, :], axis=1)
    extra = np.any(inactive_cxa & ~shared_a[None, :], axis=1)
    for i in np.flatnonzero(beyond & extra):
      other = _other_twin(
        pattern,
        u_cxb[i],
        inactive_cxa[i] & ~shared_a,
        coords_ax2,
        shared_a,
        screen_tol,
      )
      if other is not None:
        pairs.append(np.stack([u_cxb[i], other]))
  # A pair whose patterns explain each other is the answer (the nested
  # test alone also passes wrong directions there: 11 on a b = 8,
  # m = 200 layer with twins of one and two own zeros).
  found = np.concatenate(pairs)
  return distinct_directions(
    found if found.shape[0] else np.concatenate(nested), 1e-9
  )


class _TwinPattern(NamedTuple):
  """What :func:`nested_twin_columns` reads a twin's input from."""

  span_bx2: np.ndarray
  complement_bx2: np.ndarray
  pre_axb: np.ndarray
  bias_a: np.ndarray
  target_b: np.ndarray

  def inactive_of_other(self, u_cxb: np.ndarray) -> np.ndarray:
    """The alive rows where the twin paired with each ``u`` is inactive."""
    c_cx2 = u_cxb @ self.complement_bx2
    r_cxb = np.stack([-c_cx2[:, 1], c_cx2[:, 0]], axis=1)
    r_cxb = r_cxb @ self.complement_bx2.T
    r_cxb /= (r_cxb @ self.target_b)[:, None]
    return r_cxb @ self.pre_axb.T + self.bias_a[None, :] <= 0


def _other_twin(pattern, u_b, extra_a, coords_ax2, shared_a, tol):
  """The twin ``w`` vanishing on the rows ``extra_a``, if one does and the
  pattern read from ``w`` is inactive exactly on ``u``'s zero set."""
  p_ex2 = coords_ax2[extra_a]
  w_2 = p_ex2[np.argmax(np.linalg.norm(p_ex2, axis=1))]
  w_2 = np.array([-w_2[1], w_2[0]]) / np.linalg.norm(w_2)
  if np.max(np.abs(p_ex2 @ w_2)) > tol:
    return None  # the extra rows are not one direction's zeros
  w_b = pattern.span_bx2 @ w_2
  if abs(w_b @ u_b) > 1 - tol:
    return None
  zeros_u = shared_a | (np.abs(coords_ax2 @ (pattern.span_bx2.T @ u_b)) <= tol)
  back = pattern.inactive_of_other(w_b[None])[0]
  return w_b if np.array_equal(back, zeros_u) else None
