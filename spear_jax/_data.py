"""Small natural-image sets bundled with ``spear_jax``, usable offline.

The images live in the package data file ``spear_jax/data/bundled_images.npz``,
written by ``scripts/make_bundled_images.py`` from photographs and datasets
shipped inside scikit-image and scikit-learn. Loading them needs only numpy.

Sets, by name:

* ``"cifar_like"``: 256 RGB 32x32 patches of scikit-image photographs
  (astronaut, chelsea, coffee, rocket, immunohistochemistry), no labels.
* ``"faces"``: 200 grayscale 25x25 images from the LFW subset in
  scikit-image; labels are 1 for the first 100 (faces) and 0 for the last
  100 (non-face background crops).
* ``"digits"``: 1797 grayscale 8x8 handwritten digits from scikit-learn;
  labels are the digit classes 0..9.

Example:
  >>> from spear_jax import _data
  >>> images = _data.load_bundled("cifar_like")
  >>> batch, indices = _data.sample_batch(0, images, batch_size=64)
  >>> batch.shape
  (64, 3072)
"""

import dataclasses
import functools
import importlib.resources
import numbers

import numpy as np

NAMES = ("cifar_like", "faces", "digits")
_RESOURCE = ("data", "bundled_images.npz")


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """A bundled image set.

  The arrays are read-only: they are shared between calls to
  ``load_bundled``. Copy them before changing them.

  Attributes:
    images: float32 ``(N, H, W, C)`` in [0, 1]; grayscale sets have ``C == 1``.
    labels: int64 ``(N,)`` labels, or ``None`` for an unlabelled set.
    mean: float32 ``(C,)`` per-channel mean of ``images``.
    std: float32 ``(C,)`` per-channel standard deviation of ``images``.
    name: Name of the set, one of ``NAMES``.
  """

  images: np.ndarray
  labels: np.ndarray | None
  mean: np.ndarray
  std: np.ndarray
  name: str

  @property
  def num_images(self) -> int:
    """Number of images ``N``."""
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Shape ``(H, W, C)`` of one image."""
    return self.images.shape[1:]


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array


@functools.cache
def _load_arrays() -> dict[str, np.ndarray]:
  """Reads every array of the bundled ``.npz`` file once."""
  resource = importlib.resources.files("spear_jax")
  for part in _RESOURCE:
    resource = resource / part
  with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    return {key: npz[key] for key in npz.files}


@functools.cache
def load_bundled(name: str = "cifar_like") -> ImageSet:
  """Loads a bundled image set.

  Args:
    name: One of ``"cifar_like"``, ``"faces"``, ``"digits"``.

  Returns:
    The image set, with float32 images in [0, 1] of shape ``(N, H, W, C)``.

  Raises:
    ValueError: If ``name`` is not a bundled set.
  """
  if name not in NAMES:
    raise ValueError(
      f"Unknown bundled image set {name!r}; valid names: {', '.join(NAMES)}."
    )
  arrays = _load_arrays()
  images = arrays[name].astype(np.float32) / np.float32(255.0)
  if images.ndim == 3:
    images = images[..., np.newaxis]
  labels = arrays.get(f"{name}_labels")
  if labels is not None:
    labels = _read_only(labels.astype(np.int64))
  if f"{name}_mean" in arrays:
    mean = arrays[f"{name}_mean"].astype(np.float32)
    std = arrays[f"{name}_std"].astype(np.float32)
  else:
    mean = images.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = images.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  return ImageSet(
    images=_read_only(images),
    labels=labels,
    mean=_read_only(mean),
    std=_read_only(std),
    name=name,
  )


def normalize(
  images: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
  """Standardizes images per channel: ``(images - mean) / std``.

  Args:
    images: ``(..., C)`` array, e.g. ``(N, H, W, C)``.
    mean: ``(C,)`` per-channel mean.
    std: ``(C,)`` per-channel standard deviation.

  Returns:
    Array of the broadcast shape, float32 for float32 or integer inputs.
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32)
  return (images - np.asarray(mean)) / np.asarray(std)


def denormalize(
  images: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
  """Inverts ``normalize``: ``images * std + mean``.

  Args:
    images: ``(..., C)`` normalized array.
    mean: ``(C,)`` per-channel mean.
    std: ``(C,)`` per-channel standard deviation.

  Returns:
    Array of the broadcast shape.
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32)
  return images * np.asarray(std) + np.asarray(mean)


def _check_int(value: int | np.integer, what: str) -> int:
  """Returns ``value`` as an ``int``; raises TypeError for a non-integer."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{what} must be an int, got {type(value).__name__}.")
  return int(value)


def sample_batch(
  seed: int | np.integer, image_set: ImageSet, batch_size: int | np.integer
) -> tuple[np.ndarray, np.ndarray]:
  """Samples a batch of distinct images, normalized and flattened.

  Args:
    seed: Non-negative integer seed for a numpy ``Generator``; the same seed
      gives the same batch.
    image_set: Set to sample from, e.g. from ``load_bundled``.
    batch_size: Number of images ``b``, from 1 to ``image_set.num_images``.

  Returns:
    ``(batch, indices)``: float32 ``(b, n)`` images, ``n = H * W * C``,
    normalized with ``image_set.mean`` and ``image_set.std`` and flattened
    one sample per row, and the int64 ``(b,)`` distinct indices into
    ``image_set.images``.

  Raises:
    TypeError: If ``seed`` or ``batch_size`` is not an integer.
    ValueError: If ``seed`` is negative or ``batch_size`` is out of range.
  """
  seed = _check_int(seed, "seed")
  batch_size = _check_int(batch_size, "batch_size")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}.")
  num_images = image_set.num_images
  if not 1 <= batch_size <= num_images:
    raise ValueError(
      f"batch_size must be between 1 and {num_images} (the number of images"
      f" in {image_set.name!r}), got {batch_size}."
    )
  rng = np.random.default_rng(seed)
  indices = rng.choice(num_images, size=batch_size, replace=False)
  indices = indices.astype(np.int64)
  batch = normalize(image_set.images[indices], image_set.mean, image_set.std)
  batch = batch.reshape(batch_size, -1).astype(np.float32, copy=False)
  return batch, indices
