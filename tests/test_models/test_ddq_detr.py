"""DDQ-DETR's own facts, held by its adapter: the dense auxiliary branch is
float and reached by Loss Sen's loss only with the detector's, decoder's and
head's training flags set (the hook runs are in test_family_hook)."""
import torch

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.models import detection_head, detector_family
from mmdet_hawq.models.adapters import DINOAdapter
from mmdet_hawq.quant import list_weights
from mmdet_hawq.sensitivity import DetrLossObjective, preprocess_batches
from ..conftest import build_from


def test_dense_branch_is_float_and_in_the_loss(family_cfg):
    from mmdet_hawq.engine.calibration import build_calibration
    cfg = family_cfg('ddq')
    model = build_from(cfg)
    family, head = detector_family(model), detection_head(model)
    assert family.name == 'DDQ-DETR' and family.loss_needs_training_flag
    # the dense branches (decoder and encoder) stay float, said as such
    dense = {id(p) for m in (head.aux_cls_branches, head.aux_reg_branches,
                             head.cls_branches[-1], head.reg_branches[-1])
             for p in m.parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    notes = {i.reason for i in list_weights(model)
             if id(params[i.name]) in dense}
    assert notes == {'dense auxiliary branch of the head (DDQDETRHead), '
                     'training only'}
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=1, batch_size=1))
    batches = preprocess_batches(model, loader)
    calls = []
    handle = head.aux_cls_branches[0].register_forward_hook(
        lambda *args: calls.append(1))
    objective = DetrLossObjective(model, batches, True)
    loss = objective.loss(0)
    # the dense queries went through their branches; every flag restored
    assert calls and torch.isfinite(loss) and loss > 0
    assert not any(m.training for m in family.training_flag_modules(model))
    # DINO's rule (the detector's flag alone) would score them with the
    # main branches and skip the auxiliary ones
    calls.clear()
    with DINOAdapter().training_flag(model):
        model.loss(batches[0]['inputs'], batches[0]['data_samples'])
    handle.remove()
    assert not calls
