"""Matching of reconstructions to the ground truth, and image metrics."""

import functools
import itertools
import json

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import numpy as np
import pytest

from spear_jax import _metrics


def _gaussian(size, sigma=1.5):
  """Normalized Gaussian taps, written out from the formula."""
  taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
  return taps / taps.sum()


def _ssim_one_window(x, y, weights, c1, c2):
  """SSIM of one window of one channel, from the formula of Wang et al."""
  mu_x, mu_y = np.sum(weights * x), np.sum(weights * y)
  var_x = np.sum(weights * (x - mu_x) ** 2)
  var_y = np.sum(weights * (y - mu_y) ** 2)
  cov = np.sum(weights * (x - mu_x) * (y - mu_y))
  return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
    (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  )


def _ssim_by_loop(x_hwc, y_hwc, size, c1=1e-4, c2=9e-4):
  """Mean SSIM over every window inside the image and every channel."""
  weights = np.outer(_gaussian(size), _gaussian(size))
  h, w, c = x_hwc.shape
  values = [
    _ssim_one_window(
      x_hwc[i : i + size, j : j + size, k],
      y_hwc[i : i + size, j : j + size, k],
      weights,
      c1,
      c2,
    )
    for i in range(h - size + 1)
    for j in range(w - size + 1)
    for k in range(c)
  ]
  return np.mean(values)


class HungarianTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 4, 6)
  def test_optimal_against_brute_force(self, b):
    rng = np.random.default_rng(b)
    for _ in range(10):
      cost = rng.random((b, b))
      assignment = _metrics.hungarian(cost)
      self.assertEqual(sorted(assignment.tolist()), list(range(b)))
      best = min(
        sum(cost[i, p[i]] for i in range(b))
        for p in itertools.permutations(range(b))
      )
      self.assertAlmostEqual(
        cost[np.arange(b), assignment].sum(), best, places=12
      )

  def test_forbidden_pairs_and_bad_shapes(self):
    # inf forbids a pair: the only finite assignment is the anti-diagonal.
    cost = np.array([[np.inf, 5.0], [1.0, np.inf]])
    np.testing.assert_array_equal(_metrics.hungarian(cost), [1, 0])
    with self.assertRaisesRegex(ValueError, "square"):
      _metrics.hungarian(np.zeros((2, 3)))

  def test_match_shuffled_batch(self):
    rng = np.random.default_rng()
    truth = rng.standard_normal((7, 30))
    perm = rng.permutation(7)
    noisy = truth[perm] + 1e-12 * rng.standard_normal((7, 30))
    scores = _metrics.match_and_score(noisy, truth)
    np.testing.assert_array_equal(scores["order"], perm)
    self.assertTrue(scores["exact"].all())
    self.assertLess(scores["max_abs_error"].max(), 1e-11)

  def test_a_zero_sample_is_scored_on_the_batch_scale(self):
    rng = np.random.default_rng()
    truth = rng.random((5, 20))
    truth[2] = 0.0
    mean_norm = np.mean(np.linalg.norm(np.delete(truth, 2, axis=0), axis=1))
    rec = truth.copy()
    rec[2] = 1e-14 * rng.standard_normal(20)
    scores = _metrics.match_and_score(rec, truth)
    self.assertTrue(scores["exact"].all())
    self.assertAlmostEqual(
      scores["relative_error"][2], np.linalg.norm(rec[2]) / mean_norm
    )
    rec[2] = 1e-3 * np.ones(20)  # not zero: not exact
    self.assertFalse(_metrics.match_and_score(rec, truth)["exact"][2])

  def test_an_exact_sample_keeps_its_match_beside_a_near_copy(self):
    # Two reconstructions of u (one exact, one off by 1e-4 |u| away from
    # v) and none of v, with |u| = 2 |v|: by relative error alone, the
    # exact row matched to v is cheaper (|u - v| / |v| + 1e-4 against
    # |u - v| / |v| + 2e-4), which scored an exact sample as wrong.
    rng = np.random.default_rng()
    v = rng.standard_normal(30)
    u = v + 0.1 * rng.standard_normal(30)
    u *= 2 * np.linalg.norm(v) / np.linalg.norm(u)
    away = -(v - u) / np.linalg.norm(v - u)
    near = u + 1e-4 * np.linalg.norm(u) * away
    truth = np.stack([u, v])
    plain = _metrics.hungarian(
      np.linalg.norm(np.stack([u, near])[:, None] - truth[None], axis=2)
      / np.linalg.norm(truth, axis=1)[None]
    )
    np.testing.assert_array_equal(plain, [1, 0])  # the trap is real
    scores = _metrics.match_and_score(np.stack([u, near]), truth)
    np.testing.assert_array_equal(scores["order"], [0, 1])
    np.testing.assert_array_equal(scores["exact"], [True, False])
    # The benchmarks' scorer (per true sample: its matched row) agrees.
    full = _metrics.score_reconstruction(np.stack([u, near]), truth)
    np.testing.assert_array_equal(full["matched_row"], [0, 1])
    np.testing.assert_array_equal(full["exact"], [True, False])
    self.assertEqual(full["exact_samples"], 1)

  def test_match_and_score_keeps_its_fields(self):
    rng = np.random.default_rng()
    truth = rng.standard_normal((4, 9))
    scores = _metrics.match_and_score(truth[[1, 2, 3, 0]], truth)
    self.assertEqual(
      set(scores), {"order", "relative_error", "max_abs_error", "exact"}
    )
    np.testing.assert_array_equal(scores["order"], [1, 2, 3, 0])


class MsePsnrTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("unit_range", 1.0, 0.1, 20.0),
    ("unit_range_small", 1.0, 0.01, 40.0),
    ("eight_bit", 255.0, 2.55, 40.0),
    ("negative_offset", 1.0, -0.05, 20 * np.log10(20.0)),
  )
  def test_constant_offset(self, data_range, offset, expected_db):
    # x + offset has MSE offset**2, so PSNR = 20 log10(R / |offset|).
    x = np.random.default_rng().random((3, 5, 4, 3)) * data_range
    psnr = self.variant(functools.partial(_metrics.psnr, data_range=data_range))
    np.testing.assert_allclose(psnr(x + offset, x), expected_db, rtol=1e-12)
    mse = self.variant(_metrics.mse)
    np.testing.assert_allclose(mse(x + offset, x), offset**2, rtol=1e-10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_sample_values(self):
    # Sample i is off by 10^-(i+1) on one pixel of 4: MSE = 10^-(2i+2) / 4.
    x = np.zeros((3, 2, 2, 1))
    y = x.copy()
    y[:, 0, 0, 0] = [0.1, 0.01, 0.001]
    expected = 10 * np.log10(4 / np.array([0.1, 0.01, 0.001]) ** 2)
    np.testing.assert_allclose(
      self.variant(_metrics.psnr)(y, x), expected, rtol=1e-12
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_perfect_recovery_is_capped(self):
    x = np.random.default_rng().random((2, 6))
    psnr = self.variant(_metrics.psnr)
    np.testing.assert_array_equal(psnr(x, x), [100.0, 100.0])
    self.assertEqual(_metrics.PSNR_MAX_DB, 100.0)
    capped = self.variant(functools.partial(_metrics.psnr, max_db=60.0))
    # 1e-4 RMS error is 80 dB, above the lower cap of 60 dB.
    np.testing.assert_array_equal(capped(x + 1e-4, x), [60.0, 60.0])

  def test_nan_propagates(self):
    x = np.zeros((2, 3))
    y = x.copy()
    y[1, 0] = np.nan
    db = np.asarray(_metrics.psnr(y, x))
    self.assertEqual(db[0], 100.0)
    self.assertTrue(np.isnan(db[1]))

  def test_shape_mismatch(self):
    with self.assertRaisesRegex(ValueError, "same shape"):
      _metrics.psnr(np.zeros((2, 3)), np.zeros((2, 4)))
    with self.assertRaisesRegex(ValueError, "batch axis"):
      _metrics.mse(np.float64(0.0), np.float64(1.0))


class SsimTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    ("rgb_32", (32, 32, 3)),
    ("gray_25", (25, 25, 1)),
    ("digits_8", (8, 8, 1)),
    ("one_pixel", (1, 1, 3)),
  )
  def test_image_with_itself_is_one(self, shape):
    x = np.random.default_rng().random((2,) + shape)
    # 1x1 images are flat windows: dm_pix's variance floor (float32 eps**2)
    # leaves 1 - C2 / (2 eps**2 + C2) = 3.2e-11.
    np.testing.assert_allclose(
      self.variant(_metrics.ssim)(x, x), 1.0, atol=1e-10
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_constant_images(self):
    # Constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    # per channel, C1 = (0.01 * 1)^2, averaged over the channels.
    a = np.array([0.2, 0.5, 0.9])
    b = np.array([0.6, 0.5, 0.3])
    x = np.broadcast_to(a, (1, 16, 16, 3))
    y = np.broadcast_to(b, (1, 16, 16, 3))
    expected = np.mean((2 * a * b + 1e-4) / (a**2 + b**2 + 1e-4))
    # by hand: (0.2401/0.4001 + 1 + 0.5401/0.9001) / 3
    np.testing.assert_allclose(
      expected, (0.2401 / 0.4001 + 1.0 + 0.5401 / 0.9001) / 3, rtol=1e-15
    )
    # dm_pix floors the zero variances at float32 eps**2 ~ 1.4e-14, which
    # moves the contrast term by 2 eps**2 / C2 ~ 3.2e-11.
    np.testing.assert_allclose(
      self.variant(_metrics.ssim)(x, y), expected, rtol=1e-10
    )
    # With R = 255 the constants are (2.55)^2 and (7.65)^2.
    ssim255 = self.variant(functools.partial(_metrics.ssim, data_range=255.0))
    c1 = 2.55**2
    expected = np.mean(
      (2 * a * b * 255**2 + c1) / ((a**2 + b**2) * 255**2 + c1)
    )
    np.testing.assert_allclose(ssim255(x * 255, y * 255), expected, rtol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    # An 11x11 image holds exactly one 11x11 window.
    ("one_window", (11, 11, 2), 11),
    # 8x8 digits: the window shrinks to 7x7 (sigma 1.5), 2x2 positions.
    ("digits_8", (8, 8, 1), 7),
    # 6x9: the shorter side 6 gives a 5x5 window, 2x5 positions.
    ("rectangular", (6, 9, 3), 5),
    ("full_window_rgb", (14, 12, 3), 11),
  )
  def test_against_direct_formula(self, shape, size):
    rng = np.random.default_rng()
    x = rng.random((3,) + shape)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0.0, 1.0)
    expected = [_ssim_by_loop(xi, yi, size) for xi, yi in zip(x, y)]
    np.testing.assert_allclose(
      self.variant(_metrics.ssim)(x, y), expected, rtol=1e-12
    )

  def test_symmetric_and_below_one(self):
    rng = np.random.default_rng()
    x = rng.random((4, 12, 12, 3))
    y = rng.random((4, 12, 12, 3))
    xy = np.asarray(_metrics.ssim(x, y))
    np.testing.assert_allclose(xy, _metrics.ssim(y, x), rtol=1e-13)
    self.assertTrue(np.all(xy < 0.5))

  @parameterized.named_parameters(
    ("rgb_32", (32, 32, 3)),
    ("gray_25", (25, 25, 1)),
    ("rectangular", (13, 40, 3)),
  )
  def test_matches_skimage(self, shape):
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng()
    x = rng.random((3,) + shape)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0.0, 1.0)
    expected = [
      metrics.structural_similarity(
        xi,
        yi,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        channel_axis=-1,
      )
      for xi, yi in zip(x, y)
    ]
    # Same arithmetic up to summation order: 1e-12 absolute.
    np.testing.assert_allclose(
      _metrics.ssim(x, y), expected, rtol=0, atol=1e-12
    )
    expected_db = [
      metrics.peak_signal_noise_ratio(xi, yi, data_range=1.0)
      for xi, yi in zip(x, y)
    ]
    np.testing.assert_allclose(_metrics.psnr(x, y), expected_db, rtol=1e-12)

  @parameterized.named_parameters(
    ("rgb_32", (32, 32, 3)), ("digits_8", (8, 8, 1))
  )
  def test_float32_keeps_dtype(self, shape):
    rng = np.random.default_rng()
    x = rng.random((2,) + shape).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    size = min(11, shape[0] - (1 - shape[0] % 2))
    expected = [
      _ssim_by_loop(xi.astype(np.float64), yi.astype(np.float64), size)
      for xi, yi in zip(x, y)
    ]
    value = _metrics.ssim(x, y)
    self.assertEqual(value.dtype, np.float32)
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-5)
    db = _metrics.psnr(x, y)
    self.assertEqual(db.dtype, np.float32)
    mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(db, -10 * np.log10(mse), rtol=1e-5)

  def test_no_retrace(self):
    ssim = jax.jit(chex.assert_max_traces(_metrics.ssim, n=1))
    rng = np.random.default_rng()
    for _ in range(2):
      x = rng.random((2, 9, 9, 3))
      ssim(x, rng.random((2, 9, 9, 3))).block_until_ready()

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, r"\(b, H, W, C\)"):
      _metrics.ssim(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))
    with self.assertRaisesRegex(ValueError, "odd"):
      _metrics.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)), win_size=10)
    with self.assertRaisesRegex(ValueError, "same shape"):
      _metrics.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 3)))


