"""The driver's shape: strategies plug in, state is immutable, API grouped.

The custom strategies below propose directions computed independently of
the library (``Q = L^T D`` from the known ``D``), so a recovered batch is
checked against the numpy truth, not against the code under test.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl.testing import absltest
import helpers
import jax
import numpy as np

import spear_jax
from spear_jax import attack

_PACKAGE = pathlib.Path(spear_jax.__file__).parent


def _true_directions(problem, grad_z_mxb):
  """Unit columns of ``Q = L^T D`` (independent of the search)."""
  q_bxb = np.asarray(problem.l_mxb).T @ grad_z_mxb
  return (q_bxb / np.linalg.norm(q_bxb, axis=0, keepdims=True)).T


def _oracle(directions_bxb, per_step):
  """A strategy that hands out known directions, ``per_step`` at a time."""

  def init(key, problem):
    del key, problem
    return 0

  def step(state, problem, pool, selection):
    del pool, selection
    chunk = directions_bxb[state : state + per_step]
    stop = "exhausted" if not chunk.shape[0] else None
    return attack.StepOutput(
      chunk.reshape(-1, problem.b),
      state + per_step,
      proposals=7,
      blocks=1,
      stop_reason=stop,
    )

  return attack.Strategy("oracle", init, step)


class StrategyTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    seed = int(np.random.default_rng().integers(1 << 30))
    self.p = helpers.relu_layer_problem(seed, 120, 60, 6)
    self.problem = attack.prepare_problem(
      self.p["weight_grad"],
      self.p["bias_grad"],
      weight=self.p["weight"],
      bias=self.p["bias"],
    )
    self.truth = _true_directions(self.problem, self.p["grad_z"])

  def test_a_custom_strategy_plugs_into_invert(self):
    result = spear_jax.invert(
      self.p["weight_grad"],
      self.p["bias_grad"],
      key=jax.random.key(0),
      method=_oracle(self.truth, per_step=2),
      weight=self.p["weight"],
      bias=self.p["bias"],
    )
    self.assertTrue(result.success)
    self.assertEqual(result.stats.stop_reason, "certified")
    # Three steps of two directions; each step reports 7 proposals.
    self.assertEqual(result.stats.proposals, 21)
    self.assertEqual(result.stats.blocks, 3)
    match = helpers.match_rows(np.asarray(result.inputs), self.p["inputs"])
    np.testing.assert_allclose(  # float64: exact up to rounding
      result.inputs, self.p["inputs"][match], rtol=0, atol=1e-10
    )

  def test_a_strategy_that_runs_dry_stops_honestly(self):
    # Only b - 1 true directions: the batch cannot be completed.
    result = spear_jax.invert(
      self.p["weight_grad"],
      self.p["bias_grad"],
      key=jax.random.key(0),
      method=_oracle(self.truth[:-1], per_step=5),
      weight=self.p["weight"],
      bias=self.p["bias"],
    )
    self.assertFalse(result.success)
    self.assertEqual(result.stats.stop_reason, "exhausted")
    self.assertEqual(result.candidates.shape[0], self.problem.b - 1)
    self.assertLess(int(np.sum(result.verified)), self.problem.b)

  def test_absorb_and_select_return_new_values(self):
    config = attack.AttackConfig()
    pool = attack.empty_pool(self.problem.b, self.problem.dtype)
    first, num_new = attack.absorb(self.problem, pool, self.truth, config)
    self.assertEqual(num_new, self.problem.b)
    self.assertEqual(pool.directions.shape[0], 0)  # the input is untouched
    hits = first.hits.copy()
    second, num_new = attack.absorb(self.problem, first, self.truth, config)
    self.assertEqual(num_new, 0)
    np.testing.assert_array_equal(first.hits, hits)
    np.testing.assert_array_equal(second.hits, hits + 1)
    empty = attack.empty_selection(self.problem)
    selection, stop = attack.select(self.problem, second, empty, config)
    self.assertEqual(stop, "certified")
    self.assertIsNone(empty.result)
    self.assertLen(selection.chosen, self.problem.b)


class ApiTest(absltest.TestCase):
  def test_public_names_resolve(self):
    for module in (
      spear_jax,
      attack,
      spear_jax.fl,
      spear_jax.data,
      spear_jax.metrics,
    ):
      for name in module.__all__:
        self.assertTrue(hasattr(module, name), f"{module.__name__}.{name}")

  def test_import_is_light(self):
    # flax, scipy and dm_pix load only when fl/metrics are used.
    code = (
      "import sys, spear_jax; "
      "print(sorted(m for m in ('flax', 'scipy', 'dm_pix') "
      "if m in sys.modules))"
    )
    out = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    self.assertEqual(out.stdout.strip(), "[]")
    self.assertIs(spear_jax.MLP, spear_jax.fl.MLP)


class ReadmeTest(absltest.TestCase):
  def test_python_blocks_run(self):
    readme = (_PACKAGE.parent / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```python\n")[1:]]
    self.assertGreaterEqual(len(blocks), 2)
    work = tempfile.mkdtemp()
    code = "\n".join(blocks) + (
      "\nassert result.success and bool(result.verified.all())"
    )
    out = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
      cwd=work,  # the export snippet writes mlp_gradients.npz here
    )
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    self.assertIn("True True", out.stdout)
    # The exported whole-MLP npz goes through invert.py --labels.
    script = _PACKAGE.parent / "scripts" / "invert.py"
    out = subprocess.run(
      [sys.executable, str(script), "--gradients=mlp_gradients.npz"]
      + ["--output=out.npz", "--labels"],
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
      cwd=work,
    )
    self.assertEqual(out.returncode, 0, out.stderr[-2000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    self.assertEqual(summary["labels_verified"], 8)
    with np.load(os.path.join(work, "out.npz")) as result:
      self.assertEqual(
        sorted(result["labels"].tolist()), [0, 1, 1, 3, 3, 3, 7, 9]
      )


class FunctionLengthTest(absltest.TestCase):
  def test_no_function_reaches_80_lines(self):
    long = []
    for path in sorted(_PACKAGE.rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          size = node.end_lineno - node.lineno + 1
          if ast.get_docstring(node):
            doc = node.body[0]
            size -= doc.end_lineno - doc.lineno + 1
          if size >= 80:
            long.append(f"{path.name}:{node.name} ({size})")
    self.assertEqual(long, [])


if __name__ == "__main__":
  absltest.main()
