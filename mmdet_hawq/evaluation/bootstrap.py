"""Bootstrap intervals of COCO bbox mAP over the evaluation images.

A table cell is one mAP on one set of validation images; how much of a
difference between two cells the images alone could make is what a
bootstrap over the images says. Each replicate draws the evaluated images
with replacement (a drawn-twice image counts twice) and recomputes the mAP
exactly as pycocotools does (AP averaged over IoU 0.50:0.95 and the
classes, area ``all``, 100 detections).

pycocotools matches detections to ground truth image by image
(``COCOeval.evaluate``), then ranks all matches by score
(``COCOeval.accumulate``). The per-image matching does not depend on which
other images are evaluated, so it runs once; a replicate only re-runs the
ranking over its images' matches. ``tests/test_evaluation`` checks a
replicate against pycocotools run from scratch on the resampled images
renamed apart.
"""
import contextlib
import io
import json
from typing import Dict, List, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ['coco_map_bootstrap', 'matched_images', 'resampled_map']


def matched_images(gt_file: str, results_file: str) -> COCOeval:
    """pycocotools' per-image matching of a results file, done once.

    Args:
        gt_file (str): COCO-format ground-truth JSON (the evaluator's
            ``ann_file``).
        results_file (str): COCO-format detections JSON, a list of
            ``{image_id, category_id, bbox, score}`` (``CocoMetric``'s
            ``<outfile_prefix>.bbox.json``); may be an empty list.

    Returns:
        COCOeval: Evaluated at area ``all`` and 100 detections only (what
        mAP reads); ``evalImgs`` holds one entry per (class, image).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        with open(results_file) as f:
            dets = json.load(f)
        dt = gt.loadRes(dets) if dets else COCO()
        if not dets:
            dt.dataset = dict(images=gt.dataset['images'], annotations=[],
                              categories=gt.dataset['categories'])
            dt.createIndex()
        ev = COCOeval(gt, dt, 'bbox')
        ev.params.areaRng = [ev.params.areaRng[0]]
        ev.params.areaRngLbl = ['all']
        ev.params.maxDets = [100]
        ev.evaluate()
    return ev


def resampled_map(ev: COCOeval, picks: Sequence[int]) -> float:
    """mAP over the images at positions ``picks`` (repeats count again).

    Args:
        ev (COCOeval): From :func:`matched_images` (not modified).
        picks (Sequence[int]): Positions in ``ev.params.imgIds``.

    Returns:
        float: COCO mAP (IoU 0.50:0.95, area all, 100 detections); -1 when
        no picked image has ground truth, as pycocotools reports it.
    """
    params = ev._paramsEval
    num_images = len(params.imgIds)
    picks = list(picks)
    res = COCOeval()
    res.params = ev.params.__class__(iouType='bbox')
    for key in ('catIds', 'iouThrs', 'recThrs', 'areaRng', 'areaRngLbl',
                'maxDets', 'useCats'):
        setattr(res.params, key, getattr(params, key))
    res.params.imgIds = list(range(len(picks)))
    res._paramsEval = res.params
    res.evalImgs = [ev.evalImgs[k * num_images + i]
                    for k in range(len(params.catIds)) for i in picks]
    with contextlib.redirect_stdout(io.StringIO()):
        res.accumulate()
    precision = res.eval['precision'][..., 0, 0]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def coco_map_bootstrap(gt_file: str, results_file: str, reps: int = 200,
                       seed: int = 0, level: float = 0.95
                       ) -> Dict[str, float]:
    """The mAP of a results file and its percentile bootstrap interval.

    Args:
        gt_file (str): COCO-format ground-truth JSON.
        results_file (str): COCO-format detections JSON.
        reps (int): Bootstrap replicates. Defaults to 200.
        seed (int): Seed of the image draws (the same draws for every
            results file of one ground truth: paired). Defaults to 0.
        level (float): Coverage of the interval. Defaults to 0.95.

    Returns:
        dict: ``mAP`` (all images), ``low`` and ``high`` (the interval's
        ends), ``std`` (of the replicates), ``reps``, ``level``, ``images``
        and the ``replicates`` themselves (paired across results files of
        one ground truth and seed: replicate ``i`` draws the same images).
    """
    ev = matched_images(gt_file, results_file)
    num_images = len(ev._paramsEval.imgIds)
    rng = np.random.RandomState(seed)
    draws: List[float] = [
        resampled_map(ev, rng.randint(0, num_images, num_images))
        for _ in range(reps)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return dict(mAP=resampled_map(ev, range(num_images)), low=float(low),
                high=float(high), std=float(np.std(draws, ddof=1)),
                reps=reps, level=level, images=num_images, replicates=draws)
