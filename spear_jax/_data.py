"""Image data: small sets bundled with ``spear_jax``, and tfds loaders.

Two sources of images, one type (``ImageSet``) and one entry point
(``load_dataset``) for both:

* Bundled sets, usable offline with numpy only (``load_bundled``).
* Standard datasets (MNIST, CIFAR-10/100, ImageNet-style) read through
  ``tfds.data_source`` from array_record files that the user prepared in a
  ``data_dir`` beforehand (``load_tfds``). Nothing is downloaded: records are
  read and decoded only when indexed (``LazyArray``), so a batch of ImageNet
  costs a batch of reads, not the split. tensorflow-datasets is imported only
  when such a dataset is requested, and TensorFlow is never needed to read.

The bundled images live in the package data file
``spear_jax/data/bundled_images.npz``, written by
``scripts/make_bundled_images.py`` from photographs and datasets shipped
inside scikit-image and scikit-learn. Loading them needs only numpy.

Bundled sets, by name:

* ``"cifar_like"``: 256 RGB 32x32 patches of scikit-image photographs
  (astronaut, chelsea, coffee, rocket, immunohistochemistry), no labels.
* ``"faces"``: 200 grayscale 25x25 images from the LFW subset in
  scikit-image; labels are 1 for the first 100 (faces) and 0 for the last
  100 (non-face background crops).
* ``"digits"``: 1797 grayscale 8x8 handwritten digits from scikit-learn;
  labels are the digit classes 0..9.

tfds datasets, by name (``TFDS_NAMES``): ``"mnist"``, ``"cifar10"``,
``"cifar100"``, ``"imagenet2012"``, ``"imagenette"`` (full size),
``"imagenette/320px-v2"``, ``"imagenette/160px-v2"``,
``"imagenet_resized/32x32"`` and ``"imagenet_resized/64x64"`` (downsampled
ImageNet; tfds has no Tiny ImageNet).

Example:
  >>> from spear_jax import _data
  >>> images = _data.load_dataset("cifar_like")
  >>> batch, indices = _data.sample_batch(0, images, batch_size=64)
  >>> batch.shape
  (64, 3072)
"""

import collections.abc
import dataclasses
import functools
import importlib.resources
import importlib.util
import numbers
import os
from typing import Any, cast

import numpy as np
import numpy.typing as npt

NAMES = ("cifar_like", "faces", "digits")
_RESOURCE = ("data", "bundled_images.npz")

# Per-channel mean and standard deviation of the standard datasets, for
# images scaled to [0, 1], as commonly published:
# * MNIST: 0.1307 and 0.3081, over the 60k training images, as in the
#   PyTorch MNIST example (github.com/pytorch/examples, mnist/main.py).
# * CIFAR-10: per-pixel statistics of the 50k training images; the often
#   copied std (0.2023, 0.1994, 0.2010) is not the per-pixel std (see
#   github.com/kuangliu/pytorch-cifar/issues/19).
# * CIFAR-100: training-set statistics, e.g. in
#   github.com/weiaicunzai/pytorch-cifar100 (conf/global_settings.py).
# * ImageNet (also used for Imagenette and downsampled ImageNet): the
#   torchvision values (pytorch.org/vision/stable/models.html).
_MNIST_STATS = ((0.1307,), (0.3081,))
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  """How to read one tfds dataset.

  Attributes:
    tfds_name: Full tfds name, with the config where the builder has several
      (``tfds build`` of a bare name builds every config).
    stats: ``(mean, std)`` per channel.
    image_size: Default side of the square images, or ``None`` for a set of
      fixed-size images kept at their size.
    build_flags: Extra ``tfds build`` flags needed to prepare the set.
  """

  tfds_name: str
  stats: tuple[tuple[float, ...], tuple[float, ...]]
  image_size: int | None = None
  build_flags: str = ""


