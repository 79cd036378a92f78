import numpy as np
import pytest
import torch

from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.quant.quantizer import (choose_scale, fake_quantize,
                                        quantization_error, quantize_weight)


def eq6_numpy(w: np.ndarray, n: int) -> np.ndarray:
    """The paper's Eq. 6 written out independently, in float64."""
    m = np.abs(w).max()
    levels = 2**(n - 1) - 1
    return np.round(w * levels / m) * m / levels


@pytest.mark.parametrize('bits', range(2, 9))
def test_matches_eq6_written_out(bits):
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(bits))
    got = fake_quantize(w.double(), bits).numpy()
    np.testing.assert_allclose(got, eq6_numpy(w.double().numpy(), bits),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize('bits', range(2, 9))
def test_levels_idempotence_error_symmetry(bits):
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.3
    qw = quantize_weight(w, bits)
    q = qw.dequantize()
    assert q.unique().numel() <= 2**bits - 1
    assert qw.codes.abs().max().item() == 2**(bits - 1) - 1
    torch.testing.assert_close(fake_quantize(q, bits), q, rtol=0, atol=1e-7)
    assert (q - w).abs().max().item() <= qw.scale.item() / 2 + 1e-7
    torch.testing.assert_close(fake_quantize(-w, bits), -q, rtol=0, atol=0)


def test_all_zero_tensor_survives():
    w = torch.zeros(3, 4)
    q = fake_quantize(w, 4)
    assert torch.equal(q, w)
    assert not torch.isnan(q).any()
    assert choose_scale(w, 4).item() == 1.0


def test_per_channel_equals_per_tensor_on_each_channel():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    w[2] = 0
    q = fake_quantize(w, 5, axis=0)
    for c in range(6):
        assert torch.equal(q[c], fake_quantize(w[c], 5))


def test_error_term_against_reference():
    w = torch.randn(100)
    q8 = fake_quantize(w, 8)
    expected = float(((fake_quantize(w, 4).double() - q8.double())**2).sum())
    assert quantization_error(w, 4, reference=q8) == pytest.approx(expected)
    assert quantization_error(w, 8, reference=q8) == 0.0
    assert quantization_error(w, 3) > quantization_error(w, 6) > 0


@pytest.mark.parametrize('bits', [1, 9, 0, 4.0, True])
def test_bad_bit_width_is_one_clear_error(bits):
    with pytest.raises(HawqUserError, match='from 2 to 8'):
        fake_quantize(torch.randn(3), bits)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
@pytest.mark.parametrize('axis', [None, 0])
def test_non_finite_tensor_is_refused(bad, axis):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(ValueError, match='1 non-finite'):
        quantize_weight(w, 4, axis)
    with pytest.raises(ValueError, match='non-finite'):
        choose_scale(w, 4, axis)
    with pytest.raises(ValueError, match='non-finite'):
        fake_quantize(w.half(), 4, axis)


def test_bits_error_suggests_null_only_where_allowed():
    from mmdet_hawq.quant.quantizer import check_bits
    with pytest.raises(HawqUserError) as err:
        check_bits(9, 'bits')
    assert 'null' not in str(err.value)
    with pytest.raises(HawqUserError, match='or null'):
        check_bits(9, 'bit-width of x', null_ok=True)


def test_error_terms_written_out():
    from mmdet_hawq.quant import error_terms
    torch.manual_seed(1)
    w = torch.randn(6, 5)
    for ref_bits, axis in ((None, None), (8, None), (8, 0)):
        got = error_terms({'w': w}, [3, 4], axis, reference_bits=ref_bits)
        for b in (3, 4):
            ref = w if ref_bits is None else fake_quantize(w, ref_bits, axis)
            want = float(((fake_quantize(w, b, axis).double()
                           - ref.double()) ** 2).sum())
            assert got['w'][b] == pytest.approx(want, rel=1e-12)
