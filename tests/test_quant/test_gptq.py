"""GPTQ rounding on the paper's grid: codes, the algorithm against a plain
reference, the input statistics of each layer kind, and whole detectors."""
import copy

import pytest
import torch
import torch.nn as nn

from mmdet_hawq.api import CalibrationSettings
from mmdet_hawq.quant import (make_plan, quantizable_weights,
                              quantize_weights_)
from mmdet_hawq.quant.gptq import (gptq_apply, gptq_error_ratios,
                                   gptq_quantize)
from mmdet_hawq.quant.gptq_inputs import (HessianCollector, call_sequence,
                                          collect_hessians, conv2d_patches,
                                          forward_order, gptq_targets,
                                          hessian_bytes, mha_head_outputs)
from mmdet_hawq.quant.gptq import output_error as layer_output_error
from mmdet_hawq.quant.quantizer import choose_scale, quantize_weight

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n: int, d: int, seed: int,
                      spread: float = 0.0) -> torch.Tensor:
    """(n, d) inputs with correlated columns; ``spread`` > 0 makes the
    columns' scales log-normal with that standard deviation."""
    g = gen(seed)
    z = torch.randn(n, d, generator=g, dtype=F64)
    z = z * torch.exp(torch.randn(d, generator=g, dtype=F64) * spread)
    mix = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=g,
                                                      dtype=F64)
    return z @ mix if spread else z @ torch.randn(d, d, generator=g,
                                                  dtype=F64)


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    """``||X Wᵀ − X Qᵀ||²``."""
    return float(((x @ (w - q).T)**2).sum())


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor,
                   bits: int, damp: float = 0.01) -> torch.Tensor:
    """Column-by-column GPTQ written out plainly: full inverse, no
    Cholesky, no blocks; after rounding column i its error moves the later
    columns along row i of ``H⁻¹`` and i is eliminated from ``H⁻¹``."""
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=F64)
    hinv = torch.linalg.inv(h)
    s = scale.double().reshape(-1) if scale.dim() else scale.double()
    limit = 2**(bits - 1) - 1
    codes = torch.zeros_like(w)
    for i in range(w.shape[1]):
        code = torch.round(w[:, i] / s).clamp(-limit, limit)
        codes[:, i] = code
        err = (w[:, i] - code * s) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize('axis', [None, 0])
@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_codes_on_the_float_weights_grid(bits, axis):
    w = torch.randn(24, 40, generator=gen(bits))
    x = correlated_inputs(256, 40, seed=1).float()
    qw = gptq_quantize(w, x.T @ x, bits, axis=axis)
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == w.shape
    assert qw.codes.abs().max().item() <= 2**(bits - 1) - 1
    assert torch.equal(qw.scale, choose_scale(w, bits, axis))
    assert qw.bits == bits and qw.axis == axis
    q = qw.dequantize()
    torch.testing.assert_close(q, qw.codes.float() * qw.scale, rtol=0,
                               atol=0)
    assert not torch.equal(qw.codes, quantize_weight(w, bits, axis).codes)


@pytest.mark.parametrize('axis', [None, 0])
@pytest.mark.parametrize('act_order', [False, True])
def test_diagonal_hessian_gives_nearest_rounding(axis, act_order):
    w = torch.randn(16, 48, generator=gen(0), dtype=F64)
    h = torch.diag(torch.rand(48, generator=gen(1), dtype=F64) * 5 + 0.1)
    for bits in (2, 3, 4):
        got = gptq_quantize(w, h, bits, axis, act_order=act_order,
                            block_size=16)
        assert torch.equal(got.codes, quantize_weight(w, bits, axis).codes)


@pytest.mark.parametrize('bits', range(2, 9))
def test_lower_output_error_than_nearest(bits):
    d = 64
    for seed in range(3):
        x = correlated_inputs(512, d, seed)
        w = torch.randn(32, d, generator=gen(10 + seed), dtype=F64)
        nearest = output_error(x, w, quantize_weight(w, bits).dequantize(F64))
        got = output_error(x, w, gptq_quantize(w, x.T @ x, bits)
                           .dequantize(F64))
        assert got < 0.8 * nearest, (seed, got / nearest)


