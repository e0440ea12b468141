"""One trial wired end to end: data -> client -> attack -> scores."""

from absl.testing import absltest
import jax
import numpy as np

from spear_jax import _data
from spear_jax import _experiment


class RunTrialTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.key = jax.random.key(int(np.random.default_rng().integers(2**31)))

  def test_first_layer_images_are_scored_and_matched(self):
    images = _data.load_bundled("digits")
    trial = _experiment.run_trial(self.key, images, batch_size=4, width=128)
    self.assertTrue(trial["success"])
    self.assertTrue(trial["exact_batch"])
    self.assertEqual(trial["verified_samples"], 4)
    self.assertEqual(trial["mean_psnr"], 100.0)
    self.assertLen(trial["per_sample"]["ssim"], 4)
    truth, recovered = trial["arrays"]["truth"], trial["arrays"]["recovered"]
    self.assertEqual(truth.shape, (4, 8, 8, 1))
    # The de-normalized truth is a batch of distinct images of the set.
    flat = images.images.reshape(images.num_images, -1)
    for image in truth.reshape(4, -1):
      self.assertLess(np.min(np.abs(flat - image).max(axis=1)), 1e-6)
    np.testing.assert_allclose(recovered, truth, atol=1e-10)

  def test_deeper_layer_has_no_image_metrics(self):
    images = _data.load_bundled("cifar_like")
    trial = _experiment.run_trial(
      self.key, images, batch_size=4, width=128, layer=1
    )
    truth, recovered = trial["arrays"]["truth"], trial["arrays"]["recovered"]
    self.assertEqual(truth.shape, (4, 128))  # hidden activations
    self.assertGreaterEqual(truth.min(), 0.0)  # they are ReLU outputs
    self.assertNotIn("mean_psnr", trial)
    self.assertNotIn("psnr", trial["per_sample"])
    self.assertTrue(trial["exact_batch"])
    np.testing.assert_allclose(recovered, truth, atol=1e-10)
    record = _experiment.trial_record(trial, seed=0, trial=0)
    self.assertEqual(record["layer"], 1)
    self.assertNotIn("arrays", record)


if __name__ == "__main__":
  absltest.main()
