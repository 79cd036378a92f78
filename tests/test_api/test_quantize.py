"""``quantize()`` as a library call on the tiny DETR, with no Runner: the
plan and codes it returns, the trace cache it keeps, and its errors."""
import os

import pytest
import torch

from mmdet_hawq import Calibration, QuantSettings, quantize
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (fake_quantize, list_weights,
                              quantizable_weights)

SENS = dict(num_images=4, batch_size=2, min_samples=2, max_samples=2)


@pytest.fixture
def calibration(tiny_cfg, build_tiny_model):
    from mmdet_hawq.engine.calibration import calibration_set
    model = build_tiny_model()
    return calibration_set(tiny_cfg, model, QuantSettings(
        target_bits=4, sensitivity=SENS).calibration)


def test_uniform_plan_and_codes(build_tiny_model):
    model = build_tiny_model()
    before = {n: p.detach().clone()
              for n, p in quantizable_weights(model).items()}
    result = quantize(model, None, QuantSettings(metric='uniform', bits=4))
    assert set(result.plan) == set(before)
    assert {e.bits for e in result.plan.values()} == {4}
    params = dict(model.named_parameters())
    for name, value in before.items():
        assert torch.equal(params[name], fake_quantize(value, 4))
        assert torch.equal(result.quantized[name].dequantize(), params[name])
    assert [r['name'] for r in result.layers] == \
        [i.name for i in list_weights(build_tiny_model())]
    assert result.summary['avg_bits'] == 4.0
    assert result.summary['num_quantized'] == len(before)
    assert result.traces is None


def test_outquant_meets_the_budget_and_resumes_from_its_cache(
        build_tiny_model, calibration, tmp_path):
    settings = QuantSettings(target_bits=4, bit_range=(3, 6),
                             sensitivity=SENS)
    first = quantize(build_tiny_model(), calibration, settings,
                     cache_dir=str(tmp_path))
    assert first.summary['avg_bits'] <= 4 + 1e-9
    assert {e.rounding for e in first.plan.values()} == {'nearest'}
    assert first.traces.num_samples == 2
    assert len(os.listdir(tmp_path)) == 1
    rows = [r for r in first.layers if r['included']]
    assert all('trace_mean' in r for r in rows)
    # the same call again: every sample from the cache, the same plan
    again = quantize(build_tiny_model(), calibration, settings,
                     cache_dir=str(tmp_path))
    assert again.plan == first.plan
    assert again.traces.samples == first.traces.samples


def test_calibration_is_needed_where_it_is_read(build_tiny_model):
    with pytest.raises(HawqUserError, match='pass a Calibration'):
        quantize(build_tiny_model(), None, QuantSettings(target_bits=4))


def test_calibration_is_plain_data(calibration):
    assert isinstance(calibration, Calibration)
    assert len(calibration.img_ids) == SENS['num_images']
    assert len(calibration.batches) == 2


def test_activations_are_calibrated_and_quantized(build_tiny_model,
                                                  calibration):
    """With ``activations``: every input of the quantized Linear/Conv2d
    layers and the attentions' query/key/value get a range from the
    calibration images, and the model's outputs are those of the weights
    and activations both on their grids (hooks that stay on the model)."""
    from mmdet_hawq.models import decoder_outputs
    from mmdet_hawq.quant.activations import activation_modules
    weight_only = build_tiny_model()
    quantize(weight_only, None, QuantSettings(metric='uniform', bits=8))
    model = build_tiny_model()
    result = quantize(model, calibration, QuantSettings(
        metric='uniform', bits=8, activations=dict(method='minmax')))
    sites = activation_modules(model, list(result.quantized))
    assert sites and len(result.activations) >= len(sites)
    assert result.summary['activations'] == dict(
        bits=8, method='minmax', sites=len(result.activations))
    batch = calibration.batches[0]
    with torch.no_grad():
        a = decoder_outputs(model, batch)[1]
        b = decoder_outputs(weight_only, batch)[1]
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)
    # the hook quantizes before the test loop calls eval(): the ranges are
    # those of the model in eval mode (no dropout), and its mode is kept
    trained = build_tiny_model().train()
    again = quantize(trained, calibration, QuantSettings(
        metric='uniform', bits=8, activations=dict(method='minmax')))
    assert again.activations == result.activations and trained.training
    with pytest.raises(HawqUserError, match="activations method 'x'"):
        QuantSettings(metric='uniform', bits=8,
                      activations=dict(method='x'))
