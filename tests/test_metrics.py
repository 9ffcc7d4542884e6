"""Tests for refseg_jax.evaluation.metrics: hand cases, geometry, merging."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refseg_jax.evaluation import metrics
from refseg_jax.evaluation.metrics import RESMetrics

KEYS = ('mIoU', 'oIoU', 'prec@0.5', 'prec@0.6', 'prec@0.7', 'prec@0.8',
    'prec@0.9', 'PointM')

score = jax.jit(RESMetrics.from_model_output, static_argnames='threshold')


def _merge_all(states):
  return functools.reduce(lambda a, b: a.merge(b), states,
              RESMetrics.empty())


def _assert_results_close(actual, expected, rtol=1e-6):
  assert actual['num_expressions'] == expected['num_expressions']
  for key in KEYS:
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol,
                                   atol=1e-7, err_msg=key)


def _assert_states_equal(a, b):
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  for x, y in leaves:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------
# Hand-computed 4×4 cases.
# --------------------------------------------------------------------------

def _grid(rows):
  return np.array([[int(c) for c in row] for row in rows.split()],
          np.float32)


def _hand_batch():
  """Five 4×4 expressions with hand-computed statistics.

  Responses are +1 where predicted, -1 elsewhere, plus a peak of +5 (or a
  large value in padding) to place the PointM argmax.
  """
  full = np.ones((4, 4), bool)
  cases = []
  # 0: P = top-left 2×2, G = columns 1-2 of rows 0-1: I = 2, U = 6.
  #    Argmax at (0, 0), not in G -> PointM miss.
  pred = _grid('1100 1100 0000 0000')
  gt = _grid('0110 0110 0000 0000')
  resp = 2 * pred - 1
  resp[0, 0] = 5
  cases.append((resp, gt, full))
  # 1: Empty prediction, G = 4 pixels: I = 0, U = 4, IoU 0.
  #    Argmax (all -1 but one -0.5) at (3, 3) in G -> hit.
  gt = _grid('0000 0000 0011 0011')
  resp = -np.ones((4, 4), np.float32)
  resp[3, 3] = -0.5
  cases.append((resp, gt, full))
  # 2: Empty prediction and empty G: IoU 1, hits every prec@X; PointM miss.
  cases.append((-np.ones((4, 4), np.float32), np.zeros((4, 4)), full))
  # 3: P (4 px) inside G (8 px): IoU exactly 0.5 -> NOT a hit at prec@0.5.
  #    Argmax in G -> hit.
  pred = _grid('1100 1100 0000 0000')
  gt = _grid('1111 1111 0000 0000')
  resp = 2 * pred - 1
  resp[1, 1] = 5
  cases.append((resp, gt, full))
  # 4: Only the top-left 3×3 is the image, G = all of it (9 px). P = G
  #    minus (2, 2), plus padding pixels that must not count: I = 8, U = 9,
  #    IoU = 8/9 > 0.8 but not > 0.9.
  #    The global maximum (100) lies in the padding at (3, 3); the argmax
  #    inside the region is (2, 1) = 5, which is in G -> hit.
  region = np.zeros((4, 4), bool)
  region[:3, :3] = True
  gt = _grid('1110 1110 1110 0000')
  resp = _grid('1111 1111 1101 1111') * 2 - 1
  resp[3, 3] = 100
  resp[2, 1] = 5
  cases.append((resp, gt, region))
  responses, gts, regions = (np.stack(x) for x in zip(*cases))
  expected = {
    'intersection': [2, 0, 0, 4, 8],
    'union': [6, 4, 0, 8, 9],
    'iou': [1 / 3, 0.0, 1.0, 0.5, 8 / 9],
    # Columns: IoU > 0.5, 0.6, 0.7, 0.8, 0.9.
    'prec_hits': [[0, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0],
                      [1, 1, 1, 1, 1],
                      [0, 0, 0, 0, 0],
                      [1, 1, 1, 1, 0]],
    'point_hit': [0, 1, 0, 1, 1],
  }
  return responses, gts, regions, expected


def test_expression_stats_hand_cases():
  responses, gts, regions, expected = _hand_batch()
  stats = metrics.expression_stats(responses, gts, regions, 0.0)
  np.testing.assert_array_equal(stats['intersection'],
                                  expected['intersection'])
  np.testing.assert_array_equal(stats['union'], expected['union'])
  np.testing.assert_allclose(stats['iou'], expected['iou'], rtol=1e-6)
  np.testing.assert_array_equal(stats['prec_hits'], expected['prec_hits'])
  np.testing.assert_array_equal(stats['point_hit'], expected['point_hit'])
  assert stats['intersection'].dtype == jnp.int32
  assert stats['union'].dtype == jnp.int32
  assert stats['iou'].dtype == jnp.float32


def test_exact_prec_thresholds_at_every_level():
  # IoU = k / 10 exactly (I = k, U = 10) is a hit only for X < k / 10.
  gt = np.zeros((5, 4, 4), np.float32)
  resp = -np.ones((5, 4, 4), np.float32)
  for row, k in enumerate(range(5, 10)):
    gt[row].flat[:10] = 1
    resp[row].flat[:k] = 1
  stats = metrics.expression_stats(resp, gt, np.ones((5, 4, 4), bool), 0.0)
  np.testing.assert_array_equal(stats['prec_hits'], np.tril(np.ones(5), -1))


def test_threshold_argument_for_probabilities():
  prob = np.array([[[0.2, 0.5], [0.51, 0.9]]], np.float32)
  gt = np.array([[[0, 1], [1, 1]]], np.float32)
  stats = metrics.expression_stats(prob, gt, np.ones((1, 2, 2), bool), 0.5)
  # P = {(1, 0), (1, 1)} (0.5 itself is not > 0.5): I = 2, U = 3.
  np.testing.assert_array_equal(stats['intersection'], [2])
  np.testing.assert_array_equal(stats['union'], [3])


def test_metric_compute_hand_cases_with_padding_row():
  responses, gts, _, _ = _hand_batch()
  # content = orig makes the resize the identity (S = M = 4). Example 4 is
  # a 3×3 image in the top-left of the 4×4 canvas and eval_mask.
  orig = np.array([[4, 4]] * 4 + [[3, 3]], np.int32)
  content = orig.copy()
  # Append a dummy row (valid = 0) that would be a perfect hit.
  responses = np.concatenate([responses, np.ones((1, 4, 4), np.float32)])
  gts = np.concatenate([gts, np.ones((1, 4, 4))]).astype(np.uint8)
  orig = np.concatenate([orig, [[4, 4]]]).astype(np.int32)
  content = np.concatenate([content, [[4, 4]]]).astype(np.int32)
  valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
  result = score(responses, gts, orig, content, valid).compute()
  expected = {
    'num_expressions': 5,
    'mIoU': (1 / 3 + 0 + 1 + 0.5 + 8 / 9) / 5,
    'oIoU': (2 + 0 + 0 + 4 + 8) / (6 + 4 + 0 + 8 + 9),
    'prec@0.5': 2 / 5, 'prec@0.6': 2 / 5, 'prec@0.7': 2 / 5,
    'prec@0.8': 2 / 5, 'prec@0.9': 1 / 5,
    'PointM': 3 / 5,
  }
  _assert_results_close(result, expected)
  assert isinstance(result['num_expressions'], int)
  assert all(isinstance(result[k], float) for k in KEYS)


def test_empty_metric_and_all_empty_union():
  result = RESMetrics.empty().compute()
  assert result['num_expressions'] == 0
  assert all(result[k] == 0.0 for k in KEYS)
  # One expression with empty P and empty G: oIoU has 0 / 0 -> 0.
  state = score(-np.ones((1, 4, 4), np.float32),
                  np.zeros((1, 4, 4), np.uint8), np.array([[4, 4]]),
                  np.array([[4, 4]]), np.array([True]))
  result = state.compute()
  assert result['oIoU'] == 0.0
  assert result['mIoU'] == 1.0 and result['prec@0.9'] == 1.0
  assert result['PointM'] == 0.0


# --------------------------------------------------------------------------
# resize_to_original.
# --------------------------------------------------------------------------

def _resize(canvas, content, orig, out_size):
  maps, region = jax.jit(metrics.resize_to_original, static_argnums=3)(
    np.asarray(canvas, np.float32)[None], np.array([content]),
    np.array([orig]), out_size)
  return np.asarray(maps[0]), np.asarray(region[0])


def test_resize_identity():
  canvas = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32)
  maps, region = _resize(canvas, (5, 5), (5, 5), 5)
  np.testing.assert_array_equal(maps, canvas)
  assert region.all()


def test_resize_block_image_back_to_original_with_padding():
  # Original 2×4 -> canvas S = 8 (scale 2), content 4×8; M = 5 > max(H, W).
  values = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
  canvas = np.full((8, 8), 1e9, np.float32)  # Padding must not be read.
  canvas[:4, :8] = np.kron(values, np.ones((2, 2)))
  maps, region = _resize(canvas, (4, 8), (2, 4), 5)
  expected = np.zeros((5, 5), np.float32)
  expected[:2, :4] = values
  np.testing.assert_array_equal(maps, expected)
  np.testing.assert_array_equal(region, expected != 0)


def test_resize_downscale_averages_canvas_pairs():
  # Same geometry; original pixel (i, j) samples canvas (2i + 0.5,
  # 2j + 0.5), i.e. the mean of the 2×2 canvas block it came from.
  canvas = np.random.default_rng(1).normal(size=(8, 8)).astype(np.float32)
  canvas[4:] = -np.inf
  maps, _ = _resize(canvas, (4, 8), (2, 4), 4)
  blocks = canvas[:4].reshape(2, 2, 4, 2).mean(axis=(1, 3))
  np.testing.assert_allclose(maps[:2, :4], blocks, rtol=1e-6)
  assert np.isfinite(maps).all()


def test_resize_upscale_linear_ramp_with_clamping():
  # Original 8×4 -> canvas S = 4 (scale 1/2), content 4×2. Canvas row
  # coordinate y_i = 0.5 i - 0.25 clamped to [0, 3], column x_j =
  # 0.5 j - 0.25 clamped to [0, 1]. Bilinear is exact on a linear ramp.
  rows, cols = np.mgrid[:4, :4].astype(np.float32)
  canvas = 10 * rows + cols
  canvas[:, 2:] = np.inf  # Padding columns; must not leak as NaN/inf.
  maps, region = _resize(canvas, (4, 2), (8, 4), 9)
  y = np.clip(0.5 * np.arange(8) - 0.25, 0, 3)
  x = np.clip(0.5 * np.arange(4) - 0.25, 0, 1)
  np.testing.assert_allclose(maps[:8, :4], 10 * y[:, None] + x[None, :],
                               rtol=1e-6)
  assert (maps[8] == 0).all() and (maps[:, 4:] == 0).all()
  assert region[:8, :4].all() and region.sum() == 32


def test_resize_zero_sized_dummy_row_is_finite_and_empty():
  maps, region = _resize(np.ones((4, 4)), (0, 0), (0, 0), 4)
  assert not region.any()
  np.testing.assert_array_equal(maps, 0)


# --------------------------------------------------------------------------
# Random data: NumPy reference and batching / merge-order invariance.
# --------------------------------------------------------------------------

S, M = 12, 20


def _make_dataset(num, seed):
  """Random expressions of varied sizes, with the pipeline's geometry."""
  rng = np.random.default_rng(seed)
  responses = np.zeros((num, S, S), np.float32)
  masks = np.zeros((num, M, M), np.uint8)
  orig = np.zeros((num, 2), np.int32)
  content = np.zeros((num, 2), np.int32)
  for n in range(num):
    height, width = rng.integers(3, M + 1, size=2)
    scale = S / max(height, width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    gt = np.zeros((height, width), np.uint8)
    if n % 9 != 4:  # Some expressions have an empty ground truth.
      y0, x0 = rng.integers(0, [height, width])
      y1, x1 = rng.integers([y0 + 1, x0 + 1], [height + 1, width + 1])
      gt[y0:y1, x0:x1] = 1
    # Nearest-neighbour GT on the canvas, plus noise of varied strength.
    ys = np.minimum(((np.arange(h) + 0.5) * height / h).astype(int),
            height - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * width / w).astype(int),
            width - 1)
    logits = 2.0 * gt[ys][:, xs] - 1 + rng.normal(
      scale=rng.uniform(0.2, 2.0), size=(h, w))
    if n % 11 == 3:  # Some predictions are empty.
      logits -= 10
    responses[n] = rng.normal(scale=50, size=(S, S))  # Canvas padding.
    responses[n, :h, :w] = logits
    masks[n, :height, :width] = gt
    orig[n] = height, width
    content[n] = h, w
  return responses, masks, orig, content


