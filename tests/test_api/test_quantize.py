"""``quantize()`` as a library call on the tiny DETR, with no Runner: the
plan and codes it returns, the trace cache it keeps, and its errors."""
import os

import pytest
import torch

from mmdet_hawq import (Calibration, CalibrationSettings, QuantSettings,
                        quantize)
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant import (fake_quantize, list_weights,
                              quantizable_weights)

CAL = dict(num_images=4, batch_size=2)
SENS = dict(min_samples=2, max_samples=2)


@pytest.fixture
def calibration(tiny_cfg, build_tiny_model):
    from mmdet_hawq.engine.calibration import calibration_set
    model = build_tiny_model()
    return calibration_set(tiny_cfg, model, CalibrationSettings(**CAL))


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
                             calibration=CAL, sensitivity=SENS)
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
    assert len(calibration.img_ids) == CAL['num_images']
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
        bits=8, method='minmax', sensitivity=False, int8_macs=None,
        float_sites=[], sites=len(result.activation_sites),
        int8_sites=len(result.activations))
    assert all(r['precision'] == 'int8' for r in result.activation_sites)
    assert any(r['site'].endswith(':output') for r in result.activation_sites)
    # minmax ranges clip nothing; every site has its SQNR
    assert all(r['clipped_share'] == 0.0 and (
        r['sqnr_db'] is None or r['sqnr_db'] > 20)  # None: exact
        for r in result.activation_sites)
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


def test_int8_sites_by_predicted_damage_under_a_mac_budget(build_tiny_model,
                                                           calibration):
    """With ``sensitivity`` every site gets a Gauss–Newton trace and a
    predicted damage (trace × squared error), every layer a measured
    damage; under ``int8_macs`` the int8 sites are the exact
    optimum of the site program on those numbers, the ``float_sites`` stay
    float, and only the int8 sites are quantized."""
    from mmdet_hawq.allocation.sites import choose_int8_sites
    model = build_tiny_model()
    result = quantize(model, calibration, QuantSettings(
        metric='uniform', bits=8, activations=dict(
            sensitivity=True, int8_macs=0.6,
            float_sites=['decoder.layers.1.*'])))
    rows = result.activation_sites
    assert all(r['trace'] >= 0 and r['predicted_damage'] >= 0 for r in rows)
    assert any(r['predicted_damage'] > 0 for r in rows)
    layers = [r for r in rows if r['site'] == r['layer']]
    # the choice reads each layer's measured damage
    damage = {r['layer']: r['layer_damage'] for r in layers}
    macs = {r['layer']: r['macs'] for r in layers}
    forced = [r['layer'] for r in layers
              if r['layer'].startswith('decoder.layers.1.')]
    assert forced
    want = choose_int8_sites(damage, macs, 0.6, forced)
    int8 = {r['layer'] for r in layers if r['precision'] == 'int8'}
    assert int8 == want and not int8 & set(forced)
    assert sum(macs[n] for n in int8) >= 0.6 * sum(macs.values())
    assert set(result.activations) == {r['site'] for r in rows
                                       if r['precision'] == 'int8'}
    assert len(result.activations) < len(rows)


@pytest.mark.parametrize('activations,message', [
    (dict(int8_macs=0.5), 'int8_macs=0.5 chooses sites by their measured '
     'damage: pass sensitivity=True'),
    (dict(int8_macs=1.5), 'int8_macs=1.5 is not a share of the MACs'),
    (dict(float_sites='fc'), "float_sites 'fc' is not a list of site name "
     'patterns'),
])
def test_bad_activation_settings_are_one_line(activations, message):
    with pytest.raises(HawqUserError, match=message) as err:
        QuantSettings(metric='uniform', bits=8, activations=activations)
    assert '\n' not in str(err.value)


def test_site_pattern_matching_nothing_and_impossible_budget_are_one_line(
        build_tiny_model, calibration):
    for activations, message in (
            (dict(float_sites=['nothing.*']), "float_sites pattern "
             "'nothing.*' matches no activation site"),
            (dict(float_sites=['*'], sensitivity=True, int8_macs=0.5),
             r'int8_macs=0.5 cannot be reached: .* at most 0.0000 of the '
             'MACs')):
        with pytest.raises(HawqUserError, match=message) as err:
            quantize(build_tiny_model(), calibration, QuantSettings(
                metric='uniform', bits=8, activations=activations))
        assert '\n' not in str(err.value)


