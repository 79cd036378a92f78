from typing import Sequence

import numpy as np

from mmdet_hawq.sensitivity import class_histogram, select_calibration_indices


def distribution_distance(cat_ids: Sequence[Sequence[int]],
                          indices: Sequence[int], num_classes: int) -> float:
    """L1 distance between the subset's and the whole set's class
    distributions (0 = identical, 2 = disjoint)."""
    whole = class_histogram(cat_ids, num_classes)
    part = class_histogram([cat_ids[i] for i in indices], num_classes)
    return float(np.abs(part / max(part.sum(), 1) -
                        whole / max(whole.sum(), 1)).sum())


def test_selection_matches_distribution_and_is_deterministic():
    rng = np.random.RandomState(0)
    probs = np.array([0.6, 0.25, 0.1, 0.05])
    cat_ids = [list(rng.choice(4, size=rng.randint(1, 6), p=probs))
               for _ in range(2000)]
    picked = select_calibration_indices(cat_ids, 100, 4, seed=0)
    assert picked == select_calibration_indices(cat_ids, 100, 4, seed=0)
    assert len(set(picked)) == 100
    random_pick = list(np.random.RandomState(1).choice(2000, 100, False))
    assert distribution_distance(cat_ids, picked, 4) < 0.02
    assert distribution_distance(cat_ids, picked, 4) < distribution_distance(
        cat_ids, random_pick, 4)


def test_small_dataset_takes_everything():
    assert select_calibration_indices([[0], [1]], 5, 2) == [0, 1]