_TFDS_SPECS = {
  "mnist": _TfdsSpec("mnist", _MNIST_STATS),
  "cifar10": _TfdsSpec("cifar10", _CIFAR10_STATS),
  "cifar100": _TfdsSpec("cifar100", _CIFAR100_STATS),
  "imagenet2012": _TfdsSpec(
    "imagenet2012",
    _IMAGENET_STATS,
    224,
    # tfds cannot download ImageNet: the user fetches the archives.
    " --manual_dir=MANUAL_DIR, MANUAL_DIR holding ILSVRC2012_img_train.tar"
    " and ILSVRC2012_img_val.tar from image-net.org",
  ),
  "imagenette": _TfdsSpec("imagenette/full-size-v2", _IMAGENET_STATS, 224),
  "imagenette/320px-v2": _TfdsSpec("imagenette/320px-v2", _IMAGENET_STATS, 224),
  "imagenette/160px-v2": _TfdsSpec("imagenette/160px-v2", _IMAGENET_STATS, 160),
  "imagenet_resized/32x32": _TfdsSpec(
    "imagenet_resized/32x32", _IMAGENET_STATS
  ),
  "imagenet_resized/64x64": _TfdsSpec(
    "imagenet_resized/64x64", _IMAGENET_STATS
  ),
}
TFDS_NAMES = tuple(_TFDS_SPECS)
# Hard cases built from the bundled photographs (see ``load_near_duplicates``).
NEAR_DUPLICATE_NAMES = (
  "cifar_like_dark",
  "cifar_like_shifted",
  "cifar_like_crops",
  "cifar_like_lowcontrast",
)
DATASET_NAMES = NAMES + NEAR_DUPLICATE_NAMES + TFDS_NAMES


class LazyArray:
  """A read-only array whose items are read from a data source on indexing.

  Item ``i`` is ``convert(source[i][feature])``. Indexing with an int, a
  slice or an integer array reads and converts only those records and
  returns a numpy array, so ``images[indices]`` of a ``LazyArray`` gives the
  same as for an in-memory array. Further axes may follow
  (``images[indices, ..., 0]``); boolean masks are not supported.
  ``np.asarray`` reads every record: use it only on small splits.

  Attributes:
    shape: ``(N, *item_shape)``.
    dtype: dtype of the converted items.
    ndim: ``len(shape)``.
  """

  def __init__(
    self,
    source: collections.abc.Sequence[Any],
    feature: str,
    item_shape: tuple[int, ...],
    dtype: np.dtype | type,
    convert: collections.abc.Callable[[Any], npt.ArrayLike],
  ):
    """Wraps ``source``.

    Args:
      source: Random-access sequence of records (mappings of features), such
        as a ``tfds.data_source`` split.
      feature: Key of the feature to read from each record.
      item_shape: Shape of one converted item.
      dtype: dtype of the converted items.
      convert: Function from the raw feature to the item.
    """
    self._source = source
    self._feature = feature
    self._convert = convert
    self.shape = (len(source), *item_shape)
    self.dtype = np.dtype(dtype)
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return (
      f"LazyArray(feature={self._feature!r}, shape={self.shape},"
      f" dtype={self.dtype})"
    )

  def _index(self, index: int | np.integer | numbers.Integral) -> int:
    """Returns ``index`` as a non-negative int; raises IndexError if out."""
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(
        f"index {index} is out of bounds for {len(self)} records."
      )
    return index % len(self)

  def _read(self, indices: collections.abc.Iterable[int]) -> np.ndarray:
    items = [self._convert(self._source[i][self._feature]) for i in indices]
    if not items:
      return np.empty((0, *self.shape[1:]), self.dtype)
    return np.stack(items).astype(self.dtype, copy=False)

  def __getitem__(self, key: Any) -> np.ndarray:
    rest = ()
    if isinstance(key, tuple):
      key, rest = (key[0], key[1:]) if key else (slice(None), ())
    # Read the records that the first index selects, then index them with an
    # equivalent first index, so that numpy's rules apply to the whole key.
    records: collections.abc.Sequence[int]
    first: int | slice | np.ndarray
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
      records, first = [self._index(key)], 0
    elif isinstance(key, slice):
      records, first = range(*key.indices(len(self))), slice(None)
    else:
      indices = np.asarray(key)
      if indices.dtype == bool or not np.issubdtype(indices.dtype, np.integer):
        raise IndexError(
          "LazyArray takes an int, a slice or an integer array as first"
          f" index, got {type(key).__name__}."
        )
      records = [self._index(i) for i in indices.ravel()]
      first = np.arange(len(records)).reshape(indices.shape)
    return self._read(records)[(first, *rest)]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # Every read is a new array.
    out = self[:]
    return out if dtype is None else out.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """A set of images: bundled (in memory) or tfds (read on indexing).

  The arrays of a bundled set are read-only: they are shared between calls
  to ``load_bundled``. Copy them before changing them. A tfds set holds
  ``LazyArray`` views instead, which read and decode only the records
  indexed; both kinds index the same way (``images[indices]``).

  Attributes:
    images: float32 ``(N, H, W, C)`` in [0, 1]; grayscale sets have ``C == 1``.
    labels: int64 ``(N,)`` labels, or ``None`` for an unlabelled set.
    mean: float32 ``(C,)`` per-channel mean: of ``images`` for a bundled
      set, the dataset's published constants for a tfds set.
    std: float32 ``(C,)`` per-channel standard deviation, likewise.
    name: Name of the set, one of ``DATASET_NAMES``.
  """

  images: np.ndarray | LazyArray
  labels: np.ndarray | LazyArray | None
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
    # images is (N, H, W, C) by contract; numpy types shapes as tuple[Any].
    return cast(tuple[int, int, int], self.images.shape[1:])


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


