"""The ``scripts/invert.py`` command line: exit codes, outputs, messages."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import helpers
import numpy as np

_SCRIPT = os.path.join(
  os.path.dirname(__file__), os.pardir, "scripts", "invert.py"
)


def _run(*args):
  proc = subprocess.run(
    [sys.executable, _SCRIPT, *args],
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  return proc.returncode, proc.stdout, proc.stderr


def _first_layer_keys(net):
  """The npz keys of a hand-written net's first layer."""
  return {
    "weight_grad": net["weight_grad_0"],
    "bias_grad": net["bias_grad_0"],
    "weight": net["weight_0"],
    "bias": net["bias_0"],
  }


class InvertCliTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.problem = helpers.relu_layer_problem(17, 60, 40, 5)

  def _npz(self, name="in.npz", **arrays):
    path = os.path.join(self.dir, name)
    np.savez(path, **arrays)
    return path

  def test_success_with_certificate(self):
    p = self.problem
    path = self._npz(
      weight_grad=p["weight_grad"],
      bias_grad=p["bias_grad"],
      weight=p["weight"],
      bias=p["bias"],
    )
    out = os.path.join(self.dir, "out.npz")
    code, stdout, stderr = _run(
      f"--gradients={path}", f"--output={out}", "--seed=3", "--block_size=1024"
    )
    self.assertEqual(code, 0, stderr)
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertTrue(summary["success"])
    self.assertEqual(summary["verified"], 5)
    with np.load(out) as result:
      self.assertEqual(result["inputs"].shape, (5, 40))
      self.assertTrue(result["verified"].all())
      order = helpers.match_rows(result["inputs"], p["inputs"])
      np.testing.assert_allclose(
        result["inputs"], p["inputs"][order], atol=1e-10
      )

  @parameterized.named_parameters(("estimated", False), ("given", True))
  def test_noisy_gradient_exits_1_with_the_reconstruction(self, given):
    p = helpers.relu_layer_problem(23, 200, 150, 4)
    rng = np.random.default_rng(5)
    noise = 1e-4
    arrays = {
      "weight_grad": p["weight_grad"] + noise * rng.standard_normal((200, 150)),
      "bias_grad": p["bias_grad"] + noise * rng.standard_normal(200),
      "weight": p["weight"],
      "bias": p["bias"],
    }
    if given:
      arrays["noise_std"] = np.asarray(noise)
    path = self._npz("noisy.npz", **arrays)
    out = os.path.join(self.dir, "noisy_out.npz")
    code, stdout, stderr = _run(f"--gradients={path}", f"--output={out}")
    self.assertEqual(code, 1, stderr)
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertEqual(summary["check"], "noise")
    self.assertEqual(summary["verified"], 0)
    # Estimated from 200 x 150 - 4 residual entries: within 5%.
    self.assertAlmostEqual(summary["noise_std"], noise, delta=0.05 * noise)
    with np.load(out) as result:
      self.assertEqual(result["inputs"].shape, (4, 150))
      order = helpers.match_rows(result["inputs"], p["inputs"])
      error = np.abs(result["inputs"] - p["inputs"][order]).max()
      self.assertLess(error, 1e-2)  # noise 1e-4 against inputs of O(1)

  def test_bad_noise_std_exits_2(self):
    p = self.problem
    path = self._npz(
      weight_grad=p["weight_grad"], bias_grad=p["bias_grad"], noise_std=[1, 2]
    )
    code, _, stderr = _run(f"--gradients={path}", "--output=/tmp/x.npz")
    self.assertEqual(code, 2)
    self.assertIn("noise_std must be a scalar", stderr)

  def test_next_weight_key(self):
    # The hidden layer of an MLP 30 -> 120 -> 4 feeds the head directly.
    net = helpers.mlp_problem(0, (30, 120, 4), np.arange(6) % 4)
    layer = _first_layer_keys(net)
    out = os.path.join(self.dir, "next_out.npz")
    path = self._npz("next.npz", next_weight=net["weight_1"], **layer)
    code, stdout, stderr = _run(f"--gradients={path}", f"--output={out}")
    self.assertEqual(code, 0, stderr)
    self.assertEqual(json.loads(stdout.strip().splitlines()[-1])["verified"], 6)
    with np.load(out) as result:
      order = helpers.match_rows(result["inputs"], net["inputs"])
      np.testing.assert_allclose(
        result["inputs"], net["inputs"][order], atol=1e-10
      )
    bad = self._npz("next_bad.npz", next_weight=net["weight_1"].T, **layer)
    code, _, stderr = _run(f"--gradients={bad}", f"--output={out}")
    self.assertEqual(code, 2)
    self.assertIn("next_weight must have shape (c, 120)", stderr)

  def test_next_weight_grad_key(self):
    # MLP 30 -> 120 -> 40 -> 4: the second layer's gradient spans the
    # first layer's 6 hidden outputs.
    net = helpers.mlp_problem(1, (30, 120, 40, 4), np.arange(6) % 4)
    layer = _first_layer_keys(net)
    out = os.path.join(self.dir, "span_out.npz")
    path = self._npz("span.npz", next_weight_grad=net["weight_grad_1"], **layer)
    code, stdout, stderr = _run(
      f"--gradients={path}", f"--output={out}", "--method=spearpp"
    )
    self.assertEqual(code, 0, stderr)
    self.assertEqual(json.loads(stdout.strip().splitlines()[-1])["verified"], 6)
    with np.load(out) as result:
      order = helpers.match_rows(result["inputs"], net["inputs"])
      np.testing.assert_allclose(
        result["inputs"], net["inputs"][order], atol=1e-10
      )
    bad = self._npz(
      "span_bad.npz", next_weight_grad=net["weight_grad_1"][:, :-1], **layer
    )
    code, _, stderr = _run(f"--gradients={bad}", f"--output={out}")
    self.assertEqual(code, 2)
    self.assertIn("next_weight_grad must have shape (c, 120)", stderr)

  def test_spearpp_method(self):
    p = helpers.relu_layer_problem(21, 300, 120, 20)
    path = self._npz(
      weight_grad=p["weight_grad"],
      bias_grad=p["bias_grad"],
      weight=p["weight"],
      bias=p["bias"],
    )
    out = os.path.join(self.dir, "outpp.npz")
    code, stdout, stderr = _run(
      f"--gradients={path}", f"--output={out}", "--method=spearpp"
    )
    self.assertEqual(code, 0, stderr)
    self.assertEqual(
      json.loads(stdout.strip().splitlines()[-1])["verified"], 20
    )
    with np.load(out) as result:
      order = helpers.match_rows(result["inputs"], p["inputs"])
      np.testing.assert_allclose(
        result["inputs"], p["inputs"][order], atol=1e-10
      )

  def test_compilation_cache(self):
    p = self.problem
    path = self._npz(weight_grad=p["weight_grad"], bias_grad=p["bias_grad"])
    cache = os.path.join(self.dir, "cache")
    outputs = []
    for run in range(2):
      out = os.path.join(self.dir, f"cached{run}.npz")
      code, _, stderr = _run(
        f"--gradients={path}",
        f"--output={out}",
        "--block_size=1024",
        f"--compilation_cache_dir={cache}",
      )
      self.assertEqual(code, 0, stderr)
      if not run:
        self.assertNotEmpty(os.listdir(cache))  # programs were written
      with np.load(out) as result:
        outputs.append(result["inputs"])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    # An empty value turns the cache off.
    off = os.path.join(self.dir, "off")
    code, _, stderr = _run(
      f"--gradients={path}",
      f"--output={self.dir}/o.npz",
      "--block_size=1024",
      "--compilation_cache_dir=",
    )
    self.assertEqual(code, 0, stderr)
    self.assertFalse(os.path.exists(off))

  def test_float32_without_certificate(self):
    p = self.problem
    path = self._npz(weight_grad=p["weight_grad"], bias_grad=p["bias_grad"])
    out = os.path.join(self.dir, "out32.npz")
    code, _, stderr = _run(
      f"--gradients={path}",
      f"--output={out}",
      "--dtype=float32",
      "--block_size=1024",
    )
    self.assertEqual(code, 0, stderr)
    with np.load(out) as result:
      self.assertEqual(result["inputs"].dtype, np.float32)
      self.assertFalse(result["verified"].any())
      order = helpers.match_rows(result["inputs"], p["inputs"])
      np.testing.assert_allclose(
        result["inputs"], p["inputs"][order], atol=1e-3
      )

  def test_budget_exhausted_exits_1_and_writes_partial(self):
    p = helpers.relu_layer_problem(18, 200, 100, 14)
    path = self._npz(
      weight_grad=p["weight_grad"],
      bias_grad=p["bias_grad"],
      weight=p["weight"],
      bias=p["bias"],
    )
    out = os.path.join(self.dir, "partial.npz")
    code, stdout, _ = _run(
      f"--gradients={path}",
      f"--output={out}",
      "--max_proposals=64",
      "--block_size=64",
    )
    self.assertEqual(code, 1)
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertFalse(summary["success"])
    self.assertEqual(summary["stop_reason"], "max_proposals")
    with np.load(out) as result:
      self.assertEqual(result["inputs"].shape, (14, 100))
      self.assertFalse(result["verified"].all())

  def test_checkpoint_resumes_and_guards_the_gradient(self):
    p = helpers.relu_layer_problem(19, 160, 90, 10)
    path = self._npz(
      weight_grad=p["weight_grad"],
      bias_grad=p["bias_grad"],
      weight=p["weight"],
      bias=p["bias"],
    )
    ckpt = os.path.join(self.dir, "ckpt.npz")
    out = os.path.join(self.dir, "out.npz")
    code, _, _ = _run(
      f"--gradients={path}",
      f"--output={out}",
      f"--checkpoint={ckpt}",
      "--max_proposals=512",
      "--block_size=256",
    )
    self.assertEqual(code, 1)
    with np.load(ckpt) as saved:
      self.assertEqual(int(saved["proposals"]), 512)
      found = saved["candidates"].shape[0]
    self.assertGreater(found, 0)
    code, stdout, stderr = _run(
      f"--gradients={path}",
      f"--output={out}",
      f"--checkpoint={ckpt}",
      "--block_size=1024",
    )
    self.assertEqual(code, 0, stderr)
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertEqual(summary["resumed_proposals"], 512)
    other = helpers.relu_layer_problem(20, 160, 90, 10)
    other_path = self._npz(
      "other.npz",
      weight_grad=other["weight_grad"],
      bias_grad=other["bias_grad"],
    )
    code, _, stderr = _run(
      f"--gradients={other_path}", f"--output={out}2", f"--checkpoint={ckpt}"
    )
    self.assertEqual(code, 2)
    self.assertIn("different gradient", stderr)

  @parameterized.named_parameters(
    ("missing_key", "missing bias_grad"),
    ("wrong_ndim", "must be 2-D"),
    ("nan", "NaN"),
    ("all_zero", "all zeros"),
    ("full_rank", "no low-rank structure"),
    ("bias_shape", "bias_grad must have shape"),
    ("not_npz", "not an .npz"),
    ("no_file", "no such file"),
    ("rank_contradiction", "contradicts"),
  )
  def test_invalid_input_exits_2(self, message):
    p = self.problem
    case = self._testMethodName.split("_exits_2_")[-1]
    grads = {"weight_grad": p["weight_grad"], "bias_grad": p["bias_grad"]}
    extra = []
    if case == "missing_key":
      path = self._npz(weight_grad=p["weight_grad"])
    elif case == "wrong_ndim":
      path = self._npz(
        weight_grad=p["weight_grad"][None], bias_grad=p["bias_grad"]
      )
    elif case == "nan":
      bad = p["weight_grad"].copy()
      bad[0, 0] = np.nan
      path = self._npz(weight_grad=bad, bias_grad=p["bias_grad"])
    elif case == "all_zero":
      path = self._npz(
        weight_grad=0 * p["weight_grad"], bias_grad=p["bias_grad"]
      )
    elif case == "full_rank":
      path = self._npz(
        weight_grad=np.random.default_rng(0).standard_normal((60, 40)),
        bias_grad=p["bias_grad"],
      )
    elif case == "bias_shape":
      path = self._npz(weight_grad=p["weight_grad"], bias_grad=np.ones(3))
    elif case == "not_npz":
      path = os.path.join(self.dir, "notes.txt")
      with open(path, "w") as f:
        f.write("not an archive")
    elif case == "no_file":
      path = os.path.join(self.dir, "absent.npz")
    else:
      path = self._npz(**grads)
      extra = ["--batch_size=3"]
    out = os.path.join(self.dir, "never.npz")
    code, stdout, stderr = _run(
      f"--gradients={path}", f"--output={out}", *extra
    )
    self.assertEqual(code, 2, stderr)
    self.assertIn(message, stderr)
    self.assertNotIn("Traceback", stderr)
    self.assertEqual(stdout, "")
    self.assertFalse(os.path.exists(out))

  def _mlp(self, sizes=(40, 60, 30, 4), labels=(1, 1, 0, 3, 1)):
    rng = np.random.default_rng()
    while True:
      seed = int(rng.integers(1 << 30))
      p = helpers.mlp_problem(seed, sizes, np.asarray(labels))
      keys = [k for k in p if k.rsplit("_", 1)[-1].isdigit()]
      # A narrow layer can be dead for the whole batch, and then so is
      # every gradient below it: an all-zero input, refused with exit 2
      # (tested elsewhere). Draw a network that is alive everywhere.
      if all(np.any(p[k]) for k in keys if k.startswith("weight_grad")):
        return p, {k: p[k] for k in keys}

  def test_labels_of_a_whole_mlp(self):
    p, arrays = self._mlp()
    path = self._npz(**arrays)
    out = os.path.join(self.dir, "out.npz")
    code, stdout, stderr = _run(
      f"--gradients={path}", f"--output={out}", "--labels", "--block_size=1024"
    )
    self.assertEqual(code, 0, stderr)
    summary = json.loads(stdout.strip().splitlines()[-1])
    self.assertEqual(summary["labels_verified"], 5)
    self.assertEqual(summary["labels_reason"], "")
    with np.load(out) as result:
      order = helpers.match_rows(result["inputs"], p["inputs"])
      np.testing.assert_allclose(
        result["inputs"], p["inputs"][order], atol=1e-10
      )
      # Labels in the order of the inputs, repeated labels included.
      np.testing.assert_array_equal(result["labels"], p["labels"][order])
      self.assertTrue(result["labels_verified"].all())

  def test_labels_refused_honestly_exit_1(self):
    # A head of 3 inputs cannot separate 5 samples; another loss is refused.
    for sizes, extra, reason in (
      ((40, 60, 30, 3, 4), {}, None),
      ((40, 60, 30, 4), {"loss": np.asarray("mse")}, "softmax"),
    ):
      _, arrays = self._mlp(sizes)
      path = self._npz(**arrays, **extra)
      out = os.path.join(self.dir, "out.npz")
      code, stdout, stderr = _run(
        f"--gradients={path}", f"--output={out}", "--labels"
      )
      self.assertEqual(code, 1, stderr)
      summary = json.loads(stdout.strip().splitlines()[-1])
      if "loss" in extra:  # a 30-wide second layer: the inputs are exact
        self.assertTrue(summary["success"])
      if "loss" in extra:
        self.assertIn(reason, summary["labels_reason"])
      else:  # a 3-wide layer: random nets may also hide samples (dead
        # units) from layer 0; either way the labels come with a reason
        # (the identifiability case itself: labels_test, generic heads).
        self.assertNotEqual(summary["labels_reason"], "")
      with np.load(out) as result:
        refused = int((result["labels"] == -1).sum())
        # Another loss: every label refused. A 3-wide head: at least the
        # b - 4 = 1 samples beyond its rank (dead units can free others).
        self.assertGreaterEqual(refused, 5 if "loss" in extra else 1)

  def test_labels_bad_files_exit_2(self):
    _, arrays = self._mlp()
    cases = (
      ({"weight_0": arrays["weight_0"], "bias_0": arrays["bias_0"]}, "K >= 2"),
      ({**arrays, "weight_grad": arrays["weight_grad_0"] + 1}, "disagrees"),
      ({**arrays, "weight_1": arrays["weight_1"][:, :5]}, "layer 1"),
      ({k: v for k, v in arrays.items() if k != "bias_grad_1"}, "bias_grad_1"),
    )
    for content, message in cases:
      path = self._npz(**content)
      out = os.path.join(self.dir, "never.npz")
      code, _, stderr = _run(
        f"--gradients={path}", f"--output={out}", "--labels"
      )
      self.assertEqual(code, 2, stderr)
      self.assertIn(message, stderr)
      self.assertNotIn("Traceback", stderr)
      self.assertFalse(os.path.exists(out))

  def test_missing_flag_exits_2(self):
    code, _, stderr = _run("--output=/tmp/x.npz")
    self.assertEqual(code, 2)
    self.assertIn("gradients", stderr)
    self.assertNotIn("Traceback", stderr)


if __name__ == "__main__":
  absltest.main()
