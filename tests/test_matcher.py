"""Matcher on a hand-made IoU matrix; the balanced sampler's counts and seeding."""

import numpy as np
import pytest

from minimask.backend import to_device
from minimask.ops import BalancedPositiveNegativeSampler, Matcher

# 3 ground-truth boxes (rows) x 6 predictions (columns).
IOU = np.array([
    [0.90, 0.50, 0.10, 0.00, 0.20, 0.00],  # gt 0: best 0.90 at pred 0
    [0.10, 0.60, 0.20, 0.40, 0.20, 0.00],  # gt 1: best 0.60 at pred 1
    [0.00, 0.00, 0.25, 0.25, 0.10, 0.00],  # gt 2: best 0.25 at preds 2 and 3 (a tie)
])
# Each prediction's best: pred 0 -> gt 0 at 0.9 (>= 0.7: matched); pred 1 -> gt 1 at 0.6 and
# pred 3 -> gt 1 at 0.4 (between 0.3 and 0.7); pred 2 -> gt 2 at 0.25, pred 4 -> 0.2 (tie of gt 0
# and gt 1), pred 5 -> 0 (below 0.3).


def test_matcher_thresholds():
    matches = Matcher(0.7, 0.3)(IOU)
    np.testing.assert_array_equal(matches, [0, -2, -1, -2, -1, -1])
    assert matches.dtype == np.int64
    assert Matcher.BELOW_LOW_THRESHOLD == -1 and Matcher.BETWEEN_THRESHOLDS == -2


def test_matcher_low_quality_matches_with_ties():
    matches = Matcher(0.7, 0.3, allow_low_quality_matches=True)(IOU)
    # gt 1's best prediction (pred 1) comes back; both of gt 2's tied best predictions (2, 3)
    # come back too.  As in torchvision, each is matched to its *own* best gt: pred 3's best is
    # gt 1 (0.4 > 0.25), so pred 3 gets gt 1, not gt 2.
    np.testing.assert_array_equal(matches, [0, 1, 2, 1, -1, -1])


def test_matcher_threshold_edges():
    iou = np.array([[0.7, 0.3, 0.2999, 0.6999]])
    np.testing.assert_array_equal(Matcher(0.7, 0.3)(iou), [0, -2, -1, -2])  # >= high, >= low
    # Equal thresholds (the heads' 0.5): no prediction is ignored.
    np.testing.assert_array_equal(Matcher(0.5, 0.5)(np.array([[0.5, 0.4999, 0.9]])), [0, -1, 0])


def test_matcher_empty_inputs_and_errors():
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    np.testing.assert_array_equal(matcher(np.zeros((0, 4))), [-1, -1, -1, -1])  # no objects
    assert matcher(np.zeros((3, 0))).shape == (0,)
    with pytest.raises(ValueError, match="must not exceed"):
        Matcher(0.3, 0.7)
    with pytest.raises(ValueError, match="num_gt, num_pred"):
        matcher(np.zeros(5))


def make_labels(rng, num_pos, num_neg, num_ignored):
    labels = np.concatenate([rng.integers(1, 5, num_pos), np.zeros(num_neg, np.int64),
                             -np.ones(num_ignored, np.int64)])
    return labels[rng.permutation(labels.size)]


@pytest.mark.parametrize("num_pos, num_neg, expected_pos, expected_neg", [
    (10, 100, 8, 24),  # positives capped at 32 * 0.25 = 8, negatives fill to 32
    (3, 100, 3, 29),  # too few positives: negatives fill the free places
    (3, 5, 3, 5),  # too few of both: take them all
    (0, 100, 0, 32),
])
def test_sampler_counts(rng, num_pos, num_neg, expected_pos, expected_neg):
    labels = make_labels(rng, num_pos, num_neg, 20)
    sampler = BalancedPositiveNegativeSampler(32, 0.25, seed=0)
    ((pos, neg),) = sampler([labels])
    assert pos.dtype == bool and pos.shape == labels.shape
    assert pos.sum() == expected_pos and neg.sum() == expected_neg
    assert np.all(labels[pos] >= 1) and np.all(labels[neg] == 0)  # never an ignored (-1) one
    assert not np.any(pos & neg)


def test_sampler_seeding_and_several_images(rng):
    images = [make_labels(rng, 30, 200, 10), make_labels(rng, 5, 50, 0)]
    first = BalancedPositiveNegativeSampler(64, 0.5, seed=7)(images)
    again = BalancedPositiveNegativeSampler(64, 0.5, seed=7)(images)
    other = BalancedPositiveNegativeSampler(64, 0.5, seed=8)(images)
    assert len(first) == 2
    assert [(p.sum(), n.sum()) for p, n in first] == [(30, 34), (5, 50)]
    for (p1, n1), (p2, n2) in zip(first, again):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(n1, n2)
    assert not np.array_equal(first[0][1], other[0][1])  # another seed, other negatives


def test_sampler_draws_uniformly(rng):
    labels = np.array([1] * 10 + [0] * 10)
    sampler = BalancedPositiveNegativeSampler(4, 0.5, seed=1)
    counts = np.zeros(20)
    for _ in range(300):  # each draw takes 2 of 10 positives and 2 of 10 negatives
        ((pos, neg),) = sampler([labels])
        counts += pos + neg
    # Expected 60 picks each; 30..90 is far outside the binomial spread (sd about 7).
    assert counts.min() > 30 and counts.max() < 90


def test_sampler_errors():
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedPositiveNegativeSampler(256, 1.5)
    with pytest.raises(ValueError, match="1-D"):
        BalancedPositiveNegativeSampler(256, 0.5)([np.zeros((2, 2))])


@pytest.mark.gpu
def test_matcher_and_sampler_on_gpu(rng):
    iou = to_device(IOU, "gpu")
    for matcher in (Matcher(0.7, 0.3), Matcher(0.7, 0.3, allow_low_quality_matches=True)):
        np.testing.assert_array_equal(to_device(matcher(iou), "cpu"), matcher(IOU))
    labels = make_labels(rng, 30, 200, 10)
    (cpu_pos, cpu_neg), = BalancedPositiveNegativeSampler(64, 0.25, seed=3)([labels])
    (gpu_pos, gpu_neg), = BalancedPositiveNegativeSampler(64, 0.25, seed=3)([to_device(labels, "gpu")])
    np.testing.assert_array_equal(to_device(gpu_pos, "cpu"), cpu_pos)  # same seed, same draw
    np.testing.assert_array_equal(to_device(gpu_neg, "cpu"), cpu_neg)