def test_float_sites_alone_keep_those_float_and_the_rest_int8(
        build_tiny_model, calibration):
    """``float_sites`` without ``int8_macs`` or ``sensitivity``: the sites
    it matches (and their layers' other sites) stay float, every other
    site is quantized, with no sensitivity step."""
    result = quantize(build_tiny_model(), calibration, QuantSettings(
        metric='uniform', bits=8,
        activations=dict(float_sites=['decoder.layers.1.*'])))
    rows = result.activation_sites
    float_layers = {r['layer'] for r in rows
                    if r['layer'].startswith('decoder.layers.1.')}
    assert float_layers
    for r in rows:
        assert r['precision'] == ('float' if r['layer'] in float_layers
                                  else 'int8'), r['site']
        assert 'trace' not in r
    assert result.summary['activations']['int8_macs'] is None


def test_clipping_ranges_are_warned_of_and_measured(
        build_tiny_model, calibration, monkeypatch, caplog):
    """Ranges shrunk on purpose: every site's SQNR and clipped share come
    from the live tensors, the run's log warns of them in one line; with
    ``sensitivity`` each layer's measured damage is the loss increase with
    its sites alone quantized, which the choice reads."""
    import logging

    import mmdet_hawq.api.activation_sites as api_activations
    from mmdet_hawq.quant.activations import ActivationRange
    original = api_activations.calibrate_range

    def shrunk(observer, method, bits=8):
        r = original(observer, method, bits)
        return ActivationRange(r.lo * 0.05, r.hi * 0.05, bits)

    monkeypatch.setattr(api_activations, 'calibrate_range', shrunk)
    logger = logging.getLogger('test_clipping')
    with caplog.at_level(logging.INFO, logger='test_clipping'):
        result = quantize(build_tiny_model(), calibration, QuantSettings(
            metric='uniform', bits=8, activations=dict(
                method='minmax', sensitivity=True)), logger=logger)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'SQNR below 20 dB' in warned[0] and \
        '\n' not in warned[0]
    rows = result.activation_sites
    assert all(r['clipped_share'] > 0.05 for r in rows
               if r['sqnr_db'] is not None)
    for r in rows:
        assert r['layer_damage'] == max(r['layer_measured_damage'], 0.0)
    assert any(r['layer_measured_damage'] > 0 for r in rows)


def test_calibration_from_a_dataset_or_loader_needs_no_config(
        tiny_cfg, tiny_data, build_tiny_model):
    """``Calibration.from_dataset`` (a plain mmdet dataset) and
    ``Calibration.from_loader`` (any loader) give the set the hook builds
    from the config: the same images, the same preprocessed batches."""
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader

    from mmdet_hawq.datasets import ShapesDataset
    from mmdet_hawq.engine.calibration import calibration_set
    model = build_tiny_model()
    dataset = ShapesDataset(
        data_root=f'{tiny_data}/', ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'), pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(128, 128), keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='PackDetInputs', meta_keys=(
                'img_id', 'img_path', 'ori_shape', 'img_shape',
                'scale_factor'))])
    settings = CalibrationSettings(**CAL)
    ours = Calibration.from_dataset(model, dataset, settings)
    hooks = calibration_set(tiny_cfg, model, settings)
    assert ours.img_ids == hooks.img_ids and ours.classes == hooks.classes
    assert len(ours.batches) == len(hooks.batches) == 2
    for a, b in zip(ours.batches, hooks.batches):
        assert torch.equal(a['inputs'], b['inputs'])
    # any loader: ids from the data samples, classes from its dataset
    loader = DataLoader(dataset, batch_size=3, collate_fn=pseudo_collate)
    every = Calibration.from_loader(model, loader)
    assert len(every.img_ids) == len(dataset) and \
        set(hooks.img_ids) <= set(every.img_ids)
    assert every.classes == list(dataset.metainfo['classes'])
    result = quantize(model, every, QuantSettings(
        metric='uniform', bits=4, rounding='gptq'))
    assert result.summary['rounding'] == 'gptq'


def test_calibration_from_a_loader_needs_image_ids(build_tiny_model):
    """Without ids the trace cache could not tell two sets apart: one
    line, unless the caller gives them."""
    from mmdet.structures import DetDataSample
    model = build_tiny_model()
    batch = dict(inputs=[torch.zeros(3, 32, 32, dtype=torch.uint8)],
                 data_samples=[DetDataSample(metainfo=dict(
                     img_shape=(32, 32), ori_shape=(32, 32)))])
    with pytest.raises(HawqUserError, match="no img_id.*pass img_ids"):
        Calibration.from_loader(model, [batch], classes=['a'])
    assert Calibration.from_loader(model, [batch], img_ids=[7],
                                   classes=['a']).img_ids == [7]
