"""The next layer's weight gradient spans the hidden outputs (FedSGD).

Every gradient here is written out by hand in numpy
(:func:`helpers.mlp_problem`), independently of JAX and the library.
"""

import time

from absl.testing import absltest
import helpers
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import numpy as np

import spear_jax
from spear_jax import LearnerConfig
from spear_jax import _attack
from spear_jax import _hidden
from spear_jax import attack
from spear_jax._hidden import hidden_partial_result
from spear_jax._hidden import lift_directions
from spear_jax._hidden import peel_found
from spear_jax._spearpp import fill_missing_columns
from spear_jax._timing import PhaseClock

jax.config.update("jax_enable_x64", True)


def _two_hidden_layers(seed, b, sizes=(40, 200, 60, 4)):
  """An MLP ``n -> m -> c -> classes``; its first layer's problem with the
  second layer's weight gradient (``c x m``), and the hand-written net."""
  rng = np.random.default_rng(seed)
  net = helpers.mlp_problem(seed, sizes, rng.integers(0, sizes[-1], b))
  return net, _first_layer(net)


def _first_layer(net):
  """The first layer's problem of a hand-written net, with the second
  layer's weight gradient."""
  return attack.prepare_problem(
    net["weight_grad_0"],
    net["bias_grad_0"],
    weight=net["weight_0"],
    bias=net["bias_0"],
    next_weight_grad=net["weight_grad_1"],
  )


def _relative_errors(x_kxn, truth_kxn):
  return np.linalg.norm(x_kxn - truth_kxn, axis=1) / np.linalg.norm(
    truth_kxn, axis=1
  )


