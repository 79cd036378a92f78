"""A loss, outputs or a trace that is not finite stops the run with one
:class:`HawqUserError` line naming the batch and its images, or the layers
(issue 15)."""
import copy

import pytest
import torch
import torch.nn as nn

from mmdet.structures import DetDataSample
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.sensitivity import (DetrLossObjective, DistillationObjective,
                                    gauss_newton_traces, hutchinson_traces)

Q, C = 3, 4  # queries, classes


class DETR(nn.Module):
    """Named as mmdet's DETR: its family adapter (the head is
    ``bbox_head``, the loss normalised there) applies to the subclass."""


class TinyDetector(DETR):
    """Scores and boxes from ``exp(gain · mean pixel)``: finite on ordinary
    images, overflowing float32 on bright ones when ``gain`` is large."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gain = gain
        self.cls = nn.Linear(3, Q * C)
        self.reg = nn.Linear(3, Q * 4)
        self.bbox_head = nn.Identity()

    def features(self, inputs):
        return torch.exp(self.gain * inputs.mean((2, 3)))

    def loss(self, inputs, data_samples):
        x = self.features(inputs)
        return dict(loss_cls=self.cls(x).pow(2).mean(),
                    loss_bbox=self.reg(x).sigmoid().mean())


def outputs(model, batch):
    """(scores (1, B, Q, C), boxes (1, B, Q, 4)) of one decoder layer."""
    x = model.features(batch['inputs'])
    b = x.shape[0]
    return (model.cls(x).view(1, b, Q, C),
            model.reg(x).sigmoid().view(1, b, Q, 4))


def make_batches():
    """Three batches of two images; batch 2 (index 1) is bright."""
    torch.manual_seed(1)
    batches = []
    for i in range(3):
        inputs = torch.rand(2, 3, 8, 8) + (9.0 if i == 1 else 0.0)
        samples = [DetDataSample(metainfo=dict(
            img_path=f'/data/shapes/train/img{2 * i + j}.png'))
            for j in range(2)]
        batches.append(dict(inputs=inputs, data_samples=samples))
    return batches


def weights(model):
    return {'cls.weight': model.cls.weight, 'reg.weight': model.reg.weight}


def distillation(student_gain, teacher_gain, batches):
    student = TinyDetector(student_gain)
    teacher = copy.deepcopy(student)
    teacher.gain = teacher_gain
    params = weights(student)
    return params, DistillationObjective(student, teacher, batches, params,
                                         outputs=outputs)


WHERE = ('on calibration batch 2 of 3 (images img2.png, img3.png): check '
         'that the checkpoint fits the config')


def test_student_outputs_name_the_batch_and_images():
    batches = make_batches()
    # exp(10 * 9.5) overflows float32, exp(9.5) does not
    params, obj = distillation(10.0, 1.0, batches)
    with pytest.raises(HawqUserError) as err:
        gauss_newton_traces(params, obj.gauss_newton_sample,
                            range(len(batches)), max_samples=2)
    assert str(err.value).startswith(
        "the student's outputs have NaN/Inf values " + WHERE)
    assert "calibration.dataset" in str(err.value)
    with pytest.raises(HawqUserError) as err:
        hutchinson_traces(params, obj.loss, range(len(batches)),
                          max_samples=2)
    assert str(err.value).startswith(
        "the student's distillation loss is nan " + WHERE)


def test_teacher_outputs_name_the_batch():
    batches = make_batches()
    params, obj = distillation(1.0, 10.0, batches)
    with pytest.raises(HawqUserError) as err:
        hutchinson_traces(params, obj.loss, range(len(batches)),
                          max_samples=2)
    assert str(err.value).startswith(
        "the float teacher's outputs have NaN/Inf values " + WHERE)


def test_finite_batches_pass():
    batches = make_batches()
    params, obj = distillation(10.0, 1.0, batches)
    res = gauss_newton_traces(params, obj.gauss_newton_sample, [0, 2],
                              tol=0.0, max_samples=3)
    assert res.num_samples == 3
    assert torch.isfinite(torch.tensor(res.samples)).all()


def test_detector_loss_names_the_batch():
    batches = make_batches()
    model = TinyDetector(10.0)
    obj = DetrLossObjective(model, batches)
    with pytest.raises(HawqUserError) as err:
        hutchinson_traces(weights(model), obj.loss, range(len(batches)),
                          max_samples=2)
    msg = str(err.value)
    assert msg.startswith("the detector's loss is ")
    assert msg.split(' ')[4] in ('nan', 'inf')
    assert ('on calibration batch 2 of 3 (images img2.png, img3.png): check '
            "these images' annotations") in msg


def test_images_are_optional():
    batches = [dict(inputs=b['inputs']) for b in make_batches()]
    params, obj = distillation(10.0, 1.0, batches)
    with pytest.raises(HawqUserError,
                       match=r'on calibration batch 2 of 3: check that'):
        gauss_newton_traces(params, obj.gauss_newton_sample, range(3),
                            max_samples=2)


class SqrtLayer(nn.Module):
    """``a`` is ordinary; ``sqrt(b)`` at ``b = 0`` has a finite value but
    an infinite gradient (and curvature)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -1.0]))
        self.b = nn.Parameter(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        return (self.a * x).pow(2).sum() + self.b.sqrt().sum()


@pytest.mark.parametrize('estimator', ['hutchinson', 'gauss_newton'])
def test_nonfinite_trace_names_the_layer(estimator):
    model = SqrtLayer()
    params = dict(model.named_parameters())
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])]
    assert torch.isfinite(model(xs[0]))
    with pytest.raises(HawqUserError) as err:
        if estimator == 'hutchinson':
            hutchinson_traces(params, lambda i: model(xs[i]), range(2),
                              max_samples=2)
        else:
            gauss_newton_traces(params, lambda i, gen: model(xs[i]),
                                range(2), max_samples=2)
    assert str(err.value) == (
        f'{estimator} trace sample 1 is NaN/Inf for 1 of 2 layers: b: their '
        "gradients overflow; keep them in float with the hook's "
        "exclude=[...] (e.g. exclude=['b']) or check their weights in the "
        'checkpoint')
