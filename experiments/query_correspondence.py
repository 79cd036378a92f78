"""Teacher and student queries in a two-stage model: the distillation loss
of the 8-bit student with and without the teacher's query selection.

On held-out images (the test split), per image: the student's distillation
loss against its float teacher when the student makes its own query
selection (the queries compared by index may be other proposals) and when
it replays the teacher's (:func:`mmdet_hawq.models.same_queries`, what the
sensitivity step does); the share of the L1 box term in each; how many of
the student's own selected proposals are the teacher's; and how far each
last-layer student box is from the nearest teacher box (small when the
queries are only reordered).

Example:
    python experiments/query_correspondence.py \
        configs/dino/dino_tiny_shapes.py \
        --checkpoint checkpoints/dino_tiny_shapes.pth --images 8
"""
import argparse
import copy
import sys
from typing import Dict, List

import numpy as np
import torch

from mmdet_hawq.api import CalibrationSettings, distillation_objective
from mmdet_hawq.engine.calibration import build_calibration
from mmdet_hawq.engine.cli import load_detector, read_config, write_json
from mmdet_hawq.models import decoder_outputs, same_queries
from mmdet_hawq.quant import quantizable_weights
from mmdet_hawq.sensitivity import DistillationObjective, preprocess_batches


def parts(obj: DistillationObjective, student_groups, teacher_groups
          ) -> Dict[str, float]:
    """The KL and L1 terms of one batch, as the objective weighs them."""
    from mmdet_hawq.sensitivity.class_head import temperature_kl
    (cls, box), (t_cls, t_box) = student_groups[0], teacher_groups[0]
    norm = obj._norm(cls)
    kl = obj.lambda_kl * temperature_kl(cls, t_cls, obj.temperature,
                                        obj.activation) * norm
    l1 = (box - t_box).abs().sum() * norm
    return dict(loss=float(kl + l1), l1_share=float(l1 / (kl + l1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--images', type=int, default=8)
    p.add_argument('--out', help='JSON file for the results')
    args = p.parse_args()
    cfg = read_config(args.config)
    student = load_detector(cfg, args.checkpoint, '--checkpoint')
    weights = quantizable_weights(student)
    held_out = copy.deepcopy(cfg)
    held_out.train_dataloader = copy.deepcopy(cfg.test_dataloader)
    loader, img_ids = build_calibration(held_out, CalibrationSettings(
        num_images=args.images, batch_size=1))
    batches = preprocess_batches(student, loader)
    obj = distillation_objective(student, weights, batches)  # 8-bit student
    teacher = obj.teacher
    rows: List[Dict] = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            picked, own = [], []
            with same_queries(teacher, picked, replay=False):
                t = decoder_outputs(teacher, batch)
            with same_queries(student, own, replay=False):
                s_own = decoder_outputs(student, batch)
            with same_queries(student, picked, replay=True):
                s_shared = decoder_outputs(student, batch)
            same = float(np.mean([
                np.isin(a.cpu().numpy(), b.cpu().numpy()).mean()
                for (_, a), (_, b) in zip(own, picked)]))
            nearest = torch.cdist(s_own[1][-1, 0], t[1][-1, 0], p=1).min(1)
            rows.append(dict(
                img_id=img_ids[i], own=parts(obj, [s_own], [t]),
                shared=parts(obj, [s_shared], [t]),
                same_proposals=same,
                max_l1_to_nearest_teacher_box=float(nearest.values.max()),
                same_order=all(torch.equal(a, b) for (_, a), (_, b) in
                               zip(own, picked))))
    summary = {k: float(np.mean([r[k.split('.')[0]][k.split('.')[1]]
                                 for r in rows]))
               for k in ('own.loss', 'own.l1_share', 'shared.loss',
                         'shared.l1_share')}
    summary.update(
        images=len(rows),
        same_order_images=sum(r['same_order'] for r in rows),
        same_proposals=float(np.mean([r['same_proposals'] for r in rows])),
        max_l1_to_nearest_teacher_box=float(np.max(
            [r['max_l1_to_nearest_teacher_box'] for r in rows])))
    print(f"{args.config}: {len(rows)} held-out images, 8-bit student; "
          f"own selection: loss {summary['own.loss']:.4g} "
          f"({summary['own.l1_share']:.1%} L1), the same top-k order on "
          f"{summary['same_order_images']} of {len(rows)} images, "
          f"{summary['same_proposals']:.1%} of its proposals the teacher's, "
          'every last-layer box within L1 '
          f"{summary['max_l1_to_nearest_teacher_box']:.3f} of a teacher box;"
          f" the teacher's selection: loss {summary['shared.loss']:.4g} "
          f"({summary['shared.l1_share']:.1%} L1)")
    if args.out:
        write_json(args.out, dict(config=args.config, summary=summary,
                                  rows=rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