def _normalized_images(rng, b, shape, mean, std):
  """Images with pixels in [0.1, 0.9] and their normalized flat rows."""
  images = 0.1 + 0.8 * rng.random((b,) + shape)
  return images, ((images - mean) / std).reshape(b, -1)


class ScoreReconstructionTest(parameterized.TestCase):
  def test_shuffled_batch_is_matched_and_exact(self):
    rng = np.random.default_rng()
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    _, truth = _normalized_images(rng, 7, (4, 5, 3), mean, std)
    perm = rng.permutation(7)
    recovered = truth[perm] + 1e-12 * rng.standard_normal(truth.shape)
    scores = _metrics.score_reconstruction(
      recovered, truth, image_shape=(4, 5, 3), mean=mean, std=std
    )
    # recovered[i] is truth[perm[i]], so truth j is recovered row argsort.
    np.testing.assert_array_equal(scores["matched_row"], np.argsort(perm))
    self.assertTrue(scores["exact"].all())
    self.assertTrue(scores["exact_batch"])
    self.assertEqual(scores["exact_samples"], 7)
    self.assertLess(scores["max_relative_error"], 1e-10)
    np.testing.assert_array_equal(scores["psnr"], 100.0)
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-12)
    self.assertEqual(scores["mean_psnr"], 100.0)

  def test_metrics_in_pixel_space(self):
    # +0.01 in pixel space on sample 1 only: mse 1e-4, psnr 40 dB; its
    # normalized error is 0.01 / std per entry.
    rng = np.random.default_rng()
    mean, std = np.array([0.5]), np.array([0.25])
    images, truth = _normalized_images(rng, 3, (6, 6, 1), mean, std)
    recovered_images = images.copy()
    recovered_images[1] += 0.01
    recovered = ((recovered_images - mean) / std).reshape(3, -1)
    scores = _metrics.score_reconstruction(
      recovered[[2, 0, 1]], truth, image_shape=(6, 6, 1), mean=mean, std=std
    )
    np.testing.assert_array_equal(scores["matched_row"], [1, 2, 0])
    np.testing.assert_array_equal(scores["exact"], [True, False, True])
    self.assertFalse(scores["exact_batch"])
    self.assertEqual(scores["exact_samples"], 2)
    np.testing.assert_allclose(scores["mse"], [0.0, 1e-4, 0.0], atol=1e-15)
    np.testing.assert_allclose(scores["psnr"], [100.0, 40.0, 100.0], rtol=1e-9)
    np.testing.assert_allclose(scores["max_abs_error"][1], 0.04, rtol=1e-9)
    np.testing.assert_allclose(
      scores["relative_error"][1],
      np.linalg.norm(np.full(36, 0.04)) / np.linalg.norm(truth[1]),
      rtol=1e-9,
    )

  def test_clipped_pixels_are_not_exact(self):
    # A white image recovered as 1.5 clips back to white: perfect PSNR and
    # SSIM, yet not exact.
    truth = np.ones((1, 4))
    scores = _metrics.score_reconstruction(
      1.5 * truth, truth, image_shape=(2, 2, 1)
    )
    self.assertEqual(scores["psnr"][0], 100.0)
    self.assertFalse(scores["exact"][0])
    np.testing.assert_allclose(scores["relative_error"], 0.5, rtol=1e-15)

  @parameterized.named_parameters(("fewer", 4), ("more", 7))
  def test_different_number_recovered(self, num_recovered):
    rng = np.random.default_rng()
    truth = rng.standard_normal((5, 20))
    perm = rng.permutation(5)
    recovered = np.concatenate([truth[perm], rng.standard_normal((2, 20))])
    recovered = recovered[:num_recovered]
    scores = _metrics.score_reconstruction(recovered, truth)
    self.assertEqual(scores["num_recovered"], num_recovered)
    expected_rows = np.argsort(perm)
    if num_recovered < 5:
      missing = perm[4]
      expected_rows[missing] = -1
      # scored against an all-zero input: relative error exactly 1.
      self.assertEqual(scores["relative_error"][missing], 1.0)
    np.testing.assert_array_equal(scores["matched_row"], expected_rows)
    np.testing.assert_array_equal(scores["exact"], expected_rows >= 0)
    self.assertEqual(scores["exact_batch"], num_recovered >= 5)

  def test_non_images_skip_psnr_and_ssim(self):
    rng = np.random.default_rng()
    truth = rng.standard_normal((3, 10))
    recovered = truth + 0.1
    scores = _metrics.score_reconstruction(recovered, truth)
    self.assertNotIn("psnr", scores)
    self.assertNotIn("ssim", scores)
    self.assertNotIn("mean_psnr", scores)
    np.testing.assert_allclose(scores["mse"], 0.01, rtol=1e-12)
    # mse in the de-normalized space when std is given.
    scores = _metrics.score_reconstruction(recovered, truth, std=2.0)
    np.testing.assert_allclose(scores["mse"], 0.04, rtol=1e-12)

  def test_json_serializable(self):
    truth = np.random.default_rng().standard_normal((3, 12))
    scores = _metrics.score_reconstruction(
      truth[::-1], truth, image_shape=(2, 2, 3)
    )
    plain = {
      k: v.tolist() if isinstance(v, np.ndarray) else v
      for k, v in scores.items()
    }
    self.assertEqual(json.loads(json.dumps(plain, allow_nan=False)), plain)

  def test_bad_inputs(self):
    with self.assertRaisesRegex(ValueError, "same n"):
      _metrics.score_reconstruction(np.zeros((2, 3)), np.zeros((2, 4)))
    with self.assertRaisesRegex(ValueError, "non-empty"):
      _metrics.score_reconstruction(np.zeros((0, 3)), np.zeros((0, 3)))
    with self.assertRaisesRegex(ValueError, "not flattened images"):
      _metrics.score_reconstruction(
        np.ones((2, 12)), np.ones((2, 12)), image_shape=(2, 2, 1)
      )


