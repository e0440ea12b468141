"""Labels off the classifier's update, against hand-computed gradients."""

from absl.testing import absltest
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spear_jax import attack
from spear_jax import fl


def _head(p, k):
  return (
    p[f"weight_{k}"],
    p[f"bias_{k}"],
    p[f"weight_grad_{k}"],
    p[f"bias_grad_{k}"],
  )


def _seed():
  return int(np.random.default_rng().integers(1 << 30))


class RecoverLabelsTest(absltest.TestCase):
  def test_hand_gradients_agree_with_jax(self):
    # The helper is the independent reference; check it once against JAX.
    p = helpers.mlp_problem(_seed(), (7, 9, 6, 4), [0, 3, 3, 1, 0])

    def loss(params):
      a = jnp.asarray(p["inputs"])
      for k in range(3):
        a = a @ params[k][0].T + params[k][1][None, :]
        a = jax.nn.relu(a) if k < 2 else a
      return optax.softmax_cross_entropy_with_integer_labels(
        a, jnp.asarray(p["labels"])
      ).mean()

    params = [
      (jnp.asarray(p[f"weight_{k}"]), jnp.asarray(p[f"bias_{k}"]))
      for k in range(3)
    ]
    grads = jax.grad(loss)(params)
    for k in range(3):  # float64 rounding only
      np.testing.assert_allclose(grads[k][0], p[f"weight_grad_{k}"], atol=1e-14)
      np.testing.assert_allclose(grads[k][1], p[f"bias_grad_{k}"], atol=1e-14)

  def test_repeated_labels_are_recovered_exactly(self):
    rng = np.random.default_rng()
    b, c = 12, 5
    labels = rng.integers(0, 3, b)  # only 3 of 5 classes: many repeats
    p = helpers.mlp_problem(_seed(), (30, 40, 20, c), labels)
    perm = rng.permutation(b)  # the attack returns the samples in any order
    found = attack.recover_labels(
      p["features"][perm], *_head(p, 2), scale=1.0 / b
    )
    np.testing.assert_array_equal(found.labels, labels[perm])
    self.assertTrue(found.verified.all())
    self.assertEqual(found.reason, "")
    # Counts from the bias gradient alone: exact to rounding (1e-9).
    np.testing.assert_allclose(
      found.counts, np.bincount(labels, minlength=c), atol=1e-9
    )
    self.assertLess(found.residual, 1e-10)

  def test_sum_reduction_and_unknown_scale(self):
    labels = np.random.default_rng().integers(0, 4, 8)
    p = helpers.mlp_problem(_seed(), (20, 30, 12, 4), labels, reduction="sum")
    w, beta, dw, dbeta = _head(p, 2)
    found = attack.recover_labels(p["features"], w, beta, dw, dbeta, scale=1.0)
    np.testing.assert_array_equal(found.labels, labels)
    self.assertTrue(found.verified.all())
    # A positive multiple (one FedAvg step at lr 0.37): the scale is
    # inferred and every label still verifies.
    found = attack.recover_labels(
      p["features"], w, beta, 0.37 * dw, 0.37 * dbeta
    )
    np.testing.assert_array_equal(found.labels, labels)
    self.assertTrue(found.verified.all())
    self.assertAlmostEqual(found.scale, 0.37, delta=1e-9)
    # A wrong known scale is refused, not answered.
    found = attack.recover_labels(p["features"], w, beta, dw, dbeta, scale=0.5)
    self.assertTrue((found.labels == -1).all())
    self.assertIn("not a softmax cross-entropy gradient", found.reason)

  def test_duplicates_and_narrow_heads_are_refused_per_sample(self):
    labels = np.array([2, 0, 1, 1, 3, 0])
    # Samples 2 and 3 made identical (same features, same label).
    dup = helpers.mlp_problem(_seed(), (10, 16, 12, 4), labels)
    h = dup["features"].copy()
    h[3] = h[2]
    w, beta = dup["weight_2"], dup["bias_2"]
    probs = np.exp(h @ w.T + beta)
    probs /= probs.sum(axis=1, keepdims=True)
    g = (probs - np.eye(4)[labels]) / 6  # the head's gradient, by hand
    found = attack.recover_labels(h, w, beta, g.T @ h, g.sum(0), scale=1 / 6)
    np.testing.assert_array_equal(found.labels, [2, 0, -1, -1, 3, 0])
    np.testing.assert_array_equal(found.identifiable, [1, 1, 0, 0, 1, 1])
    self.assertIn("2 of 6 samples are not identifiable", found.reason)
    np.testing.assert_allclose(found.counts, [2, 2, 1, 1], atol=1e-9)
    # A head with 3 generic inputs cannot separate 6 samples: no label.
    # (Generic: any 4 rows of [h, 1] independent. Dead ReLU features can
    # make a sample identifiable again, legitimately.)
    rng = np.random.default_rng()
    h = rng.random((6, 3)) + 0.1
    w, beta = rng.standard_normal((4, 3)), rng.standard_normal(4)
    probs = np.exp(h @ w.T + beta)
    probs /= probs.sum(axis=1, keepdims=True)
    g = (probs - np.eye(4)[labels]) / 6
    found = attack.recover_labels(h, w, beta, g.T @ h, g.sum(0), scale=1 / 6)
    self.assertTrue((found.labels == -1).all())
    self.assertIn("not identifiable", found.reason)

  def test_other_losses_are_refused(self):
    labels = np.array([0, 1, 2, 1])
    p = helpers.mlp_problem(_seed(), (8, 12, 10, 3), labels)
    w, beta = p["weight_2"], p["bias_2"]
    h = p["features"]
    # Mean squared error on one-hot targets: dL/dlogits = 2 (z - e_y) / b.
    g = 2 * (h @ w.T + beta - np.eye(3)[labels]) / 4
    found = attack.recover_labels(h, w, beta, g.T @ h, g.sum(0), scale=0.25)
    self.assertTrue((found.labels == -1).all())
    self.assertIn("not a softmax cross-entropy gradient", found.reason)
    found = attack.recover_labels(h, *_head(p, 2), loss="mse")
    self.assertTrue((found.labels == -1).all())
    self.assertIn("softmax cross-entropy only", found.reason)
    with self.assertRaisesRegex(ValueError, "must be"):
      attack.recover_labels(h[:, :3], *_head(p, 2))


