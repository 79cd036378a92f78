"""QuantSettings: checked once when built, defaults resolved, one line per
bad value."""
import pytest

from mmdet_hawq.api import (ActivationSettings, CalibrationSettings,
                            GptqSettings, QuantSettings, SensitivitySettings)
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import DISTILLATION_DEFAULTS


def test_defaults_are_resolved_when_built():
    s = QuantSettings(target_bits=5)
    assert s.metric == 'outquant' and s.axis is None
    assert s.sensitivity == SensitivitySettings(estimator='gauss_newton')
    assert QuantSettings(metric='losssen', target_bits=5).sensitivity \
        .estimator == 'hutchinson'
    assert s.gptq == GptqSettings() and s.calibration == CalibrationSettings()
    assert s.activations is None
    assert s.uses_traces and s.reads_calibration
    u = QuantSettings(metric='uniform', bits=4, per_channel=True)
    assert u.axis == 0 and not u.uses_traces and not u.reads_calibration
    assert QuantSettings(metric='uniform', bits=4,
                         rounding='gptq').reads_calibration


def test_calibration_and_distillation_settings():
    s = QuantSettings(target_bits=5,
                      calibration=dict(num_images=7),
                      sensitivity=dict(temperature=2.0))
    assert s.calibration == CalibrationSettings(num_images=7)
    lam, _ = DISTILLATION_DEFAULTS['sigmoid']
    assert s.distillation('sigmoid') == (lam, 2.0)


def test_unknown_argument_names_the_closest_one():
    with pytest.raises(HawqUserError) as err:
        QuantSettings.from_kwargs(dict(target_bit=5), 'DistillSensitivityHook')
    msg = str(err.value)
    assert '\n' not in msg
    assert msg.startswith("DistillSensitivityHook: unknown argument "
                          "'target_bit': did you mean 'target_bits'?")
    assert QuantSettings.from_kwargs(dict(metric='uniform', bits=3)).bits \
        == 3


@pytest.mark.parametrize('kwargs,match', [
    (dict(metric='best'), "metric 'best' is unknown"),
    (dict(metric='uniform'), "needs bits=N"),
    (dict(metric='plan'), 'needs plan_file'),
    (dict(), 'needs target_bits'),
    (dict(target_bits=2), 'below the lowest bit-width'),
    (dict(target_bits=4, bit_range=(5, 3)), 'is empty'),
    (dict(target_bits=4, bit_range=3), 'is not a pair'),
    (dict(target_bits=4, sensitivity=dict(tol=-1)), 'tol=-1 is not valid'),
    (dict(target_bits=4, sensitivity=dict(estimator='exact')),
     "estimator 'exact' is unknown"),
    (dict(metric='losssen', target_bits=4,
          sensitivity=dict(estimator='gauss_newton')),
     'no Gauss-Newton form'),
    (dict(target_bits=4, rounding='gptq', gptq=dict(block_size=0)),
     'block_size 0 is not a positive int'),
])
def test_bad_settings_are_one_line(kwargs, match):
    with pytest.raises(HawqUserError, match=match) as err:
        QuantSettings(**kwargs)
    assert '\n' not in str(err.value)


def test_typed_settings_and_config_dicts_are_the_same():
    """A config's dicts and the typed settings build equal settings; the
    typed ones are checked when built, alone too."""
    from_dicts = QuantSettings.from_kwargs(dict(
        target_bits=4, rounding='gptq', gptq=dict(act_order=True),
        calibration=dict(num_images=8, seed=3),
        sensitivity=dict(max_samples=20),
        activations=dict(method='minmax', float_sites=('*offsets*', ))))
    typed = QuantSettings(
        target_bits=4, rounding='gptq', gptq=GptqSettings(act_order=True),
        calibration=CalibrationSettings(num_images=8, seed=3),
        sensitivity=SensitivitySettings(max_samples=20),
        activations=ActivationSettings(method='minmax',
                                       float_sites=['*offsets*']))
    assert from_dicts == typed
    assert typed.activations.float_sites == ['*offsets*']
    assert typed.trace_settings()['num_images'] == 8
    with pytest.raises(HawqUserError, match='batch_size=0 is not valid'):
        CalibrationSettings(batch_size=0)
    with pytest.raises(HawqUserError, match='stage_size 0 is not a positive'):
        GptqSettings(stage_size=0)
    with pytest.raises(HawqUserError, match='tol=-1 is not valid'):
        SensitivitySettings(tol=-1)
    with pytest.raises(HawqUserError, match='do not fit'):  # as a dict
        QuantSettings(target_bits=4, sensitivity=SensitivitySettings(
            min_samples=20, max_samples=10))
    # a max_samples alone below the default min_samples caps it
    assert QuantSettings(target_bits=4, sensitivity=SensitivitySettings(
        max_samples=3)).sensitivity.max_samples == 3


def test_the_calibration_settings_stand_on_their_own():
    """A W8A8 or GPTQ run chooses its images with ``calibration``, not
    under ``sensitivity``; a calibration key there says where it goes."""
    s = QuantSettings(metric='uniform', bits=8,
                      calibration=dict(num_images=16),
                      activations=dict(method='mse'))
    assert s.reads_calibration and s.calibration.num_images == 16
    with pytest.raises(HawqUserError) as err:
        QuantSettings(target_bits=4, sensitivity=dict(num_images=16))
    assert str(err.value) == (
        'num_images is a calibration setting, not a sensitivity one: pass '
        'calibration=dict(num_images=...)')


def test_cache_dir_is_settled_in_one_place():
    s = QuantSettings(target_bits=4)
    assert s.trace_cache('/run/cache') == '/run/cache'
    assert QuantSettings(target_bits=4, sensitivity=dict(
        cache_dir='/shared')).trace_cache('/run/cache') == '/shared'
    assert QuantSettings(target_bits=4, sensitivity=dict(
        use_cache=False, cache_dir='/shared')).trace_cache('/x') is None


@pytest.mark.parametrize('kwargs,match', [
    (dict(calibration=dict(num_image=4)),
     r"unknown calibration setting\(s\) \['num_image'\]"),
    (dict(calibration=4), 'calibration 4 is not a dict'),
    (dict(gptq=dict(damp=0.1)), "gptq settings are given but rounding is "
     "'nearest'"),
    (dict(rounding='gptq', gptq=dict(damp=2)), 'damp 2 is not a number'),
    (dict(activations=dict(int8_macs=0.5)), 'pass sensitivity=True too'),
    (dict(activations=dict(method='max')), "method 'max' is unknown"),
    (dict(activations=['mse']), 'activations .* is not a dict'),
    (dict(sensitivity=dict(min_samples=5, max_samples=2)), 'do not fit'),
])
def test_bad_typed_settings_are_one_line(kwargs, match):
    with pytest.raises(HawqUserError, match=match) as err:
        QuantSettings(target_bits=4, **kwargs)
    assert '\n' not in str(err.value)


def test_max_samples_alone_caps_the_default_min_samples():
    """``max_samples`` below the default ``min_samples`` is taken as the
    cap (no error), and the sampling loop stops there."""
    import torch

    from mmdet_hawq.sensitivity import hutchinson_traces
    s = QuantSettings(target_bits=4, sensitivity=dict(max_samples=3,
                                                      tol=0.0)).sensitivity
    assert (s.min_samples, s.max_samples) == (10, 3)
    w = torch.nn.Parameter(torch.ones(3))
    result = hutchinson_traces(
        {'w': w}, lambda i: (w ** 2).sum(), [0], tol=s.tol,
        min_samples=s.min_samples, max_samples=s.max_samples)
    assert result.num_samples == 3
