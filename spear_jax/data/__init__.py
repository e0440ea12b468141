"""Private batches: real images shipped with the package, and tfds sets.

:func:`load_bundled` reads the offline sets in this folder
(``bundled_images.npz``); :func:`load_dataset` also reads tfds datasets
prepared in the array_record format, lazily and without TensorFlow.
"""

from spear_jax._data import DATASET_NAMES as DATASET_NAMES
from spear_jax._data import NEAR_DUPLICATE_NAMES as NEAR_DUPLICATE_NAMES
from spear_jax._data import TFDS_NAMES as TFDS_NAMES
from spear_jax._data import ImageSet as ImageSet
from spear_jax._data import LazyArray as LazyArray
from spear_jax._data import denormalize as denormalize
from spear_jax._data import load_bundled as load_bundled
from spear_jax._data import load_dataset as load_dataset
from spear_jax._data import load_near_duplicates as load_near_duplicates
from spear_jax._data import load_tfds as load_tfds
from spear_jax._data import normalize as normalize
from spear_jax._data import sample_batch as sample_batch

__all__ = [
  "DATASET_NAMES",
  "NEAR_DUPLICATE_NAMES",
  "TFDS_NAMES",
  "ImageSet",
  "LazyArray",
  "denormalize",
  "load_bundled",
  "load_dataset",
  "load_near_duplicates",
  "load_tfds",
  "normalize",
  "sample_batch",
]
