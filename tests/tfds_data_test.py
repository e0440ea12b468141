"""Tests for the tensorflow-datasets loaders in ``spear_jax._data``.

Two kinds of data, neither downloaded and neither needing TensorFlow:

* ``tfds.testing.mock_data`` (policy ``USE_CODE``): every builder's real
  features and random examples, served by a mocked ``data_source``. It
  covers every name in ``TFDS_NAMES``, ImageNet included, but skips the
  on-disk reading and image decoding.
* Small datasets prepared for real in a temporary ``data_dir`` with tfds's
  own ``SequentialWriter`` (array_record shards, ``dataset_info.json``),
  read back through the same ``tfds.data_source`` path as a dataset made by
  ``tfds build``: shard lookup, deserialization and PNG decoding included.
"""

import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from spear_jax import _data

# Published per-channel (mean, std) that the loaders must report.
_STATS = {
  "mnist": ((0.1307,), (0.3081,)),
  "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# name, (H, W, C) of the images returned by default.
_DEFAULT_SHAPES = (
  ("mnist", (28, 28, 1)),
  ("cifar10", (32, 32, 3)),
  ("cifar100", (32, 32, 3)),
  ("imagenet2012", (224, 224, 3)),
  ("imagenette", (224, 224, 3)),
  ("imagenette/320px-v2", (224, 224, 3)),
  ("imagenette/160px-v2", (160, 160, 3)),
  ("imagenet_resized/32x32", (32, 32, 3)),
  ("imagenet_resized/64x64", (64, 64, 3)),
)
# normalize then denormalize of [0, 1] float32 images: a few float32 ulps.
_ROUND_TRIP_ATOL = 1e-6


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 ``(H, W, C)`` image."""
  buffer = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
    buffer, format="PNG"
  )
  return buffer.getvalue()


def _prepare(data_dir: str, name: str, splits: dict) -> None:
  """Prepares ``name`` in ``data_dir`` as array_record, without TensorFlow.

  tfds's ``SequentialWriter`` writes the shards and ``dataset_info.json`` of
  the real registered builder. Images are given as PNG bytes, which tfds
  stores as they are (encoding arrays itself would need TensorFlow).

  Args:
    data_dir: The ``data_dir`` to prepare in.
    name: tfds name, with its config if any.
    splits: Split name to a list of ``(uint8 image, label)`` pairs.
  """
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  os.makedirs(builder.data_dir)
  writer = tfds.core.SequentialWriter(
    builder.info, max_examples_per_shard=4, file_format="array_record"
  )
  writer.initialize_splits(list(splits))
  for split, pairs in splits.items():
    examples = []
    for i, (image, label) in enumerate(pairs):
      example = {"image": _png(image), "label": label}
      if "id" in builder.info.features:  # CIFAR's example ids.
        example["id"] = f"{split}_{i:05d}"
      examples.append(example)
    writer.add_examples({split: examples})
  writer.close_all()


def _no_network(*args, **kwargs):
  raise AssertionError(f"network access attempted: {args} {kwargs}")


class ResizeTest(parameterized.TestCase):
  @parameterized.parameters(
    (375, 500, 224),  # ImageNet-like landscape, downsampled.
    (500, 333, 64),  # Portrait, strongly downsampled.
    (32, 32, 224),  # Upsampled.
    (47, 17, 8),
  )
  def test_matches_jax_image_resize_of_center_crop(self, height, width, size):
    image = np.random.default_rng().random((height, width, 3), np.float32)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top : top + side, left : left + side]
    expected = jax.image.resize(
      jnp.asarray(crop), (size, size, 3), "linear", antialias=True
    )
    got = _data._center_crop_resize(image, size)
    self.assertEqual(got.shape, (size, size, 3))
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got, np.asarray(expected), atol=2e-5)

  def test_same_size_is_identity(self):
    image = np.random.default_rng().random((28, 28, 1), np.float32)
    np.testing.assert_array_equal(_data._center_crop_resize(image, 28), image)

  def test_crops_the_centre(self):
    image = np.zeros((4, 8, 1), np.float32)
    image[:, 2:6] = 1.0  # The central 4x4 square; the sides are 0.
    np.testing.assert_allclose(_data._center_crop_resize(image, 3), 1.0)
    np.testing.assert_allclose(_data._center_crop_resize(image[:, ::-1], 2), 1)

  def test_decode_stays_in_unit_range(self):
    image = np.random.default_rng().integers(0, 256, (61, 40, 3), np.uint8)
    image[0, 0] = 255
    out = _data._decode_image(image, size=97, channels=3)
    self.assertEqual(out.shape, (97, 97, 3))
    self.assertGreaterEqual(out.min(), 0.0)
    self.assertLessEqual(out.max(), 1.0)


def _lazy_images(num: int = 7):
  """A ``LazyArray`` over a list of records, and the array it stands for."""
  rng = np.random.default_rng()
  raw = rng.integers(0, 256, (num, 4, 5, 3), np.uint8)
  records = [{"image": image, "label": i % 3} for i, image in enumerate(raw)]
  images = _data.LazyArray(
    records, "image", (4, 5, 3), np.float32, lambda x: x / np.float32(255.0)
  )
  return images, raw.astype(np.float32) / np.float32(255.0), records


class _LoggedList(list):
  """A list that logs the indices read."""

  def __init__(self, items):
    super().__init__(items)
    self.reads = []

  def __getitem__(self, index):
    self.reads.append(index)
    return super().__getitem__(index)


class LazyArrayTest(parameterized.TestCase):
  def test_attributes(self):
    images, expected, _ = _lazy_images()
    self.assertEqual(images.shape, expected.shape)
    self.assertEqual(images.dtype, np.float32)
    self.assertEqual(images.ndim, 4)
    self.assertLen(images, 7)
    np.testing.assert_array_equal(np.asarray(images), expected)

  @parameterized.named_parameters(
    ("int", 3),
    ("negative_int", -1),
    ("numpy_int", np.int64(2)),
    ("slice", slice(1, 6, 2)),
    ("empty_slice", slice(3, 3)),
    ("list", [4, 0, 4]),
    ("array", np.array([6, 1])),
    ("array_2d", np.array([[0, 1], [5, -2]])),
    ("empty_array", np.array([], np.int64)),
    ("extra_axes", (np.array([2, 3]), 0, slice(None), -1)),
    ("adjacent_arrays", (np.array([2, 3]), np.array([0, 3]))),
    ("slice_then_int", (slice(None, 3), 1)),
    ("int_then_ellipsis", (1, Ellipsis, 0)),
    ("empty_tuple", ()),
  )
  def test_indexing_like_numpy(self, key):
    images, expected, _ = _lazy_images()
    got = images[key]
    self.assertIsInstance(got, np.ndarray)
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_array_equal(got, expected[key])

  def test_reads_only_the_records_indexed(self):
    _, _, records = _lazy_images()
    source = _LoggedList(records)
    lazy = _data.LazyArray(source, "image", (4, 5, 3), np.uint8, np.asarray)
    lazy[np.array([5, 2])]
    lazy[-1, 0]
    self.assertEqual(source.reads, [5, 2, 6])

  @parameterized.parameters((7,), (-8,), ([0, 7],))
  def test_out_of_bounds_raises(self, key):
    images, _, _ = _lazy_images()
    with self.assertRaisesRegex(IndexError, "out of bounds for 7 records"):
      images[key]

  @parameterized.parameters((np.ones(7, bool),), (1.0,), ("a",))
  def test_bad_index_raises(self, key):
    images, _, _ = _lazy_images()
    with self.assertRaisesRegex(IndexError, "an int, a slice or an integer"):
      images[key]

  def test_sample_batch_same_as_in_memory(self):
    images, expected, records = _lazy_images()
    labels = _data.LazyArray(records, "label", (), np.int64, np.int64)
    stats = {"mean": np.full(3, 0.5, np.float32), "std": np.ones(3, np.float32)}
    lazy_set = _data.ImageSet(images, labels, name="lazy", **stats)
    eager_set = _data.ImageSet(expected, None, name="eager", **stats)
    self.assertEqual(lazy_set.num_images, 7)
    self.assertEqual(lazy_set.image_shape, (4, 5, 3))
    batch, indices = _data.sample_batch(3, lazy_set, 5)
    eager_batch, eager_indices = _data.sample_batch(3, eager_set, 5)
    np.testing.assert_array_equal(indices, eager_indices)
    np.testing.assert_array_equal(batch, eager_batch)
    np.testing.assert_array_equal(lazy_set.labels[indices], indices % 3)

  def test_batch_larger_than_set_raises(self):
    images, _, _ = _lazy_images()
    stats = {"mean": np.zeros(3, np.float32), "std": np.ones(3, np.float32)}
    image_set = _data.ImageSet(images, None, name="lazy", **stats)
    with self.assertRaisesRegex(ValueError, "between 1 and 7 .* 'lazy'"):
      _data.sample_batch(0, image_set, 8)


class MockDataTest(parameterized.TestCase):
  """Every tfds name through ``tfds.testing.mock_data``."""

  def setUp(self):
    super().setUp()
    # mock_data ignores data_dir, but the loader checks that it exists.
    self.data_dir = self.enter_context(tempfile.TemporaryDirectory())

  def _load(self, name, num_examples=6, **kwargs):
    # The mock lasts until the end of the test, reads included.
    self.enter_context(
      tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
      )
    )
    return _data.load_dataset(name, data_dir=self.data_dir, **kwargs)

  @parameterized.named_parameters(
    (name.replace("/", "_"), name, shape) for name, shape in _DEFAULT_SHAPES
  )
  def test_shapes_dtypes_and_round_trip(self, name, shape):
    # Labels are only checked on real data: under mock_data, the label view's
    # skipped image decoding makes the mock encode images with TensorFlow.
    image_set = self._load(name)
    self.assertEqual(image_set.name, name)
    self.assertIsInstance(image_set.images, _data.LazyArray)
    self.assertEqual(image_set.num_images, 6)
    self.assertEqual(image_set.image_shape, shape)
    self.assertEqual(image_set.labels.shape, (6,))
    self.assertEqual(image_set.labels.dtype, np.int64)
    for stat in (image_set.mean, image_set.std):
      self.assertEqual(stat.shape, (shape[-1],))
      self.assertEqual(stat.dtype, np.float32)
    batch, indices = _data.sample_batch(0, image_set, 4)
    self.assertEqual(batch.shape, (4, np.prod(shape)))
    self.assertEqual(batch.dtype, np.float32)
    images = image_set.images[indices]
    self.assertEqual(images.shape, (4, *shape))
    self.assertEqual(images.dtype, np.float32)
    self.assertGreaterEqual(images.min(), 0.0)
    self.assertLessEqual(images.max(), 1.0)
    restored = _data.denormalize(
      batch.reshape(images.shape), image_set.mean, image_set.std
    )
    np.testing.assert_allclose(restored, images, atol=_ROUND_TRIP_ATOL)

  @parameterized.parameters(*_STATS)
  def test_published_stats(self, name):
    image_set = self._load(name)
    mean, std = _STATS[name]
    np.testing.assert_array_equal(image_set.mean, np.float32(mean))
    np.testing.assert_array_equal(image_set.std, np.float32(std))
    with self.assertRaises(ValueError):
      image_set.mean[0] = 0.0  # Read-only, as for the bundled sets.

  @parameterized.parameters(
    ("cifar10", 16), ("imagenet2012", 64), ("imagenet_resized/64x64", 32)
  )
  def test_image_size(self, name, size):
    image_set = self._load(name, image_size=size)
    self.assertEqual(image_set.image_shape, (size, size, 3))
    self.assertEqual(image_set.images[0].shape, (size, size, 3))

  def test_batch_larger_than_split_raises(self):
    image_set = self._load("cifar10", num_examples=5)
    with self.assertRaisesRegex(ValueError, "between 1 and 5 .* 'cifar10'"):
      _data.sample_batch(0, image_set, 6)


class PreparedDataTest(parameterized.TestCase):
  """Real array_record datasets on disk, read through ``tfds.data_source``."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.mkdtemp()
    cls.data_dir = os.path.join(cls._tmp, "tfds")
    rng = np.random.default_rng()
    cls.raw = {
      "mnist": rng.integers(0, 256, (10, 28, 28, 1), np.uint8),
      "cifar10": rng.integers(0, 256, (9, 32, 32, 3), np.uint8),
      "imagenette/160px-v2": [
        rng.integers(0, 256, (h, w, 3), np.uint8)
        for h, w in ((160, 213), (240, 160), (160, 160), (170, 190))
      ],
    }
    for name, images in cls.raw.items():
      pairs = [(image, (3 * i + 1) % 10) for i, image in enumerate(images)]
      _prepare(cls.data_dir, name, {"train": pairs, "test": pairs[:3]})
    # The same mnist, as `tfds build` without --file_format would leave it.
    cls.tfrecord_dir = os.path.join(cls._tmp, "tfrecord")
    shutil.copytree(cls.data_dir, cls.tfrecord_dir)
    info_path = os.path.join(cls.tfrecord_dir, "mnist/3.0.1/dataset_info.json")
    with open(info_path) as f:
      info = json.load(f)
    info["fileFormat"] = "tfrecord"
    with open(info_path, "w") as f:
      json.dump(info, f)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls._tmp)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    for target in (socket.socket, "connect"), (socket, "create_connection"):
      self.enter_context(mock.patch.object(*target, side_effect=_no_network))
    self.enter_context(
      mock.patch.object(
        tfds.core.DatasetBuilder,
        "download_and_prepare",
        side_effect=AssertionError("download attempted"),
      )
    )

  @parameterized.parameters("mnist", "cifar10")
  def test_pixels_labels_and_round_trip(self, name):
    image_set = _data.load_dataset(name, data_dir=self.data_dir)
    raw = self.raw[name]
    self.assertEqual(image_set.images.shape, raw.shape)
    np.testing.assert_array_equal(
      np.asarray(image_set.images), raw / np.float32(255.0)
    )
    np.testing.assert_array_equal(
      image_set.labels[:], (3 * np.arange(len(raw)) + 1) % 10
    )
    batch, indices = _data.sample_batch(1, image_set, 6)
    restored = _data.denormalize(
      batch.reshape(6, *raw.shape[1:]), image_set.mean, image_set.std
    )
    np.testing.assert_allclose(
      restored, raw[indices] / np.float32(255.0), atol=_ROUND_TRIP_ATOL
    )

  @parameterized.parameters(None, 24)
  def test_variable_size_images_are_cropped_and_resized(self, size):
    name = "imagenette/160px-v2"
    image_set = _data.load_dataset(
      name, data_dir=self.data_dir, image_size=size
    )
    side = 160 if size is None else size
    self.assertEqual(image_set.images.shape, (4, side, side, 3))
    for i, raw in enumerate(self.raw[name]):
      expected = _data._center_crop_resize(raw / np.float32(255.0), side)
      np.testing.assert_allclose(image_set.images[i], expected, atol=1e-6)

  @parameterized.parameters(("test", 3), ("train[:4]", 4), ("train[5:]", 5))
  def test_splits(self, split, num):
    image_set = _data.load_dataset("mnist", data_dir=self.data_dir, split=split)
    self.assertEqual(image_set.num_images, num)
    with self.assertRaisesRegex(ValueError, f"between 1 and {num} "):
      _data.sample_batch(0, image_set, num + 1)

  def test_default_data_dir_is_tfds_data_dir(self):
    with mock.patch.dict(os.environ, {"TFDS_DATA_DIR": self.data_dir}):
      image_set = _data.load_tfds("mnist")
    self.assertEqual(image_set.num_images, 10)

  def test_path_like_data_dir(self):
    image_set = _data.load_tfds("cifar10", data_dir=pathlib.Path(self.data_dir))
    self.assertEqual(image_set.num_images, 9)

  def test_not_prepared_raises_with_build_command(self):
    regex = (
      "'cifar100' is not prepared in .*; prepare it .* with: tfds build"
      f" cifar100 --data_dir={self.data_dir} --file_format=array_record$"
    )
    with self.assertRaisesRegex(FileNotFoundError, regex):
      _data.load_dataset("cifar100", data_dir=self.data_dir)

  def test_imagenet_command_names_the_manual_dir(self):
    with self.assertRaisesRegex(
      FileNotFoundError,
      f"tfds build imagenet2012 --data_dir={self.data_dir}"
      " --file_format=array_record --manual_dir=MANUAL_DIR, MANUAL_DIR"
      " holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    ):
      _data.load_dataset("imagenet2012", data_dir=self.data_dir)

  def test_config_is_in_build_command(self):
    # `tfds build imagenette` would build all six configs.
    with self.assertRaisesRegex(
      FileNotFoundError, "tfds build imagenette/full-size-v2 "
    ):
      _data.load_dataset("imagenette", data_dir=self.data_dir)

  def test_tfrecord_raises_with_rebuild_command(self):
    with self.assertRaisesRegex(
      FileNotFoundError,
      "'mnist' is prepared in .* but not as array_record.*"
      " --file_format=array_record$",
    ):
      _data.load_dataset("mnist", data_dir=self.tfrecord_dir)

  def test_missing_data_dir_raises(self):
    missing = os.path.join(self._tmp, "missing")
    with self.assertRaisesRegex(
      FileNotFoundError,
      f"data_dir '{missing}' does not exist; .* tfds build mnist"
      f" --data_dir={missing} --file_format=array_record$",
    ):
      _data.load_dataset("mnist", data_dir=missing)
    self.assertFalse(os.path.exists(missing))

  def test_unknown_split_raises(self):
    with self.assertRaisesRegex(ValueError, "Unknown split 'validation'"):
      _data.load_dataset("mnist", data_dir=self.data_dir, split="validation")


class LoadDatasetTest(parameterized.TestCase):
  @parameterized.parameters(*_data.NAMES)
  def test_bundled_names(self, name):
    # data_dir is ignored, so one --data_dir serves bundled and tfds sets.
    image_set = _data.load_dataset(name, data_dir="/nonexistent")
    self.assertIs(image_set, _data.load_bundled(name))

  def test_names(self):
    self.assertEqual(
      _data.DATASET_NAMES,
      _data.NAMES + _data.NEAR_DUPLICATE_NAMES + _data.TFDS_NAMES,
    )
    self.assertEqual(
      set(_data.TFDS_NAMES), {name for name, _ in _DEFAULT_SHAPES}
    )

  def test_unknown_name_lists_valid_names(self):
    with self.assertRaisesRegex(
      ValueError,
      "Unknown dataset 'imagenet'; valid names: cifar_like, faces, digits,"
      " cifar_like_dark, cifar_like_shifted, cifar_like_crops,"
      " cifar_like_lowcontrast, mnist, cifar10, cifar100,"
      " imagenet2012, imagenette, ",
    ):
      _data.load_dataset("imagenet")
    with self.assertRaisesRegex(ValueError, "valid names: mnist, cifar10,"):
      _data.load_tfds("digits")

  @parameterized.named_parameters(
    ("split", {"split": "test"}), ("image_size", {"image_size": 8})
  )
  def test_bundled_options_raise(self, kwargs):
    with self.assertRaisesRegex(ValueError, "bundled set 'digits' has no"):
      _data.load_dataset("digits", **kwargs)

  @parameterized.parameters((0, ValueError), (-3, ValueError), (2.0, TypeError))
  def test_bad_image_size_raises(self, size, error):
    with self.assertRaises(error):
      _data.load_tfds("cifar10", image_size=size)

  def test_without_tensorflow_datasets_raises(self):
    self.enter_context(
      mock.patch.dict(sys.modules, {"tensorflow_datasets": None})
    )
    with self.assertRaisesRegex(
      ImportError, r'pip install -e "\.\[datasets\]"$'
    ):
      _data.load_dataset("mnist", data_dir="/nonexistent")

  def test_without_image_decoder_raises(self):
    self.enter_context(mock.patch.dict(sys.modules, {"PIL": None, "cv2": None}))
    with self.assertRaisesRegex(ImportError, "needs Pillow"):
      _data.load_dataset("mnist", data_dir="/nonexistent")

  def test_tfds_is_imported_lazily(self):
    code = (
      "import sys; import spear_jax; from spear_jax import _data;"
      " _data.load_dataset('digits');"
      " assert 'tensorflow_datasets' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


if __name__ == "__main__":
  absltest.main()