class NearDuplicatesTest(absltest.TestCase):
  def test_against_a_pairwise_loop(self):
    rng = np.random.default_rng()
    base = rng.standard_normal((6, 50))
    # Three planted twins at known angles, a scaled copy and an
    # unrelated rest.
    twins = []
    for cos in (0.99, 0.96, 0.90):
      noise = rng.standard_normal(50)
      noise -= noise @ base[0] / (base[0] @ base[0]) * base[0]
      noise *= np.linalg.norm(base[0]) / np.linalg.norm(noise)
      twins.append(cos * base[0] + np.sqrt(1 - cos**2) * noise)
    batch = np.concatenate([base, np.asarray(twins), 3.0 * base[1:2]])
    out = _metrics.near_duplicates(batch, thresholds=(0.95, 0.98))
    # Independent: explicit loops over pairs.
    b = batch.shape[0]
    best = []
    for i in range(b):
      cosines = [
        batch[i]
        @ batch[j]
        / (np.linalg.norm(batch[i]) * np.linalg.norm(batch[j]))
        for j in range(b)
        if j != i
      ]
      best.append(max(cosines))
    best = np.asarray(best)
    self.assertAlmostEqual(out["near_duplicates_095"], np.mean(best > 0.95))
    self.assertAlmostEqual(out["near_duplicates_098"], np.mean(best > 0.98))
    self.assertAlmostEqual(out["max_pair_cosine"], best.max(), places=12)
    # base[0] with its 0.99 and 0.96 twins, base[1] with its copy: 5 of 10.
    self.assertAlmostEqual(out["near_duplicates_095"], 0.5)
    self.assertIn(
      "near_duplicates_095", _metrics.score_reconstruction(batch, batch)
    )


