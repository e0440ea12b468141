"""Tests for the bundled image sets in ``spear_jax._data``."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from spear_jax import _data

# name, N, (H, W, C), has labels
_EXPECTED = (
  ("cifar_like", 256, (32, 32, 3), False),
  ("faces", 200, (25, 25, 1), True),
  ("digits", 1797, (8, 8, 1), True),
)


class LoadBundledTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (name, name, n, shape, has_labels)
    for name, n, shape, has_labels in _EXPECTED
  )
  def test_shapes_dtypes_and_ranges(self, name, n, shape, has_labels):
    image_set = _data.load_bundled(name)
    self.assertEqual(image_set.name, name)
    self.assertEqual(image_set.images.shape, (n, *shape))
    self.assertEqual(image_set.images.dtype, np.float32)
    self.assertEqual(image_set.num_images, n)
    self.assertEqual(image_set.image_shape, shape)
    self.assertGreaterEqual(image_set.images.min(), 0.0)
    self.assertLessEqual(image_set.images.max(), 1.0)
    # Real images use most of the range, not a constant.
    self.assertLess(image_set.images.min(), 0.1)
    self.assertGreater(image_set.images.max(), 0.9)
    channels = shape[-1]
    for stat in (image_set.mean, image_set.std):
      self.assertEqual(stat.shape, (channels,))
      self.assertEqual(stat.dtype, np.float32)
    axes = (0, 1, 2)
    np.testing.assert_allclose(
      image_set.mean, image_set.images.mean(axes, np.float64), atol=1e-6
    )
    np.testing.assert_allclose(
      image_set.std, image_set.images.std(axes, np.float64), atol=1e-6
    )
    self.assertTrue(np.all(image_set.std > 0.05))
    if has_labels:
      self.assertEqual(image_set.labels.shape, (n,))
      self.assertEqual(image_set.labels.dtype, np.int64)
    else:
      self.assertIsNone(image_set.labels)

  def test_default_is_cifar_like(self):
    self.assertEqual(_data.load_bundled().name, "cifar_like")

  def test_labels(self):
    digits = _data.load_bundled("digits")
    np.testing.assert_array_equal(np.unique(digits.labels), np.arange(10))
    faces = _data.load_bundled("faces")
    np.testing.assert_array_equal(faces.labels[:100], 1)
    np.testing.assert_array_equal(faces.labels[100:], 0)

  def test_cifar_like_patches_are_not_flat(self):
    images = _data.load_bundled("cifar_like").images
    spatial_std = images.std(axis=(1, 2)).mean(axis=-1)
    self.assertGreater(spatial_std.min(), 0.03)

  def test_arrays_are_read_only(self):
    image_set = _data.load_bundled("faces")
    with self.assertRaises(ValueError):
      image_set.images[0, 0, 0, 0] = 0.5

  def test_unknown_name_raises(self):
    with self.assertRaisesRegex(ValueError, "cifar_like, faces, digits"):
      _data.load_bundled("mnist")


class NearDuplicateSetsTest(parameterized.TestCase):
  @parameterized.parameters(*_data.NEAR_DUPLICATE_NAMES)
  def test_sets_are_full_of_twins(self, name):
    image_set = _data.load_dataset(name)
    base = _data.load_bundled("cifar_like")
    self.assertEqual(image_set.images.shape[1:], (32, 32, 3))
    self.assertGreaterEqual(image_set.num_images, 256)
    self.assertGreaterEqual(float(np.min(image_set.images)), 0.0)
    self.assertLessEqual(float(np.max(image_set.images)), 1.0)
    np.testing.assert_array_equal(image_set.mean, base.mean)
    batch, _ = _data.sample_batch(0, image_set, 64)
    # Independent of near_duplicates: the best partner cosine by a loop.
    unit = batch / np.linalg.norm(batch, axis=1, keepdims=True)
    cosine = unit @ unit.T
    best = [np.max(np.delete(cosine[i], i)) for i in range(64)]
    self.assertGreater(np.mean(np.asarray(best) > 0.95), 0.4)
    plain, _ = _data.sample_batch(0, base, 64)
    unit = plain / np.linalg.norm(plain, axis=1, keepdims=True)
    cosine = unit @ unit.T
    best_plain = [np.max(np.delete(cosine[i], i)) for i in range(64)]
    self.assertLess(np.mean(np.asarray(best_plain) > 0.95), 0.3)

  def test_deterministic_and_checked(self):
    a = _data.load_near_duplicates("cifar_like_shifted")
    self.assertIs(a, _data.load_near_duplicates("cifar_like_shifted"))
    with self.assertRaisesRegex(ValueError, "no splits"):
      _data.load_dataset("cifar_like_dark", split="test")
    with self.assertRaisesRegex(ValueError, "cifar_like_dark"):
      _data.load_near_duplicates("cifar_like_bright")


class NormalizeTest(parameterized.TestCase):
  @parameterized.parameters(*_data.NAMES)
  def test_round_trip(self, name):
    image_set = _data.load_bundled(name)
    normalized = _data.normalize(
      image_set.images, image_set.mean, image_set.std
    )
    self.assertEqual(normalized.shape, image_set.images.shape)
    self.assertEqual(normalized.dtype, np.float32)
    axes = (0, 1, 2)
    np.testing.assert_allclose(normalized.mean(axes, np.float64), 0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(axes, np.float64), 1, atol=1e-5)
    restored = _data.denormalize(normalized, image_set.mean, image_set.std)
    np.testing.assert_allclose(restored, image_set.images, atol=1e-6)

  def test_per_channel(self):
    images = np.array([[[[1.0, 10.0], [3.0, 30.0]]]], dtype=np.float32)
    mean = np.array([2.0, 20.0], dtype=np.float32)
    std = np.array([1.0, 10.0], dtype=np.float32)
    np.testing.assert_allclose(
      _data.normalize(images, mean, std), [[[[-1.0, -1.0], [1.0, 1.0]]]]
    )


class SampleBatchTest(parameterized.TestCase):
  @parameterized.parameters(*_data.NAMES)
  def test_shape_and_values(self, name):
    image_set = _data.load_bundled(name)
    batch, indices = _data.sample_batch(0, image_set, 16)
    self.assertEqual(batch.shape, (16, np.prod(image_set.image_shape)))
    self.assertEqual(batch.dtype, np.float32)
    self.assertEqual(indices.shape, (16,))
    self.assertEqual(indices.dtype, np.int64)
    expected = _data.normalize(
      image_set.images[indices], image_set.mean, image_set.std
    ).reshape(16, -1)
    np.testing.assert_allclose(batch, expected)

  def test_without_replacement(self):
    image_set = _data.load_bundled("cifar_like")
    _, indices = _data.sample_batch(3, image_set, image_set.num_images)
    np.testing.assert_array_equal(
      np.sort(indices), np.arange(image_set.num_images)
    )

  def test_deterministic_per_seed(self):
    image_set = _data.load_bundled("digits")
    batch_a, indices_a = _data.sample_batch(7, image_set, 32)
    batch_b, indices_b = _data.sample_batch(7, image_set, 32)
    np.testing.assert_array_equal(indices_a, indices_b)
    np.testing.assert_array_equal(batch_a, batch_b)

  def test_different_across_seeds(self):
    image_set = _data.load_bundled("digits")
    _, indices_a = _data.sample_batch(0, image_set, 32)
    _, indices_b = _data.sample_batch(1, image_set, 32)
    self.assertFalse(np.array_equal(indices_a, indices_b))

  @parameterized.parameters(0, -1, 257)
  def test_bad_batch_size_raises(self, batch_size):
    image_set = _data.load_bundled("cifar_like")
    with self.assertRaisesRegex(ValueError, "between 1 and 256"):
      _data.sample_batch(0, image_set, batch_size)

  def test_numpy_integers_accepted(self):
    image_set = _data.load_bundled("faces")
    batch, indices = _data.sample_batch(np.int64(5), image_set, np.int32(4))
    self.assertEqual(batch.shape, (4, 25 * 25))
    np.testing.assert_array_equal(
      indices, _data.sample_batch(5, image_set, 4)[1]
    )

  def test_negative_seed_raises(self):
    image_set = _data.load_bundled("faces")
    with self.assertRaisesRegex(ValueError, "seed must be non-negative"):
      _data.sample_batch(-1, image_set, 4)

  @parameterized.parameters(1.5, "0", True)
  def test_non_int_seed_raises(self, seed):
    # TypeError, or jaxtyping's TypeCheckError (a TypeError) under the hook.
    image_set = _data.load_bundled("faces")
    with self.assertRaises(TypeError):
      _data.sample_batch(seed, image_set, 4)


if __name__ == "__main__":
  absltest.main()