@pytest.mark.parametrize('axis', [None, 0])
@pytest.mark.parametrize('block_size', [1, 7, 32, 128])
@pytest.mark.parametrize('bits', [2, 3, 4])
def test_blocked_cholesky_equals_plain_reference(bits, block_size, axis):
    d = 50
    x = correlated_inputs(300, d, seed=bits)
    x[:, 3] = 0.0  # a dead input
    w = torch.randn(20, d, generator=gen(7), dtype=F64)
    h = x.T @ x
    qw = gptq_quantize(w, h, bits, axis, block_size=block_size)
    ref = reference_gptq(w, h, qw.scale, bits)
    assert torch.equal(qw.codes.double(), ref)
    assert (qw.codes[:, 3] == 0).all()
    torch.testing.assert_close(qw.dequantize(F64), ref * qw.scale, rtol=0,
                               atol=1e-6)


def test_act_order_valid_codes_and_lower_error_on_unequal_inputs():
    d, bits = 64, 3
    ratios = []
    for seed in range(4):
        x = correlated_inputs(512, d, seed, spread=1.5)
        w = torch.randn(32, d, generator=gen(20 + seed), dtype=F64)
        h = x.T @ x
        plain = gptq_quantize(w, h, bits)
        ordered = gptq_quantize(w, h, bits, act_order=True)
        assert ordered.codes.abs().max() <= 2**(bits - 1) - 1
        assert torch.equal(ordered.scale, plain.scale)
        ratios.append(output_error(x, w, ordered.dequantize(F64)) /
                      output_error(x, w, plain.dequantize(F64)))
    assert max(ratios) < 0.9, ratios


def test_act_order_equals_reference_on_permuted_columns():
    d, bits = 40, 3
    x = correlated_inputs(200, d, seed=5, spread=1.0)
    w = torch.randn(12, d, generator=gen(5), dtype=F64)
    h = x.T @ x
    qw = gptq_quantize(w, h, bits, act_order=True, block_size=8)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    ref = reference_gptq(w[:, perm], h[perm][:, perm], qw.scale, bits)
    assert torch.equal(qw.codes[:, perm].double(), ref)


def test_bad_arguments_refused():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match='axis'):
        gptq_quantize(w, torch.eye(4), 3, axis=1)
    with pytest.raises(ValueError, match='do not fit'):
        gptq_quantize(w, torch.eye(5), 3)
    with pytest.raises(ValueError, match='do not fit'):
        gptq_quantize(w, [torch.eye(4)] * 4, 3)


def test_linear_collector_flattens_leading_dims():
    lin = nn.Linear(8, 5)
    xs = [torch.randn(2, 3, 8, generator=gen(i)) for i in range(3)]
    c = collect_hessians(lin, ['weight'], xs, lambda m, b: m(b))
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    torch.testing.assert_close(c.hessians('weight')[0], flat.T @ flat)
    assert c.count('weight') == 18