class ClientLabelsTest(absltest.TestCase):
  """FedAvg and DP-SGD updates of the flax MLP, true layer inputs."""

  def setUp(self):
    super().setUp()
    seed = _seed()
    self.b, self.c = 8, 4
    key = jax.random.key(seed)
    self.x = jax.random.normal(key, (self.b, 24))
    self.y = jax.random.randint(
      jax.random.fold_in(key, 1), (self.b,), 0, self.c
    )
    self.model = fl.MLP(widths=(32, 32), num_classes=self.c)
    self.params = fl.init_mlp(
      jax.random.fold_in(key, 2), self.model, 24, jnp.float64
    )

  def _labels(self, client):
    update = fl.simulate_client(
      self.model.apply,
      self.params,
      self.x,
      self.y,
      layer="params/Dense_0",
      key=jax.random.key(1),
      client=client,
    )
    from spear_jax import _client  # pylint: disable=g-import-not-at-top

    h = _client.hidden_features(self.params, self.x, 2)
    weight, bias = fl.dense_layer(self.params, "params/Dense_2")
    dw, db = fl.dense_layer(update.update, "params/Dense_2")
    return attack.recover_labels(h, weight, bias, dw, db)

  def test_one_local_step_verifies_several_do_not(self):
    one = self._labels(fl.ClientConfig(mode="fedavg", learning_rate=0.05))
    np.testing.assert_array_equal(one.labels, self.y)
    self.assertTrue(one.verified.all())
    self.assertAlmostEqual(one.scale, 0.05 / self.b, delta=1e-12)
    many = self._labels(
      fl.ClientConfig(
        mode="fedavg", local_epochs=2, local_batch_size=4, learning_rate=0.05
      )
    )
    np.testing.assert_array_equal(many.labels, self.y)  # sign pattern holds
    self.assertFalse(many.verified.any())  # but drift rules out exactness

  def test_dp_noise_reads_labels_without_verifying(self):
    found = self._labels(fl.ClientConfig(mode="dpsgd", noise_multiplier=1e-4))
    np.testing.assert_array_equal(found.labels, self.y)
    self.assertFalse(found.verified.any())


if __name__ == "__main__":
  absltest.main()
