"""The gradient-matching baseline: it approximates, and says nothing more."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spear_jax import attack
from spear_jax import fl


class GradientMatchingTest(absltest.TestCase):
  def test_matches_a_small_batch_approximately(self):
    seed = int(np.random.default_rng().integers(1 << 30))
    key = jax.random.key(seed)
    b, n = 2, 48
    x = jax.random.uniform(key, (b, n), jnp.float64, -1.0, 1.0)
    y = jnp.array([0, 1])
    model = fl.MLP(widths=(32,), num_classes=3)
    params = fl.init_mlp(jax.random.fold_in(key, 1), model, n, jnp.float64)

    def loss_fn(p, inputs):
      logits = model.apply(p, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    target = jax.grad(loss_fn)(params, x)
    result = attack.gradient_matching(
      loss_fn,
      params,
      target,
      key=jax.random.fold_in(key, 2),
      shape=(b, n),
      bounds=(-1.0, 1.0),
      config=attack.BaselineConfig(steps=200, restarts=2),
      dtype=jnp.float64,
    )
    truth = np.asarray(x)
    errors = [
      np.linalg.norm(np.asarray(result.inputs)[order] - truth)
      / np.linalg.norm(truth)
      for order in ([0, 1], [1, 0])
    ]
    # A uniform random guess in the box has relative error about 1.4; the
    # baseline gets close (about 0.1 measured) but is not exact.
    self.assertLess(min(errors), 0.5)
    self.assertGreater(min(errors), 1e-6)
    self.assertEqual(result.loss, float(np.min(result.restart_losses)))
    self.assertTrue(np.all(np.abs(np.asarray(result.inputs)) <= 1.0))

  def test_bad_settings(self):
    with self.assertRaisesRegex(ValueError, "at least 1"):
      attack.BaselineConfig(steps=0)
    with self.assertRaisesRegex(ValueError, "positive"):
      attack.BaselineConfig(learning_rate=0.0)


if __name__ == "__main__":
  absltest.main()
