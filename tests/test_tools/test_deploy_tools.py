"""tools/export_onnx.py, evaluate_onnx.py and benchmark_deploy.py on the
tiny DETR: the exported model's detections and metrics match the PyTorch
model's; bad input raises HawqUserError (one line through run_cli)."""
import contextlib
import copy
import importlib.util
import io
import json
import sys

import pytest

from mmdet_hawq.errors import HawqUserError

from ..conftest import script_path
from ..test_deploy.conftest import make_packed

pytestmark = pytest.mark.slow


def tool(name: str):
    """A script's module, imported from tools/ or benchmarks/ (its main()
    runs in-process: no new interpreter)."""
    path = script_path(f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'hawq_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sensitivity_run(cfg, folder: str):
    """The tiny model's W8A8 with activation sensitivity, written to
    ``folder`` as a ptq run's hawq/ folder; returns the model and result."""
    from mmdet_hawq import QuantSettings, quantize
    from mmdet_hawq.engine.calibration import calibration_set
    from mmdet_hawq.report import write_run

    from ..conftest import build_from
    model = build_from(cfg)
    settings = QuantSettings(metric='uniform', bits=8,
                             calibration=dict(num_images=4, batch_size=2),
                             activations=dict(sensitivity=True))
    result = quantize(model, calibration_set(cfg, model,
                                             settings.calibration), settings)
    write_run(str(folder), model, result)
    return model, result


def run_main(name: str, monkeypatch, *args, module=None) -> int:
    monkeypatch.setattr(sys, 'argv', [f'{name}.py', *map(str, args)])
    return (module or tool(name)).main()


@pytest.fixture(scope='module')
def deployed(tiny_cfg, tmp_path_factory):
    """The tiny config as a file, its packed checkpoint, the export."""
    folder = tmp_path_factory.mktemp('deploy_tools')
    cfg_file = str(folder / 'tiny.py')
    tiny_cfg.dump(cfg_file)
    packed = make_packed(tiny_cfg, path=folder / 'packed.pth')['path']
    return dict(folder=folder, cfg=cfg_file, packed=packed,
                onnx=str(folder / 'tiny.onnx'))


def test_export_then_evaluate(deployed, monkeypatch):
    d = deployed
    assert run_main('export_onnx', monkeypatch, d['cfg'], d['packed'],
                    d['onnx']) == 0
    with open(d['onnx'][:-5] + '.json') as f:
        record = json.load(f)
    assert record['opset'] == 21 and record['input_shape'] == [128, 128]
    assert record['quantized_weights']['INT4'] > 0
    assert record['quantized_weights']['INT8'] > 0
    assert max(record['max_abs_diff_random_image'].values()) < 1e-4
    out = d['folder'] / 'eval.json'
    assert run_main('evaluate_onnx', monkeypatch, d['cfg'], d['onnx'],
                    '--compare', d['packed'], '--out', out,
                    '--work-dir', d['folder'] / 'work') == 0
    with open(out) as f:
        result = json.load(f)
    assert result['images'] == 4
    assert max(result['max_abs_diff'].values()) < 1e-4
    assert result['detections_max_abs_diff']['images_other_labels'] == 0
    assert abs(result['coco/bbox_mAP'] -
               result['torch_metrics']['coco/bbox_mAP']) <= 0.001


def test_benchmark(deployed, monkeypatch):
    """The parent's exports, checks and table, with the workers run in this
    process (a fresh interpreter costs ~10 s of imports)."""
    d = deployed
    out = d['folder'] / 'bench.json'
    module = tool('benchmark_deploy')

    def in_process(args, variant):
        worker_args = copy.copy(args)
        worker_args.worker = variant
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert module.worker(worker_args) == 0
        return json.loads(printed.getvalue().splitlines()[-1])

    monkeypatch.setattr(module, 'spawn', in_process)
    assert run_main('benchmark_deploy', monkeypatch, d['cfg'], d['packed'],
                    '--images', 2, '--warmup', 0, '--variants',
                    'torch_packed', 'onnx_int', '--work-dir',
                    d['folder'] / 'bench', '--out', out,
                    module=module) == 0
    with open(out) as f:
        result = json.load(f)
    rows = {r['variant']: r for r in result['results']}
    assert set(rows) == {'torch_packed', 'onnx_int'}
    for row in rows.values():
        assert row['images'] == 2 and row['latency_ms']['median'] > 0
        assert row['rss_after_load'] > 0
    assert rows['torch_packed']['weight_bytes']['packed'] > 0
    assert result['sizes']['onnx_int'] < result['sizes']['onnx_fp32']
    assert result['packed_bit_identical_images'] == 2
    default = [b for b in result['dequantize_behaviour']
               if not b['fold_dequantize']]
    assert all(b['dequantize_nodes'] > 0 for b in default)


def test_bad_inputs(deployed, monkeypatch, tiny_cfg):
    d = deployed
    with pytest.raises(HawqUserError, match='does not end in .onnx'):
        run_main('export_onnx', monkeypatch, d['cfg'], d['packed'],
                 d['folder'] / 'x.txt')
    with pytest.raises(HawqUserError, match='--shape'):
        run_main('export_onnx', monkeypatch, d['cfg'], d['packed'],
                 d['folder'] / 'x.onnx', '--shape', 64)
    with pytest.raises(HawqUserError, match='not a packed'):
        run_main('benchmark_deploy', monkeypatch, d['cfg'],
                 tiny_cfg.load_from, '--work-dir', d['folder'] / 'b2')
    small = str(d['folder'] / 'small.onnx')
    run_main('export_onnx', monkeypatch, d['cfg'], d['packed'], small,
             '--shape', 64, 64, '--no-verify')
    with pytest.raises(HawqUserError, match='exported for 64x64'):
        run_main('evaluate_onnx', monkeypatch, d['cfg'], small,
                 '--work-dir', d['folder'] / 'work')


def test_float_checkpoint_and_opsets(deployed, monkeypatch, tiny_cfg,
                                     capsys):
    """A float checkpoint is said to be one and exported fp32; an opset too
    old for INT4 weights names the one needed; a float model may go older
    (and so may all-8-bit weights with activations,
    test_onnx_export.py::test_w8a8_runs_on_integer_kernels_in_every_family).
    """
    d = deployed
    with pytest.raises(HawqUserError, match='opset 20 is too old for the '
                       'INT4 weights.*--opset 21'):
        run_main('export_onnx', monkeypatch, d['cfg'], d['packed'],
                 d['folder'] / 'old.onnx', '--opset', '20')
    with pytest.raises(HawqUserError, match='--opset 21 or lower'):
        run_main('export_onnx', monkeypatch, d['cfg'], d['packed'],
                 d['folder'] / 'new.onnx', '--opset', '22')
    out = d['folder'] / 'float17.onnx'
    capsys.readouterr()
    assert run_main('export_onnx', monkeypatch, d['cfg'], tiny_cfg.load_from,
                    out, '--opset', '17') == 0
    printed = capsys.readouterr().out
    assert 'is not quantized (a float checkpoint' in printed
    record = json.load(open(str(out)[:-len('.onnx')] + '.json'))
    assert record['opset'] == 17
    assert record['quantized_weights'] == {'INT4': 0, 'INT8': 0}
    assert max(record['max_abs_diff_random_image'].values()) < 1e-4
