"""Generates the small natural-image sets bundled with ``spear_jax``.

Writes one compressed ``.npz`` file (default
``spear_jax/data/bundled_images.npz``) with these arrays:

* ``cifar_like``: uint8 ``(N, 32, 32, 3)`` RGB patches, cropped at random
  from scikit-image's bundled photographs after downscaling each photograph
  by a few random factors, so that a 32x32 crop shows an object-scale region.
  Nearly flat patches (mean per-channel spatial std below 10 on the 0..255
  scale) are dropped. Patches from all photographs are shuffled.
* ``cifar_like_source``: ``(N,)`` strings naming each patch's photograph.
* ``cifar_like_mean``, ``cifar_like_std``: float32 ``(3,)`` per-channel mean
  and standard deviation of ``cifar_like`` in [0, 1] units.
* ``faces``: uint8 ``(200, 25, 25)`` from ``skimage.data.lfw_subset()``.
  The first 100 are faces, the last 100 are non-face background crops.
* ``faces_labels``: int64 ``(200,)``, 1 for a face and 0 for a non-face.
* ``digits``: uint8 ``(1797, 8, 8)`` from ``sklearn.datasets.load_digits()``,
  scaled from 0..16 to 0..255.
* ``digits_labels``: int64 ``(1797,)`` digit classes 0..9.

Everything comes from data shipped inside the scikit-image and scikit-learn
wheels, so the script runs offline. The output is deterministic given
``--seed`` (and the library versions). scikit-image and scikit-learn are only
needed here, not by ``spear_jax`` at run time.

Usage:
  python scripts/make_bundled_images.py \
      --output=spear_jax/data/bundled_images.npz --seed=0
"""

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

_OUTPUT = flags.DEFINE_string(
  "output",
  "spear_jax/data/bundled_images.npz",
  "Path of the .npz file to write.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for scales, crops and shuffle.")

# RGB photographs in skimage.data. Those that need a download (pooch) are
# skipped at run time; colorwheel, logo and the binary horse are not natural
# photographs and are not listed. cat is the same image as chelsea.
_PHOTO_NAMES = (
  "astronaut",
  "chelsea",
  "coffee",
  "rocket",
  "immunohistochemistry",
)
_NUM_PATCHES = 256
_PATCH = 32
_SCALES_PER_PHOTO = 3
# Short side of the downscaled photograph, in pixels, drawn uniformly from
# this range, so a 32x32 crop covers roughly a fifth to a half of it.
_SHORT_SIDE_RANGE = (64, 160)
# Patches whose spatial standard deviation (per channel, averaged over the
# channels, 0..255 units) is below this are considered nearly flat and
# dropped. Measuring it per channel keeps a flat coloured patch (e.g. blue
# sky) from passing on the spread between its channels.
_MIN_PATCH_STD = 10.0
_MAX_DRAWS_PER_PHOTO = 10_000


def _load_photos() -> dict[str, np.ndarray]:
  """Loads the photographs that are available offline.

  Returns:
    Mapping from photograph name to uint8 ``(H, W, 3)`` array.

  Raises:
    RuntimeError: If no photograph could be loaded.
  """
  import skimage.data  # pylint: disable=g-import-not-at-top

  photos = {}
  for name in _PHOTO_NAMES:
    try:
      image = getattr(skimage.data, name)()
    except (AttributeError, ImportError, OSError, ValueError) as e:
      # AttributeError: not in this skimage version; ImportError: needs the
      # optional pooch download; OSError/ValueError: missing or bad file.
      logging.warning("Skipping skimage.data.%s: %s", name, e)
      continue
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      logging.warning(
        "Skipping skimage.data.%s: not uint8 RGB (shape %s, dtype %s)",
        name,
        image.shape,
        image.dtype,
      )
      continue
    photos[name] = image
    logging.info("Loaded skimage.data.%s %s", name, image.shape)
  if not photos:
    raise RuntimeError("No skimage.data photograph loaded offline.")
  return photos


def _downscale(image: np.ndarray, short_side: int) -> np.ndarray:
  """Downscales an RGB uint8 image so its short side is ``short_side``."""
  import skimage.transform  # pylint: disable=g-import-not-at-top

  height, width = image.shape[:2]
  factor = short_side / min(height, width)
  shape = (round(height * factor), round(width * factor), 3)
  small = skimage.transform.resize(
    image, shape, anti_aliasing=True, preserve_range=True
  )
  return np.clip(np.round(small), 0, 255).astype(np.uint8)