@functools.cache
def load_near_duplicates(name: str) -> ImageSet:
  """Batches full of near-twins, built from the bundled photographs.

  Near-duplicate samples share most of their ReLU zero sets, the hard case
  of SPEAR and SPEAR++ (medical scans, video frames, dark images). Both
  sets keep ``cifar_like``'s normalization, as a deployment normalizes with
  its dataset's statistics, not the batch's:

  * ``"cifar_like_dark"``: every ``cifar_like`` patch darkened to 5-25 % of
    its brightness (mostly-dark images; after normalization they all lie
    near the normalized black image).
  * ``"cifar_like_shifted"``: 32 patches, each in 8 versions shifted by up
    to 1 pixel (edge-padded) with brightness changed by up to 5 % (256
    images: groups of near-identical frames; in a batch of 64, 53-59 % of
    the samples have a partner above cosine 0.95).
  * ``"cifar_like_crops"``: 32 patches, each upsampled to 35 x 35 and cut
    into 8 overlapping 32 x 32 crops at distinct random offsets (256
    images: the random-crop augmentation or a panning camera; crops of one
    photograph share 82-97 % of their pixels' area).
  * ``"cifar_like_lowcontrast"``: every patch's contrast cut to 10-30 %
    around its mean colour, brightness within 5 % (foggy, flat or washed-out
    images: distinct photographs that all lie near a few flat colours).

  The construction is deterministic (seed 0).

  Args:
    name: one of ``NEAR_DUPLICATE_NAMES``.

  Returns:
    The image set (float32 in [0, 1], ``(N, 32, 32, 3)``).
  """
  if name not in NEAR_DUPLICATE_NAMES:
    raise ValueError(
      f"Unknown near-duplicate set {name!r}; valid names: "
      f"{', '.join(NEAR_DUPLICATE_NAMES)}."
    )
  base = load_bundled("cifar_like")
  rng = np.random.default_rng(0)
  images = np.asarray(base.images)
  if name == "cifar_like_dark":
    scale = rng.uniform(0.05, 0.25, (images.shape[0], 1, 1, 1))
    out = images * scale.astype(np.float32)
  elif name == "cifar_like_crops":
    weights = _resize_weights(32, 35).astype(np.float32)
    large = np.einsum("yi,xj,nijc->nyxc", weights, weights, images[:32])
    offsets = rng.choice(16, 8, replace=False)  # distinct: no exact copies
    versions = [
      large[:, o // 4 : o // 4 + 32, o % 4 : o % 4 + 32] for o in offsets
    ]
    out = np.clip(np.stack(versions, axis=1), 0.0, 1.0)
    out = out.reshape(-1, *images.shape[1:])
  elif name == "cifar_like_lowcontrast":
    mean = images.mean(axis=(1, 2), keepdims=True)
    contrast = rng.uniform(0.1, 0.3, (images.shape[0], 1, 1, 1))
    gain = rng.uniform(0.95, 1.05, (images.shape[0], 1, 1, 1))
    out = np.clip(gain * (mean + contrast * (images - mean)), 0.0, 1.0)
  else:
    padded = np.pad(images[:32], ((0, 0), (1, 1), (1, 1), (0, 0)), "edge")
    versions = []
    for dy, dx in rng.integers(0, 3, (8, 2)):
      crop = padded[:, dy : dy + 32, dx : dx + 32]
      gain = rng.uniform(0.95, 1.05, (32, 1, 1, 1)).astype(np.float32)
      versions.append(np.clip(crop * gain, 0.0, 1.0))
    out = np.stack(versions, axis=1).reshape(-1, *images.shape[1:])
  return ImageSet(
    images=_read_only(out.astype(np.float32)),
    labels=None,
    mean=base.mean,
    std=base.std,
    name=name,
  )


def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """Antialiased linear-interpolation weights, ``(out_size, in_size)``.

  Output pixel ``i`` samples the input at ``x_i = (i + 1/2) / r - 1/2``,
  ``r = out_size / in_size``, with the triangle kernel
  ``w_ij = max(0, 1 - |x_i - j| / s)``, widened by ``s = max(1 / r, 1)``
  when downsampling (a low-pass filter against aliasing); each row is
  normalized to sum to one. This is ``jax.image.resize(...,
  method="linear", antialias=True)`` along one axis.
  """
  ratio = out_size / in_size
  kernel_scale = max(1.0 / ratio, 1.0)
  centers = (np.arange(out_size) + 0.5) / ratio - 0.5
  distance = np.abs(centers[:, np.newaxis] - np.arange(in_size))
  weights = np.maximum(0.0, 1.0 - distance / kernel_scale)
  return weights / weights.sum(axis=1, keepdims=True)


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Crops the central square of an image and resizes it to ``size``.

  The crop is the largest centred square, ``min(H, W)`` on a side; the
  resize is antialiased bilinear (``_resize_weights``), done in numpy as
  two matrix products, rows then columns.

  Args:
    image: float ``(H, W, C)`` image.
    size: Side of the output.

  Returns:
    float32 ``(size, size, C)`` image; values stay in the input's range.
  """
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = np.asarray(image[top : top + side, left : left + side], np.float32)
  if side == size:
    return image
  channels = image.shape[-1]
  weights = _resize_weights(side, size).astype(np.float32)
  # Resize the rows, then the columns; each step is one 2-D matmul.
  rows = (weights @ image.reshape(side, side * channels)).reshape(
    size, side, channels
  )
  cols = weights @ rows.transpose(1, 0, 2).reshape(side, size * channels)
  return cols.reshape(size, size, channels).transpose(1, 0, 2)


def _decode_image(
  image: np.ndarray, size: int | None, channels: int
) -> np.ndarray:
  """Scales a decoded uint8 image to [0, 1], then crops and resizes it."""
  image = np.asarray(image, np.float32) / np.float32(255.0)
  if image.ndim == 2:
    image = image[..., np.newaxis]
  if image.shape[-1] != channels:
    raise ValueError(
      f"Expected {channels} channels, got an image of shape {image.shape}."
    )
  if size is not None:
    image = np.clip(_center_crop_resize(image, size), 0.0, 1.0)
  return image


def _import_tfds() -> Any:
  """Imports tensorflow_datasets, with the install command on failure."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ImportError(
      "Loading a tensorflow-datasets set needs tensorflow-datasets; install"
      ' it with: pip install -e ".[datasets]"'
    ) from err
  if all(importlib.util.find_spec(m) is None for m in ("PIL", "cv2")):
    raise ImportError(
      "Decoding tensorflow-datasets images needs Pillow (or OpenCV); install"
      ' it with: pip install -e ".[datasets]"'
    )
  return tfds


