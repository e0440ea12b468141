"""PNG encoding, image grids and error heatmaps."""

import io
import os
import struct
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from PIL import Image
import pytest

from spear_jax import _pictures


def _decode_png(data):
  """Checks the PNG header fields by hand, then decodes with Pillow."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad signature"
  assert data[12:16] == b"IHDR"
  width, height, depth, color, _, _, interlace = struct.unpack(
    ">IIBBBBB", data[16:29]
  )
  assert (depth, interlace) == (8, 0)
  with Image.open(io.BytesIO(data)) as opened:
    assert opened.format == "PNG"
    assert opened.mode == {0: "L", 2: "RGB"}[color]
    pixels = np.asarray(opened)
  assert pixels.shape[:2] == (height, width)
  return pixels


class PngTest(parameterized.TestCase):
  @parameterized.named_parameters(
    ("gray", (13, 7)),
    ("gray_one_channel", (5, 9, 1)),
    ("rgb", (6, 11, 3)),
    ("one_pixel", (1, 1)),
    ("wide_rgb", (2, 300, 3)),
  )
  def test_round_trip_is_pixel_exact(self, shape):
    image = np.random.default_rng().integers(0, 256, shape, np.uint8)
    decoded = _decode_png(_pictures.encode_png(image))
    np.testing.assert_array_equal(decoded, image.reshape(decoded.shape))

  def test_write_png_file(self):
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "ramp.png")
      _pictures.write_png(path, image)
      with open(path, "rb") as f:
        np.testing.assert_array_equal(_decode_png(f.read()), image)

  def test_matplotlib_reads_it(self):
    # A second reader: matplotlib's imread gives floats in [0, 1].
    image_module = pytest.importorskip("matplotlib.image")
    rng = np.random.default_rng()
    with tempfile.TemporaryDirectory() as tmp:
      for shape in ((9, 14), (9, 14, 3)):
        image = rng.integers(0, 256, shape, np.uint8)
        path = os.path.join(tmp, f"{len(shape)}.png")
        _pictures.write_png(path, image)
        np.testing.assert_array_equal(
          np.rint(image_module.imread(path) * 255).astype(np.uint8), image
        )

  @parameterized.named_parameters(
    ("float", np.zeros((4, 4)), "uint8"),
    ("four_channels", np.zeros((4, 4, 4), np.uint8), r"\(H, W, 3\)"),
    ("one_dim", np.zeros(4, np.uint8), r"\(H, W, 3\)"),
    ("empty", np.zeros((0, 4), np.uint8), "non-empty"),
  )
  def test_bad_images(self, image, message):
    with self.assertRaisesRegex(ValueError, message):
      _pictures.encode_png(image)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "bad.png")
      with self.assertRaisesRegex(ValueError, message):
        _pictures.write_png(path, image)
      self.assertFalse(os.path.exists(path))


def _constant_batch(values, h, w, c):
  """Image i is the constant values[i] (all channels)."""
  values = np.asarray(values, np.float64)
  return np.broadcast_to(values[:, None, None, None], (len(values), h, w, c))


def _origin(i, row, *, columns, th, tw, pad):
  """Documented top-left pixel of tile (sample i, row 0 truth / 1 recon)."""
  pair, column = divmod(i, columns)
  return (
    pad + pair * (2 * th + 4 * pad) + row * (th + pad),
    pad + column * (tw + pad),
  )


class ImageGridTest(parameterized.TestCase):
  def _assert_layout(
    self, grid, truth_u8, recovered_u8, *, columns, th, tw, pad, background=255
  ):
    """Tiles hold their values, everything else is background."""
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(len(truth_u8)):
      for row, value in ((0, truth_u8[i]), (1, recovered_u8[i])):
        y, x = _origin(i, row, columns=columns, th=th, tw=tw, pad=pad)
        tile = grid[y : y + th, x : x + tw]
        np.testing.assert_array_equal(tile, np.broadcast_to(value, tile.shape))
        covered[y : y + th, x : x + tw] = True
    np.testing.assert_array_equal(grid[~covered], background)

  def test_gray_layout(self):
    # 8x8 images: scale ceil(64 / 8) = 8, tiles 64x64.
    truth = _constant_batch([0.0, 0.5, 1.0], 8, 8, 1)
    recovered = _constant_batch([0.25, 0.75, 0.1], 8, 8, 1)
    grid = _pictures.image_grid(truth, recovered, pad=6)
    self.assertEqual(grid.dtype, np.uint8)
    # height 6 + (2*64 + 4*6) - 2*6 = 146, width 6 + 3 * (64 + 6) = 216.
    self.assertEqual(grid.shape, (146, 216))
    self._assert_layout(
      grid, [0, 128, 255], [64, 191, 26], columns=3, th=64, tw=64, pad=6
    )

  def test_rgb_layout_and_scale(self):
    # 32x24 images: scale ceil(64 / 32) = 2, tiles 64x48.
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    truth = np.broadcast_to(colors[:, None, None, :], (2, 32, 24, 3))
    grid = _pictures.image_grid(truth, truth[::-1], pad=3, background=200)
    self.assertEqual(grid.shape, (3 + (2 * 64 + 12) - 6, 3 + 2 * 51, 3))
    u8 = [[255, 0, 0], [0, 128, 255]]
    self._assert_layout(
      grid, u8, u8[::-1], columns=2, th=64, tw=48, pad=3, background=200
    )
    # An explicit scale overrides min_tile.
    self.assertEqual(
      _pictures.image_grid(truth, truth, scale=1, pad=0).shape, (64, 48, 3)
    )

  def test_nearest_neighbour_upscaling(self):
    image = np.array([[0.0, 1.0], [1.0, 0.0]]).reshape(1, 2, 2, 1)
    grid = _pictures.image_grid(image, image, scale=3, pad=0)
    np.testing.assert_array_equal(
      grid[:3, :6], np.kron([[0, 255]], np.ones((3, 3), int))
    )
    np.testing.assert_array_equal(grid[6:9, :6], grid[:3, :6])

  def test_wrapping(self):
    # 20 samples, at most 16 per row pair: two pairs, the second with 4.
    values = np.linspace(0.0, 1.0, 20)
    truth = _constant_batch(values, 16, 16, 1)
    recovered = _constant_batch(values[::-1], 16, 16, 1)
    grid = _pictures.image_grid(truth, recovered, pad=2, max_columns=16)
    th = 64
    self.assertEqual(grid.shape, (2 + 2 * (2 * th + 8) - 4, 2 + 16 * (th + 2)))

    def to_u8(v):
      return np.rint(v * 255).astype(np.uint8)

    self._assert_layout(
      grid, to_u8(values), to_u8(values[::-1]), columns=16, th=th, tw=th, pad=2
    )
    # Sample 17 is in the second pair, second column.
    y, x = _origin(17, 1, columns=16, th=th, tw=th, pad=2)
    self.assertEqual((y, x), (2 + 136 + 66, 68))
    self.assertEqual(grid[y, x], to_u8(values[2]))

  def test_exact_marks(self):
    truth = _constant_batch([0.5, 0.5, 0.5], 8, 8, 1)
    grid = _pictures.image_grid(truth, truth, exact=[True, False, True], pad=6)
    self.assertEqual(grid.shape, (146, 216, 3))
    mark = 2  # pad // 3
    red = np.array([255, 0, 0])
    for i, marked in enumerate([False, True, False]):
      y, x = _origin(i, 1, columns=3, th=64, tw=64, pad=6)
      ring = grid[y - mark : y + 64 + mark, x - mark : x + 64 + mark].copy()
      ring[mark:-mark, mark:-mark] = red if marked else 255
      np.testing.assert_array_equal(
        ring, np.broadcast_to(red if marked else 255, ring.shape)
      )
      # The tile itself is untouched, and the pixel beyond the ring is white.
      np.testing.assert_array_equal(grid[y : y + 64, x : x + 64], 128)
      np.testing.assert_array_equal(grid[y - mark - 1, x], 255)
      # Truth tiles are never marked.
      ty, tx = _origin(i, 0, columns=3, th=64, tw=64, pad=6)
      np.testing.assert_array_equal(grid[ty - 1, tx : tx + 64], 255)

  def test_out_of_range_is_clipped(self):
    truth = _constant_batch([-0.5, 1.5], 4, 4, 3)
    grid = _pictures.image_grid(truth, truth, scale=1, pad=0)
    np.testing.assert_array_equal(grid[:4, :4], 0)
    np.testing.assert_array_equal(grid[:4, 4:8], 255)

  def test_save_image_grid(self):
    truth = np.random.default_rng().random((5, 8, 8, 3))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "grid.png")
      _pictures.save_image_grid(
        path, truth, truth, exact=[True] * 5, max_columns=2
      )
      with open(path, "rb") as f:
        np.testing.assert_array_equal(
          _decode_png(f.read()),
          _pictures.image_grid(truth, truth, exact=[True] * 5, max_columns=2),
        )

  @parameterized.named_parameters(
    ("three_dims", np.zeros((2, 8, 8)), {}, r"\(b, H, W, C\)"),
    ("two_channels", np.zeros((2, 8, 8, 2)), {}, r"C in \{1, 3\}"),
    ("nan", np.full((2, 8, 8, 1), np.nan), {}, "NaN"),
    ("empty", np.zeros((0, 8, 8, 1)), {}, "at least one"),
    ("exact_shape", np.zeros((2, 8, 8, 1)), {"exact": [True]}, r"\(2,\)"),
    ("columns", np.zeros((2, 8, 8, 1)), {"max_columns": 0}, "positive"),
    ("pad", np.zeros((2, 8, 8, 1)), {"pad": -1}, "non-negative"),
    (
      "mark_without_pad",
      np.zeros((2, 8, 8, 1)),
      {"pad": 0, "exact": [True, False]},
      "pad >= 1",
    ),
  )
  def test_bad_inputs(self, images, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      _pictures.image_grid(images, images, **kwargs)

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      _pictures.image_grid(np.zeros((2, 8, 8, 1)), np.zeros((2, 8, 8, 3)))


def _luminance(rgb):
  return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


class HeatmapTest(parameterized.TestCase):
  def test_colormap_is_monotonic(self):
    colors = _pictures.colormap(np.linspace(0.0, 1.0, 1001))
    self.assertEqual(colors.shape, (1001, 3))
    self.assertEqual(colors.dtype, np.uint8)
    # Strictly increasing in exact arithmetic; rounding to 8 bits may tie.
    self.assertTrue(np.all(np.diff(_luminance(colors)) >= -0.5))
    self.assertGreater(_luminance(colors[-1]) - _luminance(colors[0]), 150)
    np.testing.assert_array_equal(colors[0], [68, 1, 84])
    np.testing.assert_array_equal(colors[-1], [253, 231, 37])
    np.testing.assert_array_equal(
      _pictures.colormap([-1.0, 2.0]), colors[[0, -1]]
    )

  def test_shape_and_scale(self):
    truth = np.zeros((3, 10))
    recovered = truth.copy()
    recovered[1, 4] = 2.0
    recovered[2, 7] = 1.0
    heat = _pictures.error_heatmap(
      recovered, truth, row_height=4, column_width=2
    )
    self.assertEqual(heat.shape, (12, 20, 3))
    self.assertEqual(heat.dtype, np.uint8)
    low, high = _pictures.colormap([0.0, 1.0])
    np.testing.assert_array_equal(
      heat[4:8, 8:10], np.broadcast_to(high, (4, 2, 3))
    )
    np.testing.assert_array_equal(heat[8, 14], _pictures.colormap(0.5))
    np.testing.assert_array_equal(heat[0, 0], low)
    # A given vmax saturates larger errors.
    heat = _pictures.error_heatmap(recovered, truth, vmax=1.0)
    np.testing.assert_array_equal(heat[8, 4], heat[16, 7])

  def test_log_scale(self):
    truth = np.zeros((1, 4))
    recovered = np.array([[0.0, 1e-16, 1e-8, 1.0]])
    heat = _pictures.error_heatmap(
      recovered, truth, log_floor=1e-16, row_height=1
    )
    np.testing.assert_array_equal(
      heat[0], _pictures.colormap([0.0, 0.0, 0.5, 1.0])
    )

  def test_zero_error(self):
    heat = _pictures.error_heatmap(np.ones((2, 3)), np.ones((2, 3)))
    np.testing.assert_array_equal(
      heat, np.broadcast_to(_pictures.colormap(0.0), (16, 3, 3))
    )

  def test_save_error_heatmap(self):
    rng = np.random.default_rng()
    truth = rng.standard_normal((4, 30))
    recovered = truth + 1e-3 * rng.standard_normal((4, 30))
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "heat.png")
      _pictures.save_error_heatmap(path, recovered, truth, column_width=3)
      with open(path, "rb") as f:
        np.testing.assert_array_equal(
          _decode_png(f.read()),
          _pictures.error_heatmap(recovered, truth, column_width=3),
        )

  @parameterized.named_parameters(
    ("one_dim", np.zeros(3), np.zeros(3), {}, r"\(b, n\)"),
    ("mismatch", np.zeros((2, 3)), np.zeros((2, 4)), {}, r"\(b, n\)"),
    ("nan", np.full((2, 3), np.nan), np.zeros((2, 3)), {}, "NaN"),
    (
      "row_height",
      np.zeros((2, 3)),
      np.zeros((2, 3)),
      {"row_height": 0},
      "positive",
    ),
    ("vmax", np.zeros((2, 3)), np.zeros((2, 3)), {"vmax": 0.0}, "positive"),
  )
  def test_bad_inputs(self, recovered, truth, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      _pictures.error_heatmap(recovered, truth, **kwargs)


if __name__ == "__main__":
  absltest.main()
