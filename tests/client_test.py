"""The simulated FL client: gradients in the paper's layout."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from spear_jax import _client


class ClientTest(parameterized.TestCase):
  @parameterized.named_parameters(("layer0", 0), ("layer1", 1))
  def test_gradient_factorises_through_grad_z(self, layer):
    rng = np.random.default_rng(layer)
    x = jnp.asarray(rng.standard_normal((6, 20)))
    model = _client.MLP(widths=(16, 12), num_classes=5)
    params = _client.init_mlp(jax.random.key(0), model, 20, jnp.float64)
    update = _client.client_update(
      params, model, x, jnp.arange(6) % 5, layer=layer
    )
    m = (16, 12)[layer]
    chex.assert_shape(update.weight_grad, (m, update.inputs.shape[1]))
    # Theorem 3.1: dL/dW = D X^T and dL/dbeta = D 1, D from a separate
    # autodiff path through the pre-activations.
    np.testing.assert_allclose(
      update.weight_grad, update.grad_z @ update.inputs, atol=1e-14
    )
    np.testing.assert_allclose(
      update.bias_grad, update.grad_z.sum(axis=1), atol=1e-14
    )
    self.assertTrue(
      np.all(
        (np.asarray(update.grad_z) == 0)
        | (
          np.asarray(update.inputs @ update.weight.T + update.bias[None, :]).T
          > 0
        )
      )
    )

  def test_paper_layout_is_the_transpose_of_flax_kernels(self):
    model = _client.MLP(widths=(7,), num_classes=3)
    params = _client.init_mlp(jax.random.key(1), model, 4, jnp.float64)
    kernel = params["params"]["Dense_0"]["kernel"]
    chex.assert_shape(kernel, (4, 7))
    weight, _ = _client.layer_parameters(params, 0)
    np.testing.assert_array_equal(weight, np.asarray(kernel).T)
    x = jnp.ones((1, 4))
    np.testing.assert_allclose(x @ kernel, (weight @ x.T).T)

  def test_torch_init_bounds(self):
    model = _client.MLP(widths=(50,), num_classes=3)
    params = _client.init_mlp(jax.random.key(2), model, 100, jnp.float64)
    bound = 1.0 / np.sqrt(100)
    self.assertLessEqual(
      np.abs(params["params"]["Dense_0"]["kernel"]).max(), bound
    )
    self.assertLessEqual(
      np.abs(params["params"]["Dense_0"]["bias"]).max(), bound
    )

  def test_bad_layer(self):
    model = _client.MLP(widths=(5,), num_classes=3)
    params = _client.init_mlp(jax.random.key(0), model, 4, jnp.float64)
    with self.assertRaisesRegex(ValueError, "hidden layer"):
      _client.client_update(
        params, model, jnp.ones((2, 4)), jnp.zeros(2, int), layer=1
      )


if __name__ == "__main__":
  absltest.main()