def _check_tfds_args(
  name: str, image_size: int | None
) -> tuple[_TfdsSpec, int | None]:
  """The spec of ``name`` and ``image_size`` as an int (or ``None``).

  Raises:
    ValueError: If ``name`` is not in ``TFDS_NAMES`` or ``image_size`` is
      not positive.
  """
  if name not in _TFDS_SPECS:
    raise ValueError(
      f"Unknown tensorflow-datasets set {name!r}; valid names:"
      f" {', '.join(TFDS_NAMES)}."
    )
  if image_size is not None:
    image_size = _check_int(image_size, "image_size")
    if image_size < 1:
      raise ValueError(f"image_size must be positive, got {image_size}.")
  return _TFDS_SPECS[name], image_size


def _tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """``data_dir`` as a path string, ``None`` being tfds's default.

  The default is ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``; ``~``
  is expanded.
  """
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.expanduser(os.fspath(data_dir))


def _open_tfds_source(
  tfds: Any, name: str, spec: _TfdsSpec, split: str, data_dir: str
) -> Any:
  """Opens the array_record data source of ``name`` in ``data_dir``.

  Raises:
    FileNotFoundError: If ``data_dir`` does not exist or the dataset is not
      prepared in it as array_record, with the command that prepares it.
    ValueError: From tfds, e.g. if ``split`` is not a split of the set.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top

  build = (
    f"tfds build {spec.tfds_name} --data_dir={data_dir}"
    f" --file_format=array_record{spec.build_flags}"
  )
  if not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(
      f"data_dir {data_dir!r} does not exist; prepare {name!r} in it (on a"
      f" machine with internet and tensorflow) with: {build}"
    )
  try:
    return tfds.data_source(
      spec.tfds_name, split=split, data_dir=data_dir, download=False
    )
  except (NotImplementedError, ValueError) as err:
    # tfds reports a missing dataset as an unsupported file format.
    if not tfds.builder(spec.tfds_name, data_dir=data_dir).is_prepared():
      raise FileNotFoundError(
        f"{name!r} is not prepared in {data_dir!r}; prepare it (on a machine"
        f" with internet and tensorflow) with: {build}"
      ) from err
    if isinstance(err, NotImplementedError):
      raise FileNotFoundError(
        f"{name!r} is prepared in {data_dir!r} but not as array_record, which"
        " random access needs; delete it (or use another data_dir) and"
        f" rebuild it with: {build}"
      ) from err
    raise


def _lazy_tfds_images(
  source: Any, spec: _TfdsSpec, image_size: int | None
) -> LazyArray:
  """The images of ``source``, decoded to float32 [0, 1] when indexed.

  Images are cropped and resized to ``image_size``, else to the spec's
  default size; a set without one (fixed-size images) keeps their shape.
  """
  *native_shape, channels = source.dataset_info.features["image"].shape
  size = spec.image_size if image_size is None else image_size
  if size is None:
    item_shape = (*native_shape, channels)
  else:
    item_shape = (size, size, channels)
  return LazyArray(
    source,
    "image",
    item_shape,
    np.float32,
    functools.partial(_decode_image, size=size, channels=channels),
  )


def _lazy_tfds_labels(
  tfds: Any, spec: _TfdsSpec, split: str, data_dir: str
) -> LazyArray:
  """The int64 labels, through a second view that skips image decoding.

  Reading ``labels[i]`` is then cheap: the image is not decoded.
  """
  label_source = tfds.data_source(
    spec.tfds_name,
    split=split,
    data_dir=data_dir,
    download=False,
    decoders={"image": tfds.decode.SkipDecoding()},
  )
  return LazyArray(label_source, "label", (), np.int64, np.int64)


def load_tfds(
  name: str,
  *,
  split: str = "train",
  data_dir: str | os.PathLike[str] | None = None,
  image_size: int | None = None,
) -> ImageSet:
  """Opens a prepared tensorflow-datasets split for random access.

  Reads the array_record files of ``name`` in ``data_dir`` through
  ``tfds.data_source(..., download=False)``: nothing is downloaded and
  TensorFlow is not needed. Nothing is read up front either: the returned
  ``LazyArray`` views read and decode a record when it is indexed, so
  ``sample_batch`` on ImageNet reads ``b`` images. Pixels are scaled to
  [0, 1]; with an image size, the central square of each image is cropped
  and resized to it (antialiased bilinear, in numpy).

  Args:
    name: One of ``TFDS_NAMES``.
    split: A tfds split of the dataset, e.g. ``"train"``, ``"test"``,
      ``"validation"``, or a slice of one such as ``"train[:1000]"``.
    data_dir: The directory the dataset was prepared in (``tfds build
      --data_dir``). ``None`` is tfds's default: ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``.
    image_size: Side of the square images returned. ``None`` keeps
      fixed-size images (MNIST, CIFAR, downsampled ImageNet) as they are,
      and crops and resizes variable-size ones (ImageNet, Imagenette) to
      224, or 160 for ``"imagenette/160px-v2"``.

  Returns:
    The image set: ``LazyArray`` images, float32 ``(N, S, S, C)`` in
    [0, 1], and labels, int64 ``(N,)``, and the dataset's published
    per-channel mean and std.

  Raises:
    ValueError: If ``name`` is not in ``TFDS_NAMES``, ``split`` is not a
      split of it, or ``image_size`` is not positive.
    FileNotFoundError: If ``data_dir`` does not exist or the dataset is not
      prepared in it as array_record; the message gives the command that
      prepares it.
    ImportError: If tensorflow-datasets, or both Pillow and OpenCV, are
      missing.
  """
  spec, image_size = _check_tfds_args(name, image_size)
  tfds = _import_tfds()
  data_dir = _tfds_data_dir(data_dir)
  source = _open_tfds_source(tfds, name, spec, split, data_dir)
  images = _lazy_tfds_images(source, spec, image_size)
  labels = None
  if "label" in source.dataset_info.features:
    labels = _lazy_tfds_labels(tfds, spec, split, data_dir)
  mean, std = spec.stats
  return ImageSet(
    images=images,
    labels=labels,
    mean=_read_only(np.array(mean, np.float32)),
    std=_read_only(np.array(std, np.float32)),
    name=name,
  )


def load_dataset(
  name: str,
  *,
  data_dir: str | os.PathLike[str] | None = None,
  split: str | None = None,
  image_size: int | None = None,
) -> ImageSet:
  """Loads an image set by name: bundled, or from tensorflow-datasets.

  The one entry point for scripts: their ``--dataset`` and ``--data_dir``
  flags map straight onto ``name`` and ``data_dir``.

  Args:
    name: One of ``DATASET_NAMES``: a bundled set (``NAMES``, see
      ``load_bundled``) or a tfds set (``TFDS_NAMES``, see ``load_tfds``).
    data_dir: tfds data directory; ignored for bundled sets, which ship with
      the package, so one ``--data_dir`` serves a sweep over both kinds.
    split: tfds split, ``"train"`` if ``None``; bundled sets have none.
    image_size: tfds image side (see ``load_tfds``); bundled sets have a
      fixed size.

  Returns:
    The image set.

  Raises:
    ValueError: If ``name`` is unknown (the message lists the valid names),
      or ``split`` or ``image_size`` is given for a bundled set.
    FileNotFoundError: See ``load_tfds``.
    ImportError: See ``load_tfds``.
  """
  if name in NAMES:
    if split is not None or image_size is not None:
      raise ValueError(
        f"The bundled set {name!r} has no splits and a fixed image size;"
        " split and image_size apply to tensorflow-datasets sets only."
      )
    return load_bundled(name)
  if name in NEAR_DUPLICATE_NAMES:
    if split is not None or image_size is not None:
      raise ValueError(f"{name!r} has no splits and a fixed image size.")
    return load_near_duplicates(name)
  if name in _TFDS_SPECS:
    return load_tfds(
      name,
      split="train" if split is None else split,
      data_dir=data_dir,
      image_size=image_size,
    )
  raise ValueError(
    f"Unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}."
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
    image_set: Set to sample from, e.g. from ``load_dataset``; only the
      ``b`` sampled images are read from a tfds set.
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