def _distance_by_qr(x_bxn, i):
  """Distance of sample i from the others' span, by an orthonormal basis."""
  q, _ = np.linalg.qr(np.delete(x_bxn, i, axis=0).T)
  return np.linalg.norm(x_bxn[i] - q @ (q.T @ x_bxn[i]))


class IndependentSamplesTest(parameterized.TestCase):
  @parameterized.parameters(1e-3, 1e-5, 1e-8, 1e-10)
  def test_matches_distance_to_the_others_span(self, delta):
    # Sample 3 is a combination of samples 0-2 plus a unit-norm-relative
    # offset of size delta orthogonal to all samples; the threshold 1e-6
    # sits between the two middle cases.
    rng = np.random.default_rng()
    x = rng.standard_normal((12, 40))
    x[3] = x[:3].T @ rng.standard_normal(3)
    offset = rng.standard_normal(40)
    q, _ = np.linalg.qr(x.T)
    offset -= q @ (q.T @ offset)
    x[3] += delta * np.linalg.norm(x[3]) * offset / np.linalg.norm(offset)
    got = _metrics.independent_samples(x)
    want = np.array(
      [_distance_by_qr(x, i) >= 1e-6 * np.linalg.norm(x[i]) for i in range(12)]
    )
    np.testing.assert_array_equal(got, want)
    # The dependent ones are exactly 0-3 (the combination and its parts).
    self.assertEqual(got[:4].all(), delta > 1e-6)
    self.assertTrue(got[4:].all())

  def test_brightness_gain_frames_are_dependent(self):
    # Three frames of one scene under gains g, normalized with one mean:
    # dependent up to the float32 rounding of the images.
    rng = np.random.default_rng()
    scene = rng.uniform(0.2, 0.8, 3072).astype(np.float32)
    # Gains apart by 0.1: nearly equal gains make two frames nearly
    # parallel, and the float32 rounding, divided by their difference, can
    # then lift the third above 1e-6 (measured up to 1.4e-7 with these
    # gains over 300 scenes; random gains in [0.95, 1.05] failed in CI).
    frames = [scene * np.float32(g) for g in (0.9, 1.0, 1.1)]
    others = rng.uniform(0.0, 1.0, (5, 3072)).astype(np.float32)
    x = (np.concatenate([np.stack(frames), others]) - 0.5) / 0.25
    got = _metrics.independent_samples(x.astype(np.float64))
    np.testing.assert_array_equal(got, [False] * 3 + [True] * 5)

  def test_more_samples_than_dimensions(self):
    x = np.random.default_rng().standard_normal((6, 4))
    self.assertFalse(_metrics.independent_samples(x).any())


