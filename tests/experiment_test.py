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
    # Labels read off the classifier: the digits' own labels, verified.
    per_sample = trial["per_sample"]
    matched = [
      int(np.argmin(np.abs(flat - image).max(axis=1)))
      for image in truth.reshape(4, -1)
    ]
    np.testing.assert_array_equal(
      per_sample["true_label"], images.labels[matched] % 10
    )
    np.testing.assert_array_equal(per_sample["label"], per_sample["true_label"])
    self.assertEqual(trial["label_accuracy"], 1.0)
    self.assertEqual(trial["labels_verified"], 4)

  def test_baseline_and_hopeless_noise_claim_nothing(self):
    from spear_jax import attack  # pylint: disable=g-import-not-at-top
    from spear_jax import fl  # pylint: disable=g-import-not-at-top

    images = _data.load_bundled("digits")
    trial = _experiment.run_trial(
      self.key,
      images,
      batch_size=4,
      width=64,
      method="baseline",
      baseline=attack.BaselineConfig(steps=30, restarts=1),
    )
    self.assertFalse(trial["success"])
    self.assertEqual(trial["verified_samples"], 0)
    self.assertFalse(trial["exact_batch"])
    self.assertTrue(np.isfinite(trial["mean_psnr"]))
    self.assertNotIn("label_accuracy", trial)  # the baseline is given labels
    with self.assertRaisesRegex(ValueError, "baseline reconstructs images"):
      _experiment.run_trial(
        self.key, images, batch_size=4, width=64, method="baseline", layer=1
      )
    # DP noise far above the signal: an attack outcome, not an error.
    trial = _experiment.run_trial(
      self.key,
      images,
      batch_size=4,
      width=64,
      client=fl.ClientConfig(mode="dpsgd", noise_multiplier=10.0),
    )
    self.assertEqual(trial["stats"]["stop_reason"], "no_structure")
    self.assertEqual(trial["exact_samples"], 0)
    self.assertFalse(trial["success"])

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
    self.assertEqual(trial["label_accuracy"], 1.0)  # forward from layer 1
    record = _experiment.trial_record(trial, seed=0, trial=0)
    self.assertEqual(record["layer"], 1)
    self.assertNotIn("arrays", record)


if __name__ == "__main__":
  absltest.main()
