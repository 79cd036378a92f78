"""Teacher and student queries correspond in two-stage models: the student
replays the teacher's query selection (models/adapters/queries.py), tested
where the student's own selection takes other proposals in another order."""
import copy

import pytest
import torch

from mmdet_hawq.models import decoder_outputs, proposal_branches, same_queries
from mmdet_hawq.sensitivity import DistillationObjective

from ..conftest import build_from
from ..test_engine.test_family_hook import batches_of


def reordered_student(teacher):
    """The teacher with its proposal scoring perturbed: the encoder's top-k
    takes other tokens in another order; every other weight is the same."""
    student = copy.deepcopy(teacher)
    cls_branch, _ = proposal_branches(student)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in cls_branch.parameters():
            p.add_(torch.randn_like(p) * p.abs().mean() * 3)
    return student


@pytest.mark.parametrize('family', ['dino', 'deformable_twostage', 'ddq'])
def test_student_replays_the_teachers_selection(family_cfg, family):
    cfg = family_cfg(family)
    teacher = build_from(cfg)
    student = reordered_student(teacher)
    batch = batches_of(teacher, cfg)[0]
    picked, own = [], []
    with torch.no_grad():
        with same_queries(teacher, picked, replay=False):
            t_cls, t_box = decoder_outputs(teacher, batch)
        with same_queries(student, own, replay=False):
            s_cls, s_box = decoder_outputs(student, batch)
        # the case: the student's own selection differs from the teacher's
        assert picked and len(picked) == len(own)
        assert any(not torch.equal(a, b) for (_, a), (_, b) in
                   zip(picked, own))
        assert not torch.allclose(s_box, t_box)
        # replaying the teacher's: the same proposals, so (only the
        # proposal scoring differs) the same decoder outputs bit for bit
        with same_queries(student, picked, replay=True):
            r_cls, r_box = decoder_outputs(student, batch)
    assert torch.equal(r_box, t_box) and torch.equal(r_cls, t_cls)


def test_the_distillation_loss_compares_corresponding_queries(family_cfg):
    """Through the objective: the reordered student's loss is 0 (each
    query is the teacher's proposal, nothing else changed), and its
    Gauss-Newton sample is finite."""
    cfg = family_cfg('dino')
    teacher = build_from(cfg)
    student = reordered_student(teacher)
    batches = batches_of(teacher, cfg)
    weights = {n: p for n, p in student.named_parameters()
               if n.startswith('decoder.')}
    obj = DistillationObjective(student, teacher, batches, weights,
                                activation='sigmoid')
    assert all(obj.loss(i).item() == 0.0 for i in range(len(batches)))
    sample = obj.gauss_newton_sample(0, torch.Generator().manual_seed(0))
    assert torch.isfinite(sample)


def test_a_one_stage_detector_has_nothing_to_share(build_tiny_model):
    model = build_tiny_model()
    record = []
    with same_queries(model, record, replay=False):
        pass
    assert record == []
