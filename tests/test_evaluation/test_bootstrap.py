"""The bootstrap's replicates against pycocotools run from scratch."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mmdet_hawq.evaluation import (coco_map_bootstrap, matched_images,
                                   resampled_map)


def synthetic(num_images: int = 12, seed: int = 0):
    """Ground truth (2 classes, some images without objects) and noisy
    detections with false positives."""
    rng = np.random.RandomState(seed)
    images, anns, dets = [], [], []
    for i in range(1, num_images + 1):
        images.append(dict(id=i, width=100, height=100, file_name=f'{i}.png'))
        for _ in range(rng.randint(0, 4)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(8, 40, 2)
            cat = int(rng.randint(1, 3))
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=cat,
                             bbox=[x, y, w, h], area=w * h, iscrowd=0))
            if rng.rand() < 0.8:
                jit = rng.normal(0, 3, 4)
                dets.append(dict(image_id=i, category_id=cat,
                                 bbox=list(np.array([x, y, w, h]) + jit),
                                 score=float(rng.rand())))
        for _ in range(rng.randint(0, 3)):
            dets.append(dict(image_id=i, category_id=int(rng.randint(1, 3)),
                             bbox=list(rng.uniform(0, 50, 4) + [0, 0, 5, 5]),
                             score=float(rng.rand() * 0.6)))
    gt = dict(images=images, annotations=anns,
              categories=[dict(id=1, name='a'), dict(id=2, name='b')])
    return gt, dets


def coco_map(gt: dict, dets: list) -> float:
    """pycocotools' own mAP (stats[0]) of in-memory ground truth and
    detections."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def write(tmp_path, gt, dets):
    gt_file, dt_file = tmp_path / 'gt.json', tmp_path / 'dt.json'
    gt_file.write_text(json.dumps(gt))
    dt_file.write_text(json.dumps(dets))
    return str(gt_file), str(dt_file)


def renamed(gt: dict, dets: list, picks) -> tuple:
    """The resampled data set written out: the k-th pick is a new image."""
    ids = [img['id'] for img in gt['images']]
    images, anns, out = [], [], []
    for new, pos in enumerate(picks, start=1):
        old = ids[pos]
        images.append(dict(gt['images'][pos], id=new))
        for a in gt['annotations']:
            if a['image_id'] == old:
                anns.append(dict(a, id=len(anns) + 1, image_id=new))
        out += [dict(d, image_id=new) for d in dets if d['image_id'] == old]
    return dict(gt, images=images, annotations=anns), out


def test_all_images_give_pycocotools_map(tmp_path):
    gt, dets = synthetic()
    ev = matched_images(*write(tmp_path, gt, dets))
    assert resampled_map(ev, range(len(gt['images']))) == pytest.approx(
        coco_map(gt, dets), abs=1e-12)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_replicate_equals_pycocotools_on_the_resampled_set(tmp_path, seed):
    gt, dets = synthetic(seed=seed)
    ev = matched_images(*write(tmp_path, gt, dets))
    picks = np.random.RandomState(seed).randint(0, len(gt['images']),
                                                len(gt['images']))
    assert len(set(picks)) < len(picks)  # repeats are exercised
    assert resampled_map(ev, picks) == pytest.approx(
        coco_map(*renamed(gt, dets, picks)), abs=1e-12)


def test_interval(tmp_path):
    gt, dets = synthetic(num_images=30)
    files = write(tmp_path, gt, dets)
    out = coco_map_bootstrap(*files, reps=60, seed=0)
    assert out['mAP'] == pytest.approx(coco_map(gt, dets), abs=1e-12)
    assert out['low'] < out['mAP'] < out['high']
    assert out['std'] > 0 and out['images'] == 30
    assert len(out['replicates']) == 60
    assert out['low'] == pytest.approx(np.percentile(out['replicates'], 2.5))
    assert coco_map_bootstrap(*files, reps=60, seed=0) == out
    assert coco_map_bootstrap(*files, reps=60, seed=1) != out


def test_no_detections_is_zero(tmp_path):
    gt, _ = synthetic()
    out = coco_map_bootstrap(*write(tmp_path, gt, []), reps=5)
    assert out['mAP'] == 0 and out['low'] == out['high'] == 0
