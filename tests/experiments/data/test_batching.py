"""Training subsets (task.train_limit): seeded, and stratified by label for classification."""

import numpy as np
import pytest

from loraxs_jax.experiments.data.batching import subset


def test_a_subset_of_a_label_sorted_set_keeps_every_labels_share():
    labels = np.array([1] * 4824 + [0] * 4925)        # SST-2's train labels, sorted
    idx = subset(len(labels), 320, seed=0, labels=labels)
    assert len(idx) == len(set(idx)) == 320 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [162, 158]   # 320 * 4925/9749 = 161.7
    assert not np.array_equal(idx, subset(len(labels), 320, seed=1, labels=labels))
    assert np.array_equal(idx, subset(len(labels), 320, seed=0, labels=labels))


@pytest.mark.parametrize("counts,limit,expected", [
    ([10, 20, 70], 7, [1, 1, 5]),          # quotas 0.7, 1.4, 4.9: largest remainders
    ([1, 99], 10, [0, 10]),
    ([50, 50], 99, [50, 49]),
])
def test_shares_are_rounded_by_largest_remainders(counts, limit, expected):
    labels = np.repeat(np.arange(len(counts)), counts)
    idx = subset(len(labels), limit, seed=3, labels=labels)
    assert np.bincount(labels[idx], minlength=len(counts)).tolist() == expected


def test_no_labels_draws_uniformly_and_no_limit_keeps_all():
    idx = subset(1000, 100, seed=0)
    assert len(set(idx)) == 100 and idx.max() > 500          # not the first 100
    assert subset(10, 0, seed=0).tolist() == list(range(10))
    assert subset(10, 25, seed=0).tolist() == list(range(10))