def _numpy_reference(responses, masks, orig, content, threshold):
  """Independent float64 implementation of the RES metrics."""
  ious, inters, unions, points = [], [], [], []
  for canvas, mask, (height, width), (h, w) in zip(responses, masks, orig,
                                                     content):
    y = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    x = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    c = canvas.astype(np.float64)
    resp = ((1 - fy) * (1 - fx) * c[np.ix_(y0, x0)]
        + (1 - fy) * fx * c[np.ix_(y0, x1)]
        + fy * (1 - fx) * c[np.ix_(y1, x0)]
        + fy * fx * c[np.ix_(y1, x1)])
    gt = mask[:height, :width].astype(bool)
    pred = resp > threshold
    inter, union = (pred & gt).sum(), (pred | gt).sum()
    inters.append(inter)
    unions.append(union)
    ious.append(inter / union if union else 1.0)
    points.append(gt.flat[np.argmax(resp)])
  ious = np.array(ious)
  result = {
    'mIoU': ious.mean(),
    'oIoU': sum(inters) / sum(unions),
    'PointM': np.mean(points),
    'num_expressions': len(ious),
  }
  for x in (0.5, 0.6, 0.7, 0.8, 0.9):
    result[f'prec@{x}'] = np.mean(ious > x)
  return result


def _batch_states(data, batch_size, threshold, seed):
  """Scores `data` in batches; the last one is padded with junk valid=0."""
  rng = np.random.default_rng(seed)
  num = len(data[0])
  states = []
  for start in range(0, num, batch_size):
    parts = [x[start:start + batch_size] for x in data]
    pad = batch_size - len(parts[0])
    junk = _make_dataset(pad, seed=rng.integers(1 << 30))
    parts = [np.concatenate([p, j]) for p, j in zip(parts, junk)]
    valid = np.arange(batch_size) < batch_size - pad
    states.append(score(*parts, valid, threshold=threshold))
  return states