def smooth_images(*shape: int, seed: int) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are correlated."""
    x = torch.randn(*shape, generator=gen(seed), dtype=F64)
    x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1,
                                 count_include_pad=False)
    return x + x.mean(dim=1, keepdim=True)


@pytest.mark.parametrize('kwargs', [
    dict(stride=2, padding=1),
    dict(stride=1, padding=2, dilation=2),
    dict(stride=(2, 1), padding='valid'),
    dict(stride=1, padding=1, padding_mode='reflect'),
    dict(stride=1, padding=1, groups=2),
])
@torch.no_grad()
def test_conv2d_patches_hessian_and_error(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kwargs).double()
    batches = [smooth_images(2, 4, 9, 10, seed=i) for i in range(3)]
    groups = conv.groups
    w2 = conv.weight.reshape(6, -1)
    for x in batches:  # patches @ Wᵀ per group is the conv
        patches = conv2d_patches(conv, x)
        y = conv(x) - conv.bias[None, :, None, None]
        rows = 6 // groups
        for g in range(groups):
            got = patches[g] @ w2[g * rows:(g + 1) * rows].T
            want = y[:, g * rows:(g + 1) * rows].permute(0, 2, 3, 1)
            torch.testing.assert_close(got, want.reshape(-1, rows))
    c = collect_hessians(conv, ['weight'], batches, lambda m, b: m(b))
    every = conv2d_patches(conv, torch.cat(batches))
    for g in range(groups):
        torch.testing.assert_close(c.hessians('weight')[g],
                                   every[g].T @ every[g])
    calib = torch.cat(batches)
    qconv = copy.deepcopy(conv)
    nconv = copy.deepcopy(conv)
    for bits in range(2, 9):
        qw = gptq_quantize(conv.weight, c.hessians('weight'), bits)
        assert qw.codes.shape == conv.weight.shape
        assert torch.equal(qw.scale, choose_scale(conv.weight, bits))
        qconv.weight.data = qw.dequantize(F64)
        nconv.weight.data = quantize_weight(conv.weight, bits).dequantize(F64)
        ref = conv(calib)
        got = float(((qconv(calib) - ref)**2).sum())
        nearest = float(((nconv(calib) - ref)**2).sum())
        assert got < 0.9 * nearest, (bits, got / nearest)


@pytest.mark.parametrize('batch_first', [False, True])
def test_mha_in_proj_blocks_get_their_inputs(batch_first):
    torch.manual_seed(0)
    e = 16
    mha = nn.MultiheadAttention(e, 2, batch_first=batch_first).double()
    lq, lk, b = 5, 7, 3
    shape = (lambda length: (b, length, e)) if batch_first else (
        lambda length: (length, b, e))
    calls = [tuple(torch.randn(*shape(n), generator=gen(10 * i + j),
                               dtype=F64)
                   for j, n in enumerate((lq, lk, lk))) for i in range(2)]
    names = ['in_proj_weight', 'out_proj.weight']
    c = collect_hessians(mha, names, calls,
                         lambda m, qkv: m(query=qkv[0], key=qkv[1],
                                          value=qkv[2]))
    for block, h in enumerate(c.hessians('in_proj_weight')):
        x = torch.cat([qkv[block].reshape(-1, e) for qkv in calls])
        torch.testing.assert_close(h, x.T @ x)
    heads = [mha_head_outputs(mha, *qkv) for qkv in calls]
    for qkv, head in zip(calls, heads):  # out_proj(heads) is the output
        out = mha(*qkv, need_weights=False)[0]
        out = out.transpose(0, 1) if batch_first else out
        torch.testing.assert_close(mha.out_proj(head), out.reshape(-1, e))
    x = torch.cat(heads)
    torch.testing.assert_close(c.hessians('out_proj.weight')[0], x.T @ x)
    w = mha.in_proj_weight
    qw = gptq_quantize(w, c.hessians('in_proj_weight'), 3)
    assert qw.scale.dim() == 0
    assert torch.equal(qw.scale, choose_scale(w, 3))
    q = qw.dequantize(F64)
    n = quantize_weight(w, 3).dequantize(F64)
    for block in range(3):
        rows = slice(block * e, (block + 1) * e)
        x = torch.cat([qkv[block].reshape(-1, e) for qkv in calls])
        assert output_error(x, w[rows], q[rows]) < output_error(
            x, w[rows], n[rows])


def test_mha_padding_keys_left_out():
    e = 8
    mha = nn.MultiheadAttention(e, 2).double()
    q = torch.randn(3, 2, e, generator=gen(0), dtype=F64)
    k = torch.randn(4, 2, e, generator=gen(1), dtype=F64)
    mask = torch.tensor([[False, False, True, True],
                         [False, False, False, False]])
    c = collect_hessians(mha, ['in_proj_weight'], [None],
                         lambda m, _: m(q, k, k, key_padding_mask=mask))
    kept = k.transpose(0, 1)[~mask]
    torch.testing.assert_close(c.hessians('in_proj_weight')[1],
                               kept.T @ kept)


def test_mmcv_wrapper_adds_positions_before_the_projection():
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    torch.manual_seed(0)
    e = 16
    attn = MultiheadAttention(e, 2, batch_first=True).double()
    q, qpos = (torch.randn(2, 5, e, generator=gen(i), dtype=F64)
               for i in (0, 1))
    k, kpos = (torch.randn(2, 6, e, generator=gen(i), dtype=F64)
               for i in (2, 3))
    c = collect_hessians(
        attn, ['attn.in_proj_weight'], [None],
        lambda m, _: m(q, key=k, value=k, query_pos=qpos, key_pos=kpos))
    hq, hk, hv = c.hessians('attn.in_proj_weight')
    xq, xk, xv = ((q + qpos).reshape(-1, e), (k + kpos).reshape(-1, e),
                  k.reshape(-1, e))
    torch.testing.assert_close(hq, xq.T @ xq)
    torch.testing.assert_close(hk, xk.T @ xk)
    torch.testing.assert_close(hv, xv.T @ xv)


def test_deformable_attention_linears_are_linear_targets():
    from mmcv.ops import MultiScaleDeformableAttention
    msda = MultiScaleDeformableAttention(embed_dims=32, num_heads=2,
                                         num_levels=2, num_points=2)
    kinds = {n: t.kind for n, t in gptq_targets(msda).items()}
    assert kinds == {f'{n}.weight': 'linear' for n in (
        'sampling_offsets', 'attention_weights', 'value_proj',
        'output_proj')}


def test_embeddings_and_unused_weights_keep_nearest_rounding():
    model = nn.ModuleDict(dict(emb=nn.Embedding(5, 8), lin=nn.Linear(8, 4),
                               unused=nn.Linear(8, 3)))
    batches = [torch.arange(5), torch.tensor([0, 2, 4, 1])]

    def forward(m, idx):
        return m['lin'](m['emb'](idx))

    plan = {'emb.weight': 3, 'lin.weight': 3, 'unused.weight': 3}
    ref = copy.deepcopy(model)
    got = gptq_apply(model, plan, batches, forward).applied
    assert list(got) == list(plan)
    for name in ('emb.weight', 'unused.weight'):
        w = dict(ref.named_parameters())[name]
        assert torch.equal(got[name].codes, quantize_weight(w, 3).codes)
    assert torch.equal(model['emb'].weight,
                       got['emb.weight'].dequantize())


def test_sequential_uses_quantized_upstream_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
    batches = [correlated_inputs(64, 16, seed=i).float() for i in range(2)]
    plan = {'0.weight': 2, '2.weight': 2, '0.bias': None}
    seq = copy.deepcopy(model)
    got = gptq_apply(seq, plan, batches, lambda m, x: m(x)).applied
    assert set(got) == {'0.weight', '2.weight'}
    stage0 = copy.deepcopy(model)
    stage0[0].weight.data = got['0.weight'].dequantize()
    c = collect_hessians(stage0, ['2.weight'], batches, lambda m, x: m(x))
    want = gptq_quantize(model[2].weight, c.hessians('2.weight'), 2)
    assert torch.equal(got['2.weight'].codes, want.codes)
    par = copy.deepcopy(model)
    got_par = gptq_apply(par, plan, batches, lambda m, x: m(x),
                         sequential=False).applied
    c = collect_hessians(model, ['2.weight'], batches, lambda m, x: m(x))
    want = gptq_quantize(model[2].weight, c.hessians('2.weight'), 2)
    assert torch.equal(got_par['2.weight'].codes, want.codes)
    assert not torch.equal(got_par['2.weight'].codes, got['2.weight'].codes)


def test_forward_order_follows_calls_not_registration():
    model = nn.ModuleDict(dict(late=nn.Linear(8, 8), unused=nn.Linear(8, 8),
                               attn=nn.MultiheadAttention(8, 2),
                               early=nn.Linear(8, 8)))

    def forward(m, x):
        x = m['early'](x)
        return m['late'](m['attn'](x, x, x)[0])

    names = ['unused.weight', 'attn.out_proj.weight', 'late.weight',
             'attn.in_proj_weight', 'early.weight']
    got = forward_order(model, names, torch.randn(3, 2, 8), forward)
    assert got == ['early.weight', 'attn.in_proj_weight',
                   'attn.out_proj.weight', 'late.weight', 'unused.weight']


def test_hessian_bytes_counts_blocks_and_stages():
    model = nn.ModuleDict(dict(a=nn.Linear(10, 4),
                               m=nn.MultiheadAttention(6, 2),
                               c=nn.Conv2d(4, 8, 3, groups=2)))
    names = ['a.weight', 'm.in_proj_weight', 'm.out_proj.weight',
             'c.weight']
    sizes = [100 * 8, 3 * 36 * 8, 36 * 8, 2 * 18 * 18 * 8]
    assert hessian_bytes(model, names) == max(sizes)
    assert hessian_bytes(model, names, sequential=False) == sum(sizes)
    assert hessian_bytes(model, names, stage_size=2) == max(
        sizes[0] + sizes[1], sizes[2] + sizes[3])


def calibration(model, cfg):
    from mmdet_hawq.engine.calibration import build_calibration
    from mmdet_hawq.sensitivity import preprocess_batches
    loader, _ = build_calibration(cfg, CalibrationSettings(
        num_images=4, batch_size=2))
    return preprocess_batches(model, loader)


def last_layer_error(model, float_model, batches) -> float:
    from mmdet_hawq.models import decoder_outputs
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            s, b = decoder_outputs(model, batch)
            fs, fb = decoder_outputs(float_model, batch)
            total += float(((s[-1] - fs[-1])**2).sum() +
                           ((b[-1] - fb[-1])**2).sum())
    return total


def test_tiny_detr_three_bits_beats_nearest(build_tiny_model, tiny_cfg):
    from mmdet_hawq.models import decoder_outputs
    float_model = build_tiny_model()
    batches = calibration(float_model, tiny_cfg)
    weights = quantizable_weights(float_model)
    plan = {n: 3 for n in weights}
    nearest = build_tiny_model()
    quantize_weights_(quantizable_weights(nearest), make_plan(plan))
    gptq = build_tiny_model()
    got = gptq_apply(gptq, plan, batches, decoder_outputs).applied
    assert list(got) == list(plan)
    params = dict(gptq.named_parameters())
    for name, qw in got.items():
        assert torch.equal(params[name], qw.dequantize())
        assert torch.equal(qw.scale, choose_scale(weights[name], 3))
    e_gptq = last_layer_error(gptq, float_model, batches)
    e_near = last_layer_error(nearest, float_model, batches)
    print(f'tiny DETR 3-bit last-layer error: GPTQ {e_gptq:.4g}, '
          f'nearest {e_near:.4g}')
    assert e_gptq < 0.8 * e_near


def test_tiny_dino_deformable_linears_get_gptq_codes(family_cfg):
    from mmcv.ops import MultiScaleDeformableAttention

    from mmdet_hawq.models import decoder_outputs
    from ..conftest import build_from
    cfg = family_cfg('dino')
    float_model = build_from(cfg)
    modules = [m for m in float_model.modules()
               if isinstance(m, MultiScaleDeformableAttention)]
    g = gen(0)
    with torch.no_grad():  # mmcv initialises these two to zeros
        for m in modules:
            for lin in (m.sampling_offsets, m.attention_weights):
                lin.weight.normal_(0, 0.02, generator=g)
    batches = calibration(float_model, cfg)[:1]
    weights = quantizable_weights(float_model)
    plan = {n: 3 for n in weights}
    model = copy.deepcopy(float_model)
    got = gptq_apply(model, plan, batches, decoder_outputs).applied
    msda = [n for n in plan if n.rsplit('.', 2)[-2] in (
        'sampling_offsets', 'attention_weights', 'value_proj',
        'output_proj')]
    assert len(msda) == 4 * len(modules) > 0
    for name in msda:
        near = quantize_weight(weights[name], 3).codes
        assert not torch.equal(got[name].codes, near), name
    # before the decoder, any change can flip the two-stage top-k choice of
    # queries, which swamps the last layer's error; after it, none can
    plan = {n: 3 for n in weights if n.startswith('decoder.')}
    gptq = copy.deepcopy(float_model)
    gptq_apply(gptq, plan, batches, decoder_outputs)
    nearest = copy.deepcopy(float_model)
    quantize_weights_({n: quantizable_weights(nearest)[n] for n in plan},
                      make_plan(plan))
    e_gptq = last_layer_error(gptq, float_model, batches)
    e_near = last_layer_error(nearest, float_model, batches)
    print(f'tiny DINO decoder at 3 bits, last-layer error: GPTQ '
          f'{e_gptq:.4g}, nearest {e_near:.4g}')
    assert e_gptq < 0.5 * e_near


def test_collector_rejects_non_targets():
    with pytest.raises(KeyError):
        HessianCollector(nn.Embedding(3, 4), ['weight'])


def test_bad_input_statistics_fall_back_or_are_noted():
    """Empty, non-finite and too-few-rows inputs: nearest rounding or a
    dampened H, a note each, and never a non-finite weight."""
    model = nn.ModuleDict(dict(a=nn.Linear(8, 4), nan=nn.Linear(8, 4),
                               few=nn.Linear(8, 4), unused=nn.Linear(8, 4)))
    ref = copy.deepcopy(model)

    def forward(m, x):
        m['a'](x)
        m['nan'](torch.full_like(x, float('nan')))
        return m['few'](x[:3])  # 3 rows for an 8 x 8 H

    plan = {f'{k}.weight': 3 for k in ('a', 'nan', 'few', 'unused')}
    got = gptq_apply(model, plan, [torch.randn(20, 8, generator=gen(0))],
                     forward)
    assert got.rounding == {'a.weight': 'gptq', 'nan.weight': 'nearest',
                            'few.weight': 'gptq', 'unused.weight': 'nearest'}
    assert 'not finite' in got.notes['nan.weight']
    assert 'no input' in got.notes['unused.weight']
    assert '3 calibration input rows for a 8 x 8 H' in got.notes['few.weight']
    assert 'a.weight' not in got.notes
    for name in ('nan.weight', 'unused.weight'):
        w = dict(ref.named_parameters())[name]
        assert torch.equal(got.applied[name].codes,
                           quantize_weight(w, 3).codes)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_not_positive_definite_falls_back_to_nearest(monkeypatch):
    import mmdet_hawq.quant.gptq as gptq_module

    def failing(*args, **kwargs):
        raise ValueError('the input Hessian is not positive definite')

    monkeypatch.setattr(gptq_module, '_inverse_cholesky_upper', failing)
    model = nn.Linear(6, 3)
    w = model.weight.detach().clone()
    got = gptq_apply(model, {'weight': 4},
                     [torch.randn(10, 6, generator=gen(1))],
                     lambda m, x: m(x))
    assert got.rounding == {'weight': 'nearest'}
    assert 'not positive definite' in got.notes['weight']
    assert torch.equal(got.applied['weight'].codes,
                       quantize_weight(w, 4).codes)


def test_output_error_is_the_layer_output_error_written_out():
    x = correlated_inputs(40, 6, seed=3)
    w = torch.randn(4, 6, generator=gen(3), dtype=F64)
    q = quantize_weight(w, 3).dequantize(F64)
    assert layer_output_error(w, q, x.T @ x) == pytest.approx(
        output_error(x, w, q), rel=1e-10)
    # two row blocks with their own inputs
    x2 = correlated_inputs(40, 6, seed=4)
    want = output_error(x, w[:2], q[:2]) + output_error(x2, w[2:], q[2:])
    assert layer_output_error(w, q, [x.T @ x, x2.T @ x2]) == pytest.approx(
        want, rel=1e-10)


def test_error_ratios_are_gptq_over_nearest_output_error():
    model = nn.Sequential(nn.Linear(12, 6), nn.Linear(6, 4))
    x = correlated_inputs(50, 12, seed=5).float()
    ratios = gptq_error_ratios(model, ['0.weight', '1.weight'], [2, 3, 8],
                               [x], lambda m, x: m(x))
    h = (x.double().T @ x.double())
    w = model[0].weight.detach()
    for b in (2, 3, 8):
        near = layer_output_error(w, quantize_weight(w, b).dequantize(F64),
                                  h)
        gq = layer_output_error(w, gptq_quantize(w, h, b).dequantize(F64), h)
        assert ratios['0.weight'][b] == pytest.approx(gq / near, rel=1e-9)
        assert 0 < ratios['0.weight'][b] < 1
        assert ratios['1.weight'][b] > 0


def test_passes_stop_after_the_last_call_of_the_stage():
    """A stage's pass ends once its modules are done (a module called twice
    is waited for), with the same H as a whole pass; a batch whose calls
    leave the recorded sequence runs to the end."""
    model = nn.ModuleDict(dict(a=nn.Linear(6, 6), b=nn.Linear(6, 6),
                               c=nn.Linear(6, 6)))
    reached = []

    def forward(m, x):
        y = m['a'](x)
        y = m['b'](torch.tanh(y))
        y = m['a'](y)  # shared: called again after b
        if x.shape[0] == 7:  # another call sequence
            y = m['b'](y)
        reached.append(True)
        return m['c'](y)

    names = ['a.weight', 'b.weight', 'c.weight']
    batches = [torch.randn(5, 6, generator=gen(i)) for i in range(2)]
    calls = call_sequence(model, names, batches[0], forward)
    assert len(calls.order) == 4
    # a's last call is the 3rd of 4: the pass ends at c, after `reached`;
    # b's is the 2nd: the pass ends at a's second call
    for name, passes_reaching_the_end in (('a.weight', 2), ('b.weight', 0)):
        whole = collect_hessians(model, [name], batches, forward)
        reached.clear()
        early = collect_hessians(model, [name], batches, forward, calls)
        assert torch.equal(whole.hessians(name)[0], early.hessians(name)[0])
        assert early.count(name) == whole.count(name)
        assert len(reached) == passes_reaching_the_end
    odd = [torch.randn(7, 6, generator=gen(5))]
    whole = collect_hessians(model, ['a.weight'], odd, forward)
    reached.clear()
    early = collect_hessians(model, ['a.weight'], odd, forward, calls)
    assert len(reached) == 1  # b where c was recorded: to the end
    assert torch.equal(whole.hessians('a.weight')[0],
                       early.hessians('a.weight')[0])
    assert not any(m._forward_pre_hooks for m in model.values())


def test_runs_in_eval_mode_and_restores_the_mode():
    """A hook's before_test comes before the test loop's eval(): dropout
    must not reach H, and the caller's mode comes back."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    batches = [torch.randn(30, 8, generator=gen(i)) for i in range(2)]
    plan = {'0.weight': 3, '2.weight': 3}
    want = gptq_apply(copy.deepcopy(base).eval(), plan, batches,
                      lambda m, x: m(x)).applied
    train = copy.deepcopy(base).train()
    got = gptq_apply(train, plan, batches, lambda m, x: m(x)).applied
    assert train.training
    for name in plan:
        assert torch.equal(got[name].codes, want[name].codes), name
    train = copy.deepcopy(base).train()
    ratios = gptq_error_ratios(train, list(plan), [3], batches,
                               lambda m, x: m(x))
    assert train.training
    assert ratios == gptq_error_ratios(base.eval(), list(plan), [3], batches,
                                       lambda m, x: m(x))
