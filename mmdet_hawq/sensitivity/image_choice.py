"""Calibration set: images whose class distribution approximates the split's.

The paper uses 100 training images "sampled such that the class distribution
of objects in the images roughly approximates that of the entire training
set". :func:`select_calibration_indices` does this greedily and
deterministically: from a seeded random pool it adds, one at a time, the
image that brings the selected set's class histogram closest (L1) to the
split's.
"""
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, Subset


def class_histogram(cat_ids: Sequence[Sequence[int]],
                    num_classes: int) -> np.ndarray:
    """Objects per class summed over images, shape (num_classes,)."""
    hist = np.zeros(num_classes, dtype=np.float64)
    for ids in cat_ids:
        for c in ids:
            hist[c] += 1
    return hist


def select_calibration_indices(cat_ids: Sequence[Sequence[int]],
                               num_images: int, num_classes: int,
                               seed: int = 0,
                               pool_factor: int = 20) -> List[int]:
    """Indices of ``num_images`` images matching the class distribution.

    Args:
        cat_ids (Sequence[Sequence[int]]): Per image, the 0-based class of
            each object.
        num_images (int): How many to pick.
        num_classes (int): Number of classes.
        seed (int): Seed of the random pool. Defaults to 0.
        pool_factor (int): Pool size as a multiple of ``num_images``.
            Defaults to 20.

    Returns:
        list[int]: Sorted image indices.
    """
    n = len(cat_ids)
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    if num_images >= n:
        return list(range(n))
    target = class_histogram(cat_ids, num_classes)
    target = target / max(target.sum(), 1.0)
    rng = np.random.RandomState(seed)
    pool = rng.permutation(n)[:min(n, pool_factor * num_images)]
    hists = np.stack([class_histogram([cat_ids[i]], num_classes)
                      for i in pool])
    chosen: List[int] = []
    current = np.zeros(num_classes)
    free = np.ones(len(pool), dtype=bool)
    for _ in range(num_images):
        cand = current[None] + hists
        sums = np.maximum(cand.sum(1, keepdims=True), 1.0)
        dist = np.abs(cand / sums - target[None]).sum(1)
        dist[~free] = np.inf
        k = int(np.argmin(dist))  # ties: the earliest in the seeded pool
        free[k] = False
        current += hists[k]
        chosen.append(int(pool[k]))
    return sorted(chosen)


def dataset_class_ids(dataset: Any) -> List[List[int]]:
    """Per image, the 0-based class of each object of an mmdet dataset
    (``get_data_info(i)['instances'][k]['bbox_label']``); no image is
    read."""
    return [[inst['bbox_label'] for inst in
             dataset.get_data_info(i)['instances']]
            for i in range(len(dataset))]


def calibration_loader(dataset: Any, num_images: int, batch_size: int,
                       seed: int = 0,
                       collate_fn: Optional[Callable] = None
                       ) -> Tuple[DataLoader, List[int]]:
    """A loader over ``num_images`` images of an mmdet dataset whose class
    distribution matches the dataset's (:func:`select_calibration_indices`).

    Args:
        dataset: An mmdet dataset (``metainfo['classes']``,
            ``get_data_info``), fully initialised.
        num_images (int): How many images.
        batch_size (int): Images per batch.
        seed (int): Seed of the choice. Defaults to 0.
        collate_fn (Callable, optional): Defaults to mmengine's
            ``pseudo_collate`` (what mmdet's data preprocessors take).

    Returns:
        tuple: (DataLoader in index order, the chosen indices).
    """
    if collate_fn is None:
        from mmengine.dataset import pseudo_collate as collate_fn
    indices = select_calibration_indices(
        dataset_class_ids(dataset), num_images,
        len(dataset.metainfo['classes']), seed)
    # not BaseDataset.get_subset: mmengine 0.10's copy behind it keeps one
    # deepcopy memo for the whole process (a mutable default argument), so
    # a later copy can get back an object of an earlier one whose id was
    # reused ("'ShapesDataset' object is not callable" inside the pipeline)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size,
                        shuffle=False, collate_fn=collate_fn)
    return loader, indices
