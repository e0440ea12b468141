"""Runs a script on a mocked, "prepared" tensorflow-datasets set.

``python tfds_mock_run.py SCRIPT ARGS...`` runs ``scripts/SCRIPT`` as
``__main__`` inside ``tfds.testing.mock_data``, whose data source is
replaced by a list of random photographs with labels: of random sizes
(uint8, 3 channels, larger than 224 on both sides) where the builder's
image shape is open, what ``tfds build`` of ImageNet or Imagenette would
serve; of the builder's shape where it is fixed (MNIST, CIFAR). No
TensorFlow, no download. ``MOCK_EXAMPLES`` (default 12) sets how many.
"""

import os
import runpy
import sys

import numpy as np
import tensorflow_datasets as tfds

_SCRIPTS = os.path.join(os.path.dirname(__file__), os.pardir, "scripts")


class _Source:
  """A random-access split: ``len``, ``[i]`` and ``dataset_info``."""

  def __init__(self, info, count=12, seed=0):
    self.dataset_info = info
    rng = np.random.default_rng(seed)
    fixed = tuple(info.features["image"].shape)

    def shape():
      if None not in fixed:
        return fixed
      return (*rng.integers(230, 320, size=2), 3)

    self._items = [
      {
        "image": rng.integers(0, 256, shape(), dtype=np.uint8),
        "label": int(rng.integers(10)),
      }
      for _ in range(count)
    ]

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    return self._items[index]


def _as_data_source(builder, split, decoders=None, **kwargs):
  del split, decoders, kwargs
  return _Source(builder.info, int(os.environ.get("MOCK_EXAMPLES", "12")))


if __name__ == "__main__":
  script = os.path.join(_SCRIPTS, sys.argv[1])
  sys.path.insert(0, _SCRIPTS)
  sys.argv = [script, *sys.argv[2:]]
  with tfds.testing.mock_data(
    policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=_as_data_source
  ):
    runpy.run_path(script, run_name="__main__")