def _patch_std(patch: np.ndarray) -> float:
  """Spatial standard deviation of a ``(H, W, C)`` patch, mean over C."""
  return float(patch.astype(np.float64).std(axis=(0, 1)).mean())


def _photo_patches(
  image: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
  """Takes ``count`` non-flat random 32x32 crops of downscaled copies.

  Args:
    image: uint8 ``(H, W, 3)`` photograph.
    count: Number of patches to return.
    rng: Random generator for scales and crop positions.

  Returns:
    uint8 ``(count, 32, 32, 3)`` array.

  Raises:
    RuntimeError: If too few non-flat patches are found.
  """
  low, high = _SHORT_SIDE_RANGE
  high = min(high, min(image.shape[:2]))
  short_sides = rng.integers(low, high, size=_SCALES_PER_PHOTO, endpoint=True)
  scaled = [_downscale(image, int(s)) for s in short_sides]
  patches = []
  for _ in range(_MAX_DRAWS_PER_PHOTO):
    if len(patches) == count:
      break
    # Cycle through the scales so each contributes about equally.
    small = scaled[len(patches) % len(scaled)]
    top = rng.integers(0, small.shape[0] - _PATCH, endpoint=True)
    left = rng.integers(0, small.shape[1] - _PATCH, endpoint=True)
    patch = small[top : top + _PATCH, left : left + _PATCH]
    if _patch_std(patch) >= _MIN_PATCH_STD:
      patches.append(patch)
  if len(patches) < count:
    raise RuntimeError(
      f"Found only {len(patches)} of {count} non-flat patches."
    )
  return np.stack(patches)


def make_cifar_like(
  seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Builds the CIFAR-like patch set.

  Args:
    seed: Seed for scales, crop positions and the final shuffle.

  Returns:
    ``(patches, sources, mean, std)``: uint8 ``(N, 32, 32, 3)`` patches,
    ``(N,)`` source photograph names, and float32 ``(3,)`` per-channel mean
    and standard deviation in [0, 1] units.
  """
  rng = np.random.default_rng(seed)
  photos = _load_photos()
  names = sorted(photos)
  counts = [_NUM_PATCHES // len(names)] * len(names)
  for i in range(_NUM_PATCHES % len(names)):
    counts[i] += 1
  patches, sources = [], []
  for name, count in zip(names, counts, strict=True):
    patches.append(_photo_patches(photos[name], count, rng))
    sources.extend([name] * count)
  patches = np.concatenate(patches)
  sources = np.array(sources)
  order = rng.permutation(len(patches))
  patches, sources = patches[order], sources[order]
  unit = patches.astype(np.float64) / 255.0
  mean = unit.mean(axis=(0, 1, 2)).astype(np.float32)
  std = unit.std(axis=(0, 1, 2)).astype(np.float32)
  return patches, sources, mean, std


def make_faces() -> tuple[np.ndarray, np.ndarray]:
  """Returns LFW-subset images as uint8 and face (1) / non-face (0) labels."""
  import skimage.data  # pylint: disable=g-import-not-at-top

  images = np.asarray(skimage.data.lfw_subset(), dtype=np.float64)
  images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
  # Per the skimage docs the first 100 are faces and the rest non-faces.
  labels = np.zeros(len(images), dtype=np.int64)
  labels[:100] = 1
  return images, labels


def make_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn digits scaled to uint8 0..255 and their labels."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top

  digits = sklearn.datasets.load_digits()
  images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255)
  return images.astype(np.uint8), digits.target.astype(np.int64)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  patches, sources, mean, std = make_cifar_like(_SEED.value)
  faces, faces_labels = make_faces()
  digits, digits_labels = make_digits()
  output = _OUTPUT.value
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  with open(output, "wb") as f:
    np.savez_compressed(
      f,
      cifar_like=patches,
      cifar_like_source=sources,
      cifar_like_mean=mean,
      cifar_like_std=std,
      faces=faces,
      faces_labels=faces_labels,
      digits=digits,
      digits_labels=digits_labels,
    )
  counts = {str(n): int((sources == n).sum()) for n in np.unique(sources)}
  logging.info("cifar_like %s from %s", patches.shape, counts)
  logging.info("cifar_like mean %s std %s", mean, std)
  logging.info("faces %s, digits %s", faces.shape, digits.shape)
  logging.info("Wrote %s (%d bytes)", output, os.path.getsize(output))


if __name__ == "__main__":
  app.run(main)
