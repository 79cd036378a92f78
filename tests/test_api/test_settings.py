"""QuantSettings: checked once when built, defaults resolved, one line per
bad value."""
import pytest

from mmdet_hawq.api import (CALIBRATION_KEYS, GPTQ_DEFAULTS,
                            SENSITIVITY_DEFAULTS, QuantSettings)
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import DISTILLATION_DEFAULTS


def test_defaults_are_resolved_when_built():
    s = QuantSettings(target_bits=5)
    assert s.metric == 'outquant' and s.axis is None
    assert set(s.sensitivity) == set(SENSITIVITY_DEFAULTS)
    assert s.sensitivity['estimator'] == 'gauss_newton'
    assert QuantSettings(metric='losssen', target_bits=5).sensitivity[
        'estimator'] == 'hutchinson'
    assert s.gptq == GPTQ_DEFAULTS
    assert s.uses_traces and s.reads_calibration
    u = QuantSettings(metric='uniform', bits=4, per_channel=True)
    assert u.axis == 0 and not u.uses_traces and not u.reads_calibration
    assert QuantSettings(metric='uniform', bits=4,
                         rounding='gptq').reads_calibration


def test_calibration_and_distillation_settings():
    s = QuantSettings(target_bits=5, sensitivity=dict(num_images=7,
                                                      temperature=2.0))
    assert list(s.calibration) == list(CALIBRATION_KEYS)
    assert s.calibration['num_images'] == 7
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