@pytest.fixture(scope='module')
def dataset():
  return _make_dataset(37, seed=2)


@pytest.mark.parametrize('threshold', [0.0, 0.5])
def test_matches_numpy_reference(dataset, threshold):
  result = score(*dataset, np.ones(37, bool), threshold=threshold).compute()
  reference = _numpy_reference(*dataset, threshold)
  _assert_results_close(result, reference, rtol=1e-5)
  # The data must exercise the interesting ranges.
  assert 0.2 < result['mIoU'] < 0.9
  assert result['prec@0.5'] > result['prec@0.9']
  assert 0 < result['PointM'] < 1


def test_batching_merge_order_and_hosts_invariance(dataset):
  whole = score(*dataset, np.ones(37, bool)).compute()
  rng = np.random.default_rng(3)
  for batch_size in (5, 7, 11):
    states = _batch_states(dataset, batch_size, 0.0, seed=batch_size)
    _assert_results_close(_merge_all(states).compute(), whole)
    shuffled = [states[i] for i in rng.permutation(len(states))]
    _assert_results_close(_merge_all(shuffled).compute(), whole)
    for num_hosts in (2, 3):
      hosts = [_merge_all(states[h::num_hosts])
                     for h in range(num_hosts)]
      _assert_results_close(_merge_all(hosts[::-1]).compute(), whole)
      # Gathered per-host states with a leading axis: clu's reduce().
      stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *hosts)
      _assert_results_close(stacked.reduce().compute(), whole)