class HiddenSpanRowsTest(absltest.TestCase):
  def test_each_true_column_alone_gives_its_input(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    net, problem = _two_hidden_layers(seed, b=12)
    self.assertIsNotNone(problem.hidden_span, seed)
    # The hand-written D of the first layer: D 1 is its bias gradient.
    np.testing.assert_allclose(
      net["grad_z_0"].sum(axis=1), net["bias_grad_0"], rtol=0, atol=1e-15
    )
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    # Any scale and sign: the row is the sample's, not the column's.
    scales = np.random.default_rng(seed).uniform(-3.0, 3.0, 12)
    fit = attack.hidden_span_rows(problem, (q_bxb * scales).T)
    x_bxn = fit.rows @ np.asarray(problem.r_bxn)
    # float64, 200 x 40 layer: true columns fit to rounding.
    self.assertLess(_relative_errors(x_bxn, net["inputs"]).max(), 1e-10, seed)
    self.assertLess(fit.residual.max(), 1e-10, seed)
    self.assertTrue(fit.exact(problem.tol).all(), seed)

  def test_a_mixture_of_two_samples_does_not_fit(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    net, problem = _two_hidden_layers(seed, b=12)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    pattern = net["grad_z_0"] != 0
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    pairs = [p for p in pairs if np.any(pattern[:, p[0]] != pattern[:, p[1]])]
    mixtures = np.array([q_bxb[:, i] + 0.7 * q_bxb[:, j] for i, j in pairs])
    fit = attack.hidden_span_rows(problem, mixtures)
    # Measured on such nets: residuals of order 0.1-1, true columns 1e-14.
    self.assertGreater(fit.residual.min(), 1e-4, seed)
    self.assertFalse(fit.exact(problem.tol).any(), seed)

  def test_twins_with_one_pattern_are_not_fixed(self):
    # Twins 1e-7 apart are sometimes numerically dependent in the gradient
    # (rank 9: seeds 28 and 425192417 of 41 tried); the span then sees one
    # sample, which is another test's case. Redraw until the rank is 10.
    problem = None
    while problem is None or problem.b != 10:
      seed = int(np.random.default_rng().integers(1 << 31))
      rng = np.random.default_rng(seed)
      inputs = rng.standard_normal((10, 40))
      inputs[1] = inputs[0] + 1e-7 * rng.standard_normal(40)
      net = helpers.mlp_problem(
        seed, (40, 200, 60, 4), rng.integers(0, 4, 10), inputs=inputs
      )
      problem = _first_layer(net)
    pattern = net["grad_z_0"] != 0
    self.assertTrue(np.all(pattern[:, 0] == pattern[:, 1]), seed)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    fit = attack.hidden_span_rows(problem, q_bxb.T)
    # Any input between the twins fits their shared pattern: the fit is
    # singular for both, regular for the others.
    np.testing.assert_array_equal(
      fit.exact(problem.tol), np.arange(10) >= 2, err_msg=str(seed)
    )

  def test_partial_result_is_exact_for_the_found_samples(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    b, k = 16, 11
    net, problem = _two_hidden_layers(seed, b=b)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    found = np.random.default_rng(seed).permutation(b)[:k]
    basis = fill_missing_columns(problem, q_bxb[:, found].T, LearnerConfig())
    result = attack.reconstruct(problem, basis)
    x_kxn = np.asarray(result.inputs)[:k]
    # The fillers span the missing columns exactly, so the found samples'
    # rows of Q^{-1} and their scales (bias gradient) are exact.
    errors = _relative_errors(x_kxn, net["inputs"][found])
    self.assertLess(errors.max(), 1e-9, seed)

  def test_a_mixture_among_the_found_columns_gets_an_estimated_row(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    b = 16
    net, problem = _two_hidden_layers(seed, b=b)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    mixture = q_bxb[:, 0] + q_bxb[:, 1]
    found = np.concatenate([q_bxb[:, 2:12].T, mixture[None] / 2**0.5])
    basis = fill_missing_columns(problem, found, LearnerConfig())
    # A basis of Q: the ten true columns, the mixture and five fillers.
    self.assertEqual(basis.shape, (b, b))
    self.assertGreater(np.linalg.svd(basis, compute_uv=False)[-1], 1e-8)
    np.testing.assert_allclose(basis[:, :11], found.T, atol=1e-15)
    # Each fitted sample gets its own input and flag; the mixture and the
    # fillers none.
    result = hidden_partial_result(
      problem, attack.reconstruct(problem, basis), found
    )
    np.testing.assert_array_equal(
      np.asarray(result.verified), np.arange(b) < 10, err_msg=str(seed)
    )
    errors = _relative_errors(
      np.asarray(result.inputs)[:10], net["inputs"][2:12]
    )
    self.assertLess(errors.max(), 1e-10, seed)
    np.testing.assert_allclose(
      np.asarray(result.grad_z)[:, :10],
      net["grad_z_0"][:, 2:12],
      rtol=0,
      atol=1e-10 * np.abs(net["grad_z_0"]).max(),
    )


class HiddenSpanInputsTest(absltest.TestCase):
  def test_too_few_next_outputs_are_ignored(self):
    # c = 8 < b = 12: the rows span only part of the hidden outputs.
    _, problem = _two_hidden_layers(3, b=12, sizes=(40, 200, 8, 4))
    self.assertIsNone(problem.hidden_span)

  def test_a_wrong_shape_is_one_clear_error(self):
    net, _ = _two_hidden_layers(4, b=6)
    with self.assertRaisesRegex(
      ValueError, r"next_weight_grad must have shape \(c, 200\)"
    ):
      attack.prepare_problem(
        net["weight_grad_0"],
        net["bias_grad_0"],
        next_weight_grad=net["weight_grad_1"].T,
      )
    bad = net["weight_grad_1"].copy()
    bad[0, 0] = np.nan
    with self.assertRaisesRegex(ValueError, "next_weight_grad"):
      attack.prepare_problem(
        net["weight_grad_0"], net["bias_grad_0"], next_weight_grad=bad
      )

  def test_spearpp_with_the_hidden_span_is_exact(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    net, _ = _two_hidden_layers(seed, b=20, sizes=(50, 300, 60, 4))
    result = spear_jax.invert(
      net["weight_grad_0"],
      net["bias_grad_0"],
      key=jax.random.key(seed),
      method="spearpp",
      weight=net["weight_0"],
      bias=net["bias_0"],
      next_weight_grad=net["weight_grad_1"],
    )
    self.assertTrue(result.success, seed)
    order = helpers.match_rows(np.asarray(result.inputs), net["inputs"])
    errors = _relative_errors(np.asarray(result.inputs), net["inputs"][order])
    self.assertLess(errors.max(), 1e-9, seed)


if __name__ == "__main__":
  absltest.main()


class PeelTest(absltest.TestCase):
  def test_the_rest_of_the_batch_is_its_own_gradient(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    b, k = 14, 9
    net, problem = _two_hidden_layers(seed, b=b)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    found = np.random.default_rng(seed).permutation(b)
    peel = peel_found(problem, q_bxb[:, found[:k]].T, spear_jax.AttackConfig())
    self.assertIsNotNone(peel, seed)
    self.assertEqual(peel.problem.b, b - k)
    # The hand-written gradient of the other samples alone.
    rest = found[k:]
    d_rest, x_rest = net["grad_z_0"][:, rest], net["inputs"][rest]
    weight_grad = np.asarray(peel.problem.l_mxb) @ np.asarray(
      peel.problem.r_bxn
    )
    scale = np.abs(net["weight_grad_0"]).max()
    # float64: the subtraction cancels the found part to rounding.
    np.testing.assert_allclose(
      weight_grad, d_rest @ x_rest, rtol=0, atol=1e-12 * scale
    )
    np.testing.assert_allclose(
      np.asarray(peel.problem.bias_grad),
      d_rest.sum(axis=1),
      rtol=0,
      atol=1e-12 * np.abs(net["bias_grad_0"]).max(),
    )
    # Taken-out columns are the true ones; the rest's columns lift to theirs.
    np.testing.assert_allclose(
      np.abs(np.sum(peel.columns * q_bxb[:, found[:k]].T, axis=1)), 1.0, 1e-10
    )
    sub_q = helpers.true_columns(peel.problem.l_mxb, d_rest)
    lifted = lift_directions(problem, peel.problem, sub_q.T)
    np.testing.assert_allclose(
      np.abs(np.sum(lifted * q_bxb[:, rest].T, axis=1)), 1.0, 1e-10
    )

  def test_a_peeled_search_merges_into_a_certified_batch(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    b, k = 20, 14
    net, problem = _two_hidden_layers(seed, b=b, sizes=(50, 300, 60, 4))
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    found = np.random.default_rng(seed).permutation(b)[:k]
    config = spear_jax.AttackConfig()
    peel = peel_found(problem, q_bxb[:, found].T, config)
    state = _attack.SearchState(
      attack.empty_pool(b, problem.dtype),
      attack.empty_selection(problem),
      peel=peel,
    )
    strategy = attack.make_strategy("spearpp", config)
    clock, start = PhaseClock(), time.perf_counter()
    state = _attack._peeled_search(  # pylint: disable=protected-access
      jax.random.key(seed), problem, strategy, config, state, None, start, clock
    )
    result = _attack._finalize(problem, state, start, config)  # pylint: disable=protected-access
    self.assertTrue(result.success, seed)
    inputs = np.asarray(result.inputs)
    order = helpers.match_rows(inputs, net["inputs"])
    self.assertLess(
      _relative_errors(inputs, net["inputs"][order]).max(), 1e-9, seed
    )


class RefitTest(absltest.TestCase):
  def test_nearly_dependent_inputs_come_out_exact_from_the_span(self):
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((12, 40))
    inputs[2] = inputs[0] + inputs[1] + 1e-7 * rng.standard_normal(40)
    net = helpers.mlp_problem(
      seed, (40, 200, 60, 4), rng.integers(0, 4, 12), inputs=inputs
    )
    errors = []
    for span in (None, net["weight_grad_1"]):
      result = spear_jax.invert(
        net["weight_grad_0"],
        net["bias_grad_0"],
        key=jax.random.key(seed),
        method="spearpp",
        weight=net["weight_0"],
        bias=net["bias_0"],
        next_weight_grad=span,
      )
      self.assertTrue(result.success, seed)
      x = np.asarray(result.inputs)
      errors.append(
        _relative_errors(x, inputs[helpers.match_rows(x, inputs)]).max()
      )
    # X^T = Q^-1 R carries R's conditioning (s_1 / s_b ~ 1e7): measured
    # 2.5e-10 to 3.5e-10 over four seeds; the span's fit 2e-15 to 6e-15.
    self.assertGreater(errors[0], 1e-12, seed)
    self.assertLess(errors[1], 1e-12, seed)


def _nested_pair_net(seed, b=12, sizes=(40, 200, 60, 4)):
  """Inputs where sample 1 is sample 0 moved just across one neuron's
  hyperplane: their patterns differ in exactly that row (nested zero
  sets); ``None`` when a second neuron flips too."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, sizes[-1], b)
  net = helpers.mlp_problem(seed, sizes, labels)
  w, beta = net["weight_0"], net["bias_0"]
  inputs = net["inputs"].copy()
  z0 = w @ inputs[0] + beta
  j = int(np.argmin(np.abs(z0)))
  inputs[1] = inputs[0] - 1.01 * z0[j] * w[j] / (w[j] @ w[j])
  net = helpers.mlp_problem(seed, sizes, labels, inputs=inputs)
  pattern = net["grad_z_0"] != 0
  if np.sum(pattern[:, 0] != pattern[:, 1]) != 1:
    return None
  return net


class NestedPairTest(absltest.TestCase):
  def _net(self):
    for _ in range(20):
      seed = int(np.random.default_rng().integers(1 << 31))
      net = _nested_pair_net(seed)
      if net is not None:
        return seed, net
    self.fail("no nested pair in 20 draws")

  def test_two_mixtures_of_a_nested_pair_split(self):
    seed, net = self._net()
    problem = _first_layer(net)
    q_bxb = helpers.true_columns(problem.l_mxb, net["grad_z_0"])
    # Every mixture of the pair has the larger pattern.
    mixtures = np.stack(
      [q_bxb[:, 0] + 0.8 * q_bxb[:, 1], q_bxb[:, 0] - 1.7 * q_bxb[:, 1]]
    )
    mixtures /= np.linalg.norm(mixtures, axis=1, keepdims=True)
    columns = np.concatenate([mixtures, q_bxb[:, 2:].T])
    split = _hidden._split_shared_patterns(problem, columns)  # pylint: disable=protected-access
    cosines = np.abs(split @ q_bxb)
    # The nested sample's column is one of the two; the other stays.
    nested = (
      0
      if np.sum(net["grad_z_0"][:, 0] == 0) > np.sum(net["grad_z_0"][:, 1] == 0)
      else 1
    )
    self.assertGreater(cosines[1, nested], 1 - 1e-10, seed)
    np.testing.assert_allclose(split[0], mixtures[0], atol=1e-15)


class NoWrongFlagTest(absltest.TestCase):
  # Alike inputs, exact and jittered twins, short budgets (partial
  # results): with the span's flags, no wrong sample is ever verified.
  @settings(max_examples=6, deadline=None, derandomize=True)
  @given(
    b=st.integers(3, 12),
    width=st.sampled_from([80, 150]),
    twins=st.integers(0, 3),
    jitter=st.sampled_from([0.0, 1e-4, 1e-2]),
    budget=st.sampled_from([0.5, 5.0]),
    seed=st.integers(0, 2**16),
  )
  def test_no_wrong_sample_is_verified(
    self, b, width, twins, jitter, budget, seed
  ):
    rng = np.random.default_rng(seed)
    x = helpers.alike_inputs(rng, b, 24, twins, jitter)
    net = helpers.mlp_problem(
      seed, (24, width, 30, 3), rng.integers(0, 3, b), inputs=x
    )
    result = spear_jax.invert(
      net["weight_grad_0"],
      net["bias_grad_0"],
      key=jax.random.key(seed),
      method="spearpp",
      weight=net["weight_0"],
      bias=net["bias_0"],
      next_weight_grad=net["weight_grad_1"],
      config=spear_jax.AttackConfig(time_budget_s=budget),
    )
    inputs = np.asarray(result.inputs)
    verified = np.asarray(result.verified)
    if not verified.any():
      return
    # The nearest true input of each verified sample (duplicates allowed).
    distance = np.linalg.norm(inputs[verified][:, None] - x[None], axis=2)
    relative = distance.min(axis=1) / np.linalg.norm(x, axis=1).max()
    self.assertLess(relative.max(), 1e-8, (b, width, twins, jitter, seed))
