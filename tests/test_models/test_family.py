"""The per-family facts on every DETR-family member, built shrunk in-process
from mmdet's real configs (and the project's shapes configs)."""
import pytest
import torch
import torch.nn as nn

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import (class_activation, decoder_outputs,
                               detection_head, detector_family,
                               distillation_outputs, float_weights,
                               proposal_branches)
from mmdet_hawq.quant import list_weights, quantizable_weights
from mmdet_hawq.sensitivity import preprocess_batches
from ..conftest import FAMILY_CONFIGS, SCRIPT_DIRS, build_from

EXPECTED = {
    'deformable': ('Deformable DETR', 'sigmoid'),
    'deformable_refine': ('Deformable DETR', 'sigmoid'),
    'deformable_twostage': ('Deformable DETR', 'sigmoid'),
    'dino': ('DINO', 'sigmoid'),
    'conditional': ('Conditional DETR', 'sigmoid'),
    'dab': ('DAB-DETR', 'sigmoid'),
    'ddq': ('DDQ-DETR', 'sigmoid'),
}


def batch_of(model, cfg):
    from mmdet_hawq.engine.calibration import build_calibration
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=2, batch_size=2))
    return preprocess_batches(model, loader)[0]


@pytest.mark.parametrize('name', sorted(FAMILY_CONFIGS))
def test_family_facts_outputs_and_float_head(family_cfg, name):
    cfg = family_cfg(name)
    model = build_from(cfg)
    family, activation = EXPECTED[name]
    assert detector_family(model).name == family
    assert class_activation(model) == activation
    with torch.no_grad():
        cls, box = decoder_outputs(model, batch_of(model, cfg))
    num_layers = cfg.model.decoder.num_layers
    # (L, B, Q, C) with C = num_classes for a sigmoid head
    assert tuple(cls.shape) == (num_layers, 2, 6, 4)
    assert tuple(box.shape) == (num_layers, 2, 6, 4)
    assert 0 <= box.min() and box.max() <= 1
    # every weight the head owns stays float, found by identity: the
    # head's parameter set is exactly the float-by-structure set
    head = detection_head(model)
    head_ids = {id(p) for p in head.parameters()}
    reasons = float_weights(model)
    assert set(reasons) == head_ids
    infos = list_weights(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for info in infos:
        in_head = id(params[info.name]) in head_ids
        assert info.included != in_head, info.name
        if in_head:
            assert info.reason == reasons[id(params[info.name])]
            assert info.reason.startswith((
                'final class/box FFN', 'dense auxiliary branch')), info.name
    assert sum(i.included for i in infos) > 10
    # the head's final layers really are the class/box branches
    head_names = {n for n, _ in head.named_parameters()}
    assert any(n.startswith(('cls_branches', 'fc_cls')) for n in head_names)
    assert any(n.startswith(('reg_branches', 'fc_reg')) for n in head_names)
    assert not any('memory_trans' in n for n in head_names)


def test_the_first_family_match_wins_for_subclasses(family_cfg):
    model = build_from(family_cfg('dino'))  # DINO subclasses DeformableDETR
    assert detector_family(model).name == 'DINO'


def test_unsupported_detector_is_one_clear_line():

    class RetinaNet(nn.Module):
        pass

    with pytest.raises(HawqUserError) as err:
        detector_family(RetinaNet())
    msg = str(err.value)
    assert 'RetinaNet is not supported' in msg and 'DINO' in msg
    assert '\n' not in msg


def test_no_decoder_outputs_in_tensor_mode_is_one_clear_line(family_cfg):
    cfg = family_cfg('conditional')
    model = build_from(cfg)
    batch = batch_of(model, cfg)
    head = detection_head(model)
    forward = head.forward
    # a head that returns only the last layer's scores
    head.forward = lambda *a, **k: forward(*a, **k)[0][-1]
    with pytest.raises(HawqUserError, match='return_intermediate') as err:
        decoder_outputs(model, batch)
    assert '\n' not in str(err.value)


def test_weight_pattern_that_matches_nothing_is_rejected(family_cfg):
    model = build_from(family_cfg('dino'))
    with pytest.raises(HawqUserError, match=r"'encoder\.layer\.\*'"):
        quantizable_weights(model, exclude=['encoder.layer.*'])
    with pytest.raises(HawqUserError, match='match no quantizable'):
        quantizable_weights(model, include=['backbone.*', 'decoderx.*'])
    # a pattern that only matches float head weights still matches
    assert quantizable_weights(model, exclude=['bbox_head.*'])


@pytest.mark.parametrize('name', ['deformable', 'deformable_twostage',
                                  'dino', 'ddq'])
def test_encoder_proposals_join_the_distilled_outputs(family_cfg, name):
    cfg = family_cfg(name)
    model = build_from(cfg)
    batch = batch_of(model, cfg)
    groups = distillation_outputs(model, batch)
    if proposal_branches(model) is None:  # one-stage: the decoder alone
        assert len(groups) == 1
        return
    (cls, box), (p_cls, p_box) = groups
    assert torch.equal(cls, decoder_outputs(model, batch)[0])
    # every encoder token of every image gets a score and a box offset
    num_tokens = sum(m.shape[-2] * m.shape[-1] for m in
                     model.extract_feat(batch['inputs']))
    assert p_cls.shape == (1, cls.shape[1], num_tokens, cls.shape[-1])
    assert p_box.shape == (1, cls.shape[1], num_tokens, 4)
    # memory_trans_fc feeds only the top-k selection: no gradient through
    # the decoder's outputs, one through the proposal scores
    w = model.memory_trans_fc.weight
    g_dec = torch.autograd.grad(cls.sum(), w, allow_unused=True)[0]
    assert g_dec is None or not g_dec.any()
    assert torch.autograd.grad(p_cls.sum(), w)[0].abs().sum() > 0


def test_per_family_names_live_in_the_adapters_only():
    """The head, its branches and the two-stage query selection are named
    only by the family adapters (mmdet_hawq/models/adapters/), nowhere else
    in the package or the tools."""
    import glob
    import os.path as osp
    import re

    import mmdet_hawq
    root = osp.dirname(osp.dirname(mmdet_hawq.__file__))
    names = re.compile(r'\b(bbox_head|cls_branches|reg_branches|'
                       r'as_two_stage|pre_decoder|dqs_cfg)\b')
    adapters = osp.join('mmdet_hawq', 'models', 'adapters') + osp.sep
    found = []
    for path in sorted(glob.glob(osp.join(root, 'mmdet_hawq', '**', '*.py'),
                                 recursive=True) +
                       [p for d in SCRIPT_DIRS for p in
                        glob.glob(osp.join(root, d, '*.py'))]):
        rel = osp.relpath(path, root)
        if rel.startswith(adapters):
            continue
        with open(path) as f:
            found += [f'{rel}:{i}' for i, line in enumerate(f, 1)
                      if names.search(line)]
    assert not found, found