def test_padding_rows_change_nothing(dataset):
  valid = np.ones(37, bool)
  valid[[0, 10, 36]] = False
  masked = score(*dataset, valid).compute()
  kept = [np.delete(x, [0, 10, 36], axis=0) for x in dataset]
  direct = score(*kept, np.ones(34, bool)).compute()
  _assert_results_close(masked, direct)


def test_empty_is_identity_and_merge_is_associative(dataset):
  a, b, c = _batch_states(dataset, 13, 0.0, seed=4)
  _assert_states_equal(RESMetrics.empty().merge(a), a)
  _assert_states_equal(a.merge(RESMetrics.empty()), a)
  left, right = a.merge(b).merge(c), a.merge(b.merge(c))
  for name in ('intersection', 'union', 'prec_hits', 'point_hits', 'count'):
    np.testing.assert_array_equal(getattr(left, name),
                                      getattr(right, name))
  np.testing.assert_allclose(left.iou_sum, right.iou_sum, rtol=1e-6)


# pylint: disable-next=protected-access
_limbs_to_int = metrics._limbs_to_int


def test_pixel_sums_do_not_overflow_int32(dataset):
  # Doubling a state 23 times pushes Σ|P ∪ G| far past 2**31.
  state = score(*dataset, np.ones(37, bool))
  union = _limbs_to_int(state.union)
  big = state
  for _ in range(23):
    big = big.merge(big)
  assert _limbs_to_int(big.union) == union << 23
  assert union << 23 > 2**31
  result, small = big.compute(), state.compute()
  assert result['num_expressions'] == 37 << 23
  for key in KEYS:
    np.testing.assert_allclose(result[key], small[key], rtol=1e-6)


def test_jit_matches_eager_and_traced_threshold(dataset):
  valid = np.ones(37, bool)
  eager = RESMetrics.from_model_output(*dataset, valid, threshold=0.0)
  _assert_states_equal(score(*dataset, valid, threshold=0.0), eager)
  traced = jax.jit(RESMetrics.from_model_output)(
    *dataset, valid, threshold=jnp.float32(0.0))
  _assert_states_equal(traced, eager)
