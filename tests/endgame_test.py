"""SPEAR's endgame: the sampler hands a rare column to the l1 search."""

from absl.testing import absltest
import helpers
import jax
import numpy as np

import spear_jax
from spear_jax import _endgame
from spear_jax import attack


class ExpectedWaitTest(absltest.TestCase):
  def test_before_the_first_column_it_is_the_half_zeros_model(self):
    # Every column hit with p = 2^-(b-1): the first of b arrives after
    # 1 / (b p) proposals.
    self.assertAlmostEqual(_endgame.expected_wait(4, 0, 0), 8 / 4, places=12)
    self.assertAlmostEqual(
      _endgame.expected_wait(20, 0, 0), 2**19 / 20, places=6
    )

  def test_a_full_selection_waits_for_one_replacement(self):
    p = sum(1 / k for k in range(1, 5)) / 900  # H_4 / 900
    self.assertAlmostEqual(_endgame.expected_wait(4, 4, 900), 1 / p, places=9)

  def test_after_some_columns_the_rate_comes_from_the_run(self):
    # b = 4, two columns in 700 proposals: 700 = (1/4 + 1/3) / p, so
    # p = 7 / 8400 and the next of the 2 remaining takes 1 / (2 p).
    p = (1 / 4 + 1 / 3) / 700
    self.assertAlmostEqual(
      _endgame.expected_wait(4, 2, 700), 1 / (2 * p), places=9
    )


def _fake(name, log, stop_after=None):
  """A strategy that proposes nothing and logs its calls."""

  def init(key, problem):
    del key, problem
    log.append(f"{name}.init")
    return 0

  def step(state, problem, pool, selection):
    del pool, selection
    log.append(name)
    stop = "stalled" if stop_after is not None and state >= stop_after else None
    return attack.StepOutput(
      np.zeros((0, problem.b)), state + 1, proposals=100, stop_reason=stop
    )

  return attack.Strategy(name, init, step)


def _problem_b4():
  p = helpers.relu_layer_problem(0, 40, 10, 4)
  return attack.prepare_problem(p["weight_grad"], p["bias_grad"])


def _run(strategy, found_per_step):
  """Steps ``strategy`` with ``found_per_step[k]`` columns selected."""
  problem = _problem_b4()
  pool = attack.empty_pool(problem.b, problem.dtype)
  selection = attack.empty_selection(problem)
  state = strategy.init(jax.random.key(0), problem)
  stops = []
  for found in found_per_step:
    chosen = np.arange(found)
    out = strategy.step(state, problem, pool, selection._replace(chosen=chosen))
    stops.append(out.stop_reason)
    state = out.state
  return stops


class SwitchTest(absltest.TestCase):
  def test_starved_sampler_hands_over_and_takes_back(self):
    log = []
    strategy = _endgame.with_endgame(
      _fake("sampler", log), _fake("learner", log, stop_after=1), 1.0
    )
    # b = 4 and nothing found: the model expects 8 / 4 = 2 proposals, so
    # after one block of 100 the streak (100) exceeds 1.0 x 2.
    stops = _run(strategy, [0, 0, 0, 0, 0])
    self.assertEqual(stops, [None] * 5)  # the learner's stop is not the run's
    self.assertEqual(
      log,
      [
        "sampler.init",
        "sampler",
        "learner.init",
        "learner",
        "learner",  # reports "stalled": sampling resumes for good
        "sampler",
        "sampler",
      ],
    )

  def test_new_columns_reset_the_streak(self):
    log = []
    strategy = _endgame.with_endgame(
      _fake("sampler", log), _fake("learner", log), 1.0
    )
    # A new column before every block: the streak is reset before it is
    # compared, so the sampler keeps the run.
    _run(strategy, range(4))
    self.assertEqual(log, ["sampler.init"] + ["sampler"] * 4)


class FallbackTest(absltest.TestCase):
  def test_a_stalled_search_samples_its_allowance_then_stops(self):
    log = []
    strategy = _endgame.with_sampling_fallback(
      _fake("learner", log, stop_after=1), _fake("sampler", log), 150.0, 10**6
    )
    # b = 4, nothing found: allowance 150 x 2^3 / 4 = 300 proposals, three
    # sampler steps of 100; then the learner's reason is the run's.
    stops = _run(strategy, [0] * 6)
    self.assertEqual(stops, [None] * 5 + ["stalled"])
    self.assertEqual(
      log,
      ["learner.init", "learner", "learner", "sampler.init"] + ["sampler"] * 3,
    )

  def test_an_allowance_over_the_cap_stops_at_once(self):
    log = []
    strategy = _endgame.with_sampling_fallback(
      _fake("learner", log, stop_after=0), _fake("sampler", log), 150.0, 299
    )
    self.assertEqual(_run(strategy, [0]), ["stalled"])
    self.assertEqual(log, ["learner.init", "learner"])


class RareColumnTest(absltest.TestCase):
  def test_a_column_with_few_zeros_is_found_by_the_search(self):
    # D with exact zeros on random rows: eight columns with 100 of 200, two
    # with 60 (above the selection's threshold, 0.46 x 100), which a 9-row
    # sample hits with probability C(60, 9) / C(200, 9) = 1.3e-5 each, 129
    # times less often than a typical column. A tiny patience starts the
    # endgame after two or three blocks of 1024 proposals; with two
    # columns missing, the last-column completion from the bias gradient
    # cannot stand in (150 of 150 seeds took the endgame and were exact;
    # with 50 zeros the search itself missed a column on 2 of 150).
    # Compared with the true inputs.
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    m, n, b = 200, 40, 10
    zeros = np.full(b, 100)
    zeros[:2] = 60
    mask = np.ones((m, b))
    for j in range(b):
      mask[rng.permutation(m)[: zeros[j]], j] = 0.0
    d_mxb = mask * rng.standard_normal((m, b))
    x_nxb = rng.standard_normal((n, b))
    config = spear_jax.AttackConfig(
      block_size=1024, chunk_size=64, endgame_patience=1e-3, time_budget_s=60.0
    )
    result = spear_jax.invert(
      d_mxb @ x_nxb.T,
      d_mxb.sum(axis=1),
      key=jax.random.key(int(rng.integers(2**31))),
      method="spear",
      config=config,
    )
    phases = {t.phase for t in result.stats.timings}
    self.assertIn("search", phases)  # the learner took over
    self.assertTrue(result.success, result.stats.stop_reason)
    inputs = np.asarray(result.inputs)
    order = helpers.match_rows(inputs, x_nxb.T)
    self.assertEqual(sorted(order), list(range(b)))
    # Exact: float64, 1e-9 relative to each input's norm.
    truth = x_nxb.T[order]
    error = np.linalg.norm(inputs - truth, axis=1)
    self.assertLess(np.max(error / np.linalg.norm(truth, axis=1)), 1e-9)


if __name__ == "__main__":
  absltest.main()