class AggregateTrialsTest(absltest.TestCase):
  def test_rates_and_means(self):
    rng = np.random.default_rng()
    trials = []
    for num_bad in (0, 1, 0):
      truth = rng.standard_normal((4, 12))
      recovered = truth.copy()
      recovered[:num_bad] += 1.0
      trials.append(
        _metrics.score_reconstruction(recovered, truth, image_shape=(2, 2, 3))
      )
    result = _metrics.aggregate_trials(trials)
    self.assertEqual(result["trials"], 3)
    self.assertEqual(result["samples"], 12)
    self.assertEqual(result["exact_batches"], 2)
    self.assertAlmostEqual(result["exact_batch_rate"], 2 / 3, places=15)
    self.assertEqual(result["exact_samples"], 11)
    self.assertAlmostEqual(result["exact_sample_rate"], 11 / 12, places=15)
    pooled_psnr = np.concatenate([t["psnr"] for t in trials])
    self.assertAlmostEqual(result["mean_psnr"], pooled_psnr.mean(), places=12)
    self.assertIn("mean_ssim", result)
    # The same from JSON-loaded trials (lists instead of arrays).
    loaded = json.loads(
      json.dumps(
        [
          {
            k: v.tolist() if isinstance(v, np.ndarray) else v
            for k, v in t.items()
          }
          for t in trials
        ]
      )
    )
    self.assertEqual(_metrics.aggregate_trials(loaded), result)

  def test_psnr_only_when_every_trial_has_it(self):
    truth = np.random.default_rng().standard_normal((2, 12))
    with_images = _metrics.score_reconstruction(
      truth, truth, image_shape=(2, 2, 3)
    )
    without = _metrics.score_reconstruction(truth, truth)
    result = _metrics.aggregate_trials([with_images, without])
    self.assertNotIn("mean_psnr", result)
    self.assertEqual(result["exact_batch_rate"], 1.0)

  def test_empty(self):
    with self.assertRaisesRegex(ValueError, "at least one"):
      _metrics.aggregate_trials([])


if __name__ == "__main__":
  absltest.main()
