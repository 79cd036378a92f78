import json
import os.path as osp

import numpy as np
from mmdet.datasets import CocoDataset
from mmdet.evaluation import CocoMetric

from mmdet_hawq.datasets import (SHAPES_CLASSES, ShapesDataset, ShapesSpec,
                                 generate_split)


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = ShapesSpec(image_size=48, min_size=8, max_size=20)
    a = generate_split(str(tmp_path / 'a'), 'val', 5, seed=11, spec=spec)
    b = generate_split(str(tmp_path / 'b'), 'val', 5, seed=11, spec=spec)
    c = generate_split(str(tmp_path / 'c'), 'val', 5, seed=12, spec=spec)
    assert open(a, 'rb').read() == open(b, 'rb').read()
    assert open(a, 'rb').read() != open(c, 'rb').read()
    for i in range(5):
        name = f'{i:06d}.png'
        assert (tmp_path / 'a' / 'val' / name).read_bytes() == (
            tmp_path / 'b' / 'val' / name).read_bytes()


def test_annotations_are_sane(tiny_data):
    coco = json.load(open(osp.join(tiny_data, 'annotations',
                                   'instances_train.json')))
    assert [c['name'] for c in coco['categories']] == list(SHAPES_CLASSES)
    assert [c['id'] for c in coco['categories']] == [1, 2, 3, 4]
    per_image = {}
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= 64 and y + h <= 64
        per_image[ann['image_id']] = per_image.get(ann['image_id'], 0) + 1
    assert set(per_image) == {im['id'] for im in coco['images']}
    assert max(per_image.values()) <= 3


def test_loads_in_mmdet_coco_dataset_and_scores_one_on_ground_truth(
        tiny_data):
    ann = osp.join(tiny_data, 'annotations', 'instances_val.json')
    ds = CocoDataset(data_root=tiny_data, ann_file=ann,
                     data_prefix=dict(img='val/'),
                     metainfo=dict(classes=SHAPES_CLASSES), pipeline=[])
    assert len(ds) == 4
    ours = ShapesDataset(data_root=tiny_data, ann_file=ann,
                         data_prefix=dict(img='val/'), pipeline=[])
    assert ours.metainfo['classes'] == SHAPES_CLASSES
    assert ours.get_data_info(0)['instances'] == ds.get_data_info(0)[
        'instances']
    # The ground truth as predictions must score mAP 1.0 with mmdet's
    # CocoMetric: category ids and class names agree.
    metric = CocoMetric(ann_file=ann, metric='bbox')
    metric.dataset_meta = ds.metainfo
    results = []
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        boxes = np.array([inst['bbox'] for inst in info['instances']],
                         dtype=np.float32)
        labels = np.array([inst['bbox_label'] for inst in info['instances']])
        import torch
        results.append(dict(
            img_id=info['img_id'], ori_shape=(64, 64),
            pred_instances=dict(bboxes=torch.from_numpy(boxes),
                                scores=torch.ones(len(labels)),
                                labels=torch.from_numpy(labels))))
    metric.process({}, results)
    scores = metric.evaluate(len(results))
    assert scores['coco/bbox_mAP'] == 1.0
