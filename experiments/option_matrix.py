"""Every setting of docs/usage.md, end to end on the three shipped small
models, each row against the bound it must meet: a resumable matrix.

A row is one ``DistillSensitivityHook`` config, written to
``<out>/configs/<model>/<row>.py`` over the model's
``configs/_base_/<model>_tiny_shapes_hawq.py`` and run by ``tools/ptq.py``
with the work dir ``<out>/rows/<model>/<row>/``; rows with 8-bit
activations are also exported by ``tools/export_onnx.py`` and evaluated
under ONNX Runtime by ``tools/evaluate_onnx.py`` (export rows re-export
another row's ``packed.pth``); the float mAP comes from
``tools/evaluate.py``. The rows of a model share one sensitivity trace
cache (``<out>/cache/<model>``). Each finished row writes
``<out>/rows/<model>/<row>.json`` and a rerun skips it (failed rows, rows
whose settings changed and ``--redo`` run again); every run rewrites
``<out>/matrix.json`` and ``<out>/matrix.md`` from those files. The bound of
each row, and where it comes from, is in :data:`ROWS`.

Examples:
    python experiments/option_matrix.py                     # the whole matrix
    python experiments/option_matrix.py --models detr \
        --rows 'uniform_*' 'w8a8_*'
    python experiments/option_matrix.py --weight-only  # no activation rows
    python experiments/option_matrix.py --report            # only the table
"""
import argparse
import fnmatch
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmdet_hawq.engine.cli import write_json
from mmdet_hawq.errors import HawqUserError, run_cli, set_interrupt_note

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODELS = ('detr', 'dino', 'deformable_detr')


@dataclass(frozen=True)
class Row:
    """One setting, run on each model.

    ``bounds`` are clauses that must all hold: ``('docs', mAP, tol)`` (not
    checked in --quick runs), ``('float', loss)`` (Δ vs float ≥ −loss),
    ``('same', row)`` (that row's mAP exactly), ``('vs', row, margin)`` (≥
    that row's mAP − margin), ``('ort', tol)`` (ONNX Runtime within tol of
    PyTorch), ``('fails', text)`` (stops with an error line holding text).
    A number given as a (DETR, DINO, Deformable DETR) tuple is per model.
    """
    name: str
    hook: Optional[dict]  # None: the float row, or an export of `source`
    bounds: Tuple[tuple, ...]
    why: str  # where the bound comes from
    export: Optional[Tuple[str, ...]] = None  # export_onnx.py options
    source: Optional[str] = None  # the row whose outputs this one reads


W8 = dict(metric='uniform', bits=8)
S5 = dict(target_bits=5, bit_range=(3, 6))
OQ4G = dict(metric='outquant', target_bits=4, bit_range=(3, 6),
            rounding='gptq')
ACTS, ORT = ('--activations', ), ('ort', 0.3)  # the row's activations.json
ORT_WHY = '; ORT: deployment.md measured within 0.1'
HUTCH, GN = dict(estimator='hutchinson'), dict(estimator='gauss_newton')
ROWS: Tuple[Row, ...] = (
    Row('float', None, (('docs', (43.5, 61.7, 62.3), 0.05), ),
        'results.md float rows'),
    Row('uniform_8bit', W8, (('float', 0.9), ),
        'paper: 8-bit loses 0.9 on COCO; results.md 0.0 / +0.1 / 0.0'),
    Row('uniform_8bit_per_channel', dict(W8, per_channel=True),
        (('float', 0.9), ), "the paper's 8-bit loss"),
    Row('uniform_5bit', dict(metric='uniform', bits=5),
        (('float', (3.0, 1.3, 2.0)), ),
        'results.md −2.0 / −0.3 / −1.0, less 1.0'),
    Row('uniform_5bit_include_exclude',
        dict(metric='uniform', bits=5, include=['encoder.*', 'decoder.*'],
             exclude=['*.ffn.*']), (('vs', 'uniform_5bit', 0.5), ),
        "not measured before: fewer weights than uniform_5bit's, at most "
        '0.5 below it'),
    Row('outquant_5bit_gauss_newton', dict(metric='outquant', **S5),
        (('float', (1.6, 1.2, 1.2)), ),
        'results.md −0.6 / −0.2 / −0.2, less 1.0'),
    Row('outfloat_5bit_gauss_newton', dict(metric='outfloat', **S5),
        (('float', (1.6, 1.2, 1.2)), ),
        'results.md −0.6 / −0.2 / −0.2, less 1.0'),
    Row('outquant_5bit_range_4_7_min_bits',
        dict(metric='outquant', target_bits=5, bit_range=(4, 7),
             min_bits={'backbone.*': 5}),
        (('vs', 'outquant_5bit_gauss_newton', 1.0), ),
        'not measured before: at most 1.0 below the (3, 6) plan'),
    Row('plan_from_outquant_5bit',
        dict(metric='plan', plan_file='{source}/hawq/plan.json'),
        (('same', 'outquant_5bit_gauss_newton'), ),
        "that row's plan.json: the same model",
        source='outquant_5bit_gauss_newton'),
    Row('outquant_5bit_critical_classes',
        dict(metric='outquant', sensitivity=dict(critical_classes=['cross']),
             **S5), (('vs', 'outquant_5bit_gauss_newton', 1.0), ),
        'results.md: the same plans as all classes on DETR'),
    Row('outquant_4bit_gptq', OQ4G, (('float', 1.0), ),
        'results.md GPTQ bar at 4 bits (−0.4 / 0.0 / −0.1)'),
    Row('outquant_4bit_gptq_act_order', dict(OQ4G, gptq=dict(act_order=True)),
        (('float', 1.0), ), 'the GPTQ bar (act_order not measured before)'),
    Row('outquant_4bit_gptq_onnx_weight_only', None, (ORT, ),
        'INT4/INT8 weights, float activations' + ORT_WHY, export=(),
        source='outquant_4bit_gptq'),
    Row('losssen_5bit_gauss_newton',
        dict(metric='losssen', sensitivity=GN, **S5),
        (('fails', 'no Gauss-Newton form'), ),
        'usage.md: Loss Sen has Hutchinson only'),
    Row('losssen_5bit', dict(metric='losssen', **S5),
        (('float', (1.3, 1.1, 1.1)), ),
        'results.md −0.3 / −0.1 / −0.1 (Hutchinson), less 1.0'),
    Row('outfloat_5bit_hutchinson',
        dict(metric='outfloat', sensitivity=HUTCH, **S5),
        (('float', (1.7, 1.2, 1.2)), ), 'results.md −0.7 (DINO, '
        'Deformable: not measured, their GN rows), less 1.0'),
    Row('outquant_5bit_hutchinson',
        dict(metric='outquant', sensitivity=HUTCH, **S5),
        (('float', (1.9, 1.2, 1.2)), ), 'results.md −0.9 (DINO, '
        'Deformable: not measured, their GN rows), less 1.0'),
    *(Row(f'w8a8_{m}', dict(W8, activations=dict(bits=8, method=m)),
          (('float', 1.0), ORT), 'W8A8 within 1.0 (results.md with mse and '
          'sensitivity: −0.4 / +0.2 / 0.0)' + ORT_WHY, export=ACTS)
      for m in ('minmax', 'percentile', 'mse')),
    Row('w8a8_mse_sensitivity',
        dict(W8, activations=dict(bits=8, method='mse', sensitivity=True)),
        (('float', 1.0), ORT), 'the shipped *_w8a8.py: results.md '
        '−0.4 / +0.2 / 0.0' + ORT_WHY, export=ACTS),
    Row('w8a8_percentile_sensitivity_int8_macs_0.95',
        dict(W8, activations=dict(bits=8, method='percentile',
                                  sensitivity=True, int8_macs=0.95)),
        (('float', 1.0), ORT), 'as W8A8 (results.md: 0.95 ties 1.0 on '
        'W4A8)' + ORT_WHY, export=ACTS),
    Row('w8a8_float_sites_backbone',
        dict(W8, activations=dict(bits=8, float_sites=['backbone.*'])),
        (('float', 1.0), ORT), 'as W8A8, fewer int8 sites' + ORT_WHY,
        export=ACTS),
    Row('w8a6_mse', dict(W8, activations=dict(bits=6, method='mse')),
        (('float', 3.0), ), 'not measured before, a first loose bound '
        '(no export: it takes 8 bits)'),
    Row('w4a8', dict(OQ4G, activations=dict(bits=8, method='mse',
                                            sensitivity=True)),
        (('float', 1.5), ORT), 'issue 22: W4A8 within 1.5 (results.md '
        '−0.8 / −0.1 / 0.0)' + ORT_WHY, export=ACTS),
    Row('w4a8_onnx_int4_matmul', None, (ORT, ), 'MatMulNBits' + ORT_WHY,
        export=ACTS + ('--int4-matmul', ), source='w4a8'),
    Row('w8a8_onnx_opset17', None, (ORT, ), 'INT8 codes need no opset 21'
        + ORT_WHY, export=ACTS + ('--opset', '17'),
        source='w8a8_mse_sensitivity'),
)
BY_NAME = {r.name: r for r in ROWS}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='results/option_matrix',
                   help='output folder (default: results/option_matrix)')
    p.add_argument('--models', nargs='+', default=list(MODELS),
                   help=f'models (default: {" ".join(MODELS)})')
    p.add_argument('--rows', nargs='+', metavar='PATTERN',
                   help='rows matching these fnmatch patterns (default: '
                   'all); the float row and the rows they read or are '
                   'compared with come too')
    p.add_argument('--weight-only', action='store_true',
                   help='leave out the rows with quantized activations')
    p.add_argument('--redo', action='store_true',
                   help='run the chosen rows again even if finished')
    p.add_argument('--report', action='store_true',
                   help='only rewrite matrix.json and matrix.md')
    p.add_argument('--quick', type=int, metavar='N',
                   help='a smoke run: the first N val images, 8 calibration '
                   'images, 2 trace samples (the table says so)')
    return p.parse_args()


def is_activation_row(row: Row) -> bool:
    """A row with quantized activations, or an export of one."""
    if row.source:
        return is_activation_row(BY_NAME[row.source])
    return bool(row.hook and row.hook.get('activations'))


def select(args: argparse.Namespace) -> List[Tuple[str, Row]]:
    """The (model, row) pairs to run: row by row (a row after those it
    reads or is compared with), each on every model."""
    bad = sorted(set(args.models) - set(MODELS))
    if bad:
        raise HawqUserError(f'--models {bad} unknown: use some of '
                            f'{", ".join(MODELS)}')
    chosen = {'float'}
    for pattern in args.rows or ['*']:
        hit = fnmatch.filter(BY_NAME, pattern)
        if not hit:
            raise HawqUserError(f'--rows {pattern!r} matches no row: the '
                                f'rows are {", ".join(BY_NAME)}')
        chosen.update(n for n in hit if not (
            args.weight_only and is_activation_row(BY_NAME[n])))
    todo = list(chosen)
    while todo:  # the rows read or compared with
        row = BY_NAME[todo.pop()]
        for name in [row.source] + [a[0] for k, *a in row.bounds
                                    if k in ('same', 'vs')]:
            if name and name not in chosen:
                chosen.add(name)
                todo.append(name)
    return [(m, r) for r in ROWS for m in args.models if r.name in chosen]


def per_model(value: Any, model: str) -> Any:
    return value[MODELS.index(model)] if isinstance(value, tuple) else value


def row_key(row: Row, quick: Optional[int]) -> Any:
    """What a row is run with (a finished row with another key reruns)."""
    return json.loads(json.dumps(dict(hook=row.hook, export=row.export,
                                      source=row.source, quick=quick)))


def load_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def load_record(out: str, model: str, name: str) -> dict:
    """A row's record (empty before its first run)."""
    path = osp.join(out, 'rows', model, f'{name}.json')
    return load_json(path) if osp.isfile(path) else {}


def quick_options(out: str, quick: Optional[int]) -> List[str]:
    """``--cfg-options`` of a quick run: the first N val images, as an
    annotation file of their own (``CocoMetric`` scores every image of its
    file)."""
    if not quick:
        return []
    ann, val = osp.join(out, f'quick_val_{quick}.json'), \
        'data/shapes/annotations/instances_val.json'
    if not osp.isfile(val):
        raise HawqUserError(f'{val} does not exist: run `make data`')
    if not osp.isfile(ann):
        coco = load_json(val)
        coco['images'] = coco['images'][:quick]
        ids = {i['id'] for i in coco['images']}
        coco['annotations'] = [a for a in coco['annotations']
                               if a['image_id'] in ids]
        write_json(ann, coco)
    return [f'test_dataloader.dataset.ann_file={ann}',
            f'test_evaluator.ann_file={ann}']


class StepFailed(Exception):
    """A tool exited non-zero; the message is its error line."""


def call(rec: dict, folder: str, step: str, args: List[str]) -> None:
    """Run a tool of the project (its output in ``<folder>/<step>.log``).

    Raises:
        StepFailed: It exited non-zero (with its ``error:`` line, else its
            last line).
    """
    rec['commands'].append(shlex.join(['python', *args]))
    with open(osp.join(folder, f'{step}.log'), 'w') as log:
        proc = subprocess.run([sys.executable, *args], stdout=log,
                              stderr=subprocess.PIPE, text=True)
        log.write(proc.stderr)
    if proc.returncode:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        first = [ln for ln in lines if ln.startswith(('error:', 'internal'))]
        line = first[0] if first else lines[-1] if lines else 'no output'
        raise StepFailed(f'{step} exit {proc.returncode}: {line}')


def hook_text(hook: dict) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in hook.items())


def cfg_options(options: List[str]) -> List[str]:
    return ['--cfg-options', *options] if options else []


def run_float(rec: dict, model: str, folder: str, data: List[str]) -> None:
    """The float row: ``tools/evaluate.py`` on the shipped checkpoint."""
    res = osp.join(folder, 'float.json')
    call(rec, folder, 'evaluate', [
        'tools/evaluate.py', f'configs/{model}/{model}_tiny_shapes.py',
        f'checkpoints/{model}_tiny_shapes.pth', '--out', res, '--work-dir',
        folder, *cfg_options(data)])
    rec['mAP'] = load_json(res)['coco/bbox_mAP']


def run_ptq(rec: dict, model: str, row: Row, folder: str, source: str,
            out: str, data: List[str]) -> None:
    """A hook row: its config over the model's hawq base, through
    ``tools/ptq.py`` (a quick run: 8 calibration images, 2 samples)."""
    hook = {k: v.format(source=source) if isinstance(v, str) else v
            for k, v in row.hook.items()}
    if hook['metric'] in ('losssen', 'outfloat', 'outquant'):
        hook['sensitivity'] = dict(hook.get('sensitivity', {}),
                                   cache_dir=f'{out}/cache/{model}')
    cfg = osp.join(out, 'configs', model, f'{row.name}.py')
    base = f'configs/_base_/{model}_tiny_shapes_hawq.py'
    os.makedirs(osp.dirname(cfg), exist_ok=True)
    with open(cfg, 'w') as f:  # (the Runner saves its own copy in folder)
        f.write(f'_base_ = {osp.relpath(base, osp.dirname(cfg))!r}\n'
                "custom_imports = dict(imports=['mmdet_hawq'], "
                'allow_failed_imports=False)\ncustom_hooks = [dict('
                f"type='DistillSensitivityHook', {hook_text(hook)})]\n")
    quick = ['custom_hooks.0.calibration.num_images=8'] + [
        f'custom_hooks.0.sensitivity.{k}' for k in (
            'min_samples=2', 'max_samples=2')] if data else []
    call(rec, folder, 'ptq', ['tools/ptq.py', cfg, '--work-dir', folder,
                              *cfg_options(quick + data)])
    res = load_json(osp.join(folder, 'ptq_results.json'))['quantized']
    rec.update(mAP=res['metrics']['coco/bbox_mAP'],
               warnings=res['summary'].get('warnings', []),
               avg_bits=res['summary'].get('avg_bits'))


def run_export(rec: dict, model: str, row: Row, folder: str, source: str,
               data: List[str]) -> None:
    """``tools/export_onnx.py`` on the source row's ``packed.pth`` (and
    its ``activations.json`` for ``--activations``), then
    ``tools/evaluate_onnx.py``."""
    config = f'configs/{model}/{model}_tiny_shapes.py'
    onnx, hawq = osp.join(folder, 'onnx'), osp.join(source, 'hawq')
    opts: List[str] = []
    for o in row.export:
        opts += [o, osp.join(hawq, 'activations.json')] if o == ACTS[0] \
            else [o]
    call(rec, folder, 'export_onnx', [
        'tools/export_onnx.py', config, osp.join(hawq, 'packed.pth'),
        osp.join(onnx, 'model.onnx'), *opts])
    call(rec, folder, 'evaluate_onnx', [
        'tools/evaluate_onnx.py', config, osp.join(onnx, 'model.onnx'),
        '--out', osp.join(onnx, 'eval.json'), '--work-dir',
        osp.join(onnx, 'work'), *cfg_options(data)])
    rec['ort_mAP'] = load_json(osp.join(onnx, 'eval.json'))['coco/bbox_mAP']


def run_row(model: str, row: Row, args: argparse.Namespace) -> dict:
    """Run one row's tools and write its record.

    Returns:
        dict: The record: status ('ok' or 'error' with the error line), mAP
        and ORT mAP (%), warnings, avg bits, seconds, commands.
    """
    out = args.out
    folder = osp.join(out, 'rows', model, row.name)
    source = osp.join(out, 'rows', model, row.source or row.name)
    os.makedirs(folder, exist_ok=True)
    data = quick_options(out, args.quick)
    rec = dict(model=model, row=row.name, key=row_key(row, args.quick),
               status='ok', warnings=[], commands=[])
    start = time.time()
    try:
        if row.source and load_record(out, model, row.source).get(
                'status') != 'ok':
            raise StepFailed(f'row {row.source}, which this one reads, '
                             'has no result')
        if row.hook is not None:
            run_ptq(rec, model, row, folder, source, out, data)
        elif row.source is None:
            run_float(rec, model, folder, data)
        if row.export is not None:
            run_export(rec, model, row, folder, source, data)
    except StepFailed as err:
        rec.update(status='error', error=str(err))
    for key in ('mAP', 'ort_mAP'):  # COCO's 3 decimals, in points
        if key in rec:
            rec[key] = round(100 * rec[key], 1)
    rec['seconds'] = round(time.time() - start, 1)
    write_json(osp.join(out, 'rows', model, f'{row.name}.json'), rec)
    return rec


def check(row: Row, rec: dict, done: Dict[str, dict],
          model: str) -> Optional[bool]:
    """Whether ``rec`` meets every clause of the row's bound; None where
    that cannot be told (the row it is compared with has no mAP; a docs
    value against a --quick run)."""
    verdicts: List[Optional[bool]] = []
    for kind, *arg in row.bounds:
        if kind == 'fails':
            verdicts.append(rec['status'] == 'error' and
                            arg[0] in rec.get('error', ''))
            continue
        value = rec.get('ort_mAP' if kind == 'ort' else 'mAP')
        ref = per_model(arg[0], model) if kind == 'docs' else rec.get(
            'mAP') if kind == 'ort' else done.get(
                'float' if kind == 'float' else arg[0], {}).get('mAP')
        if kind == 'docs' and rec['key']['quick']:
            verdicts.append(None)  # other images than the docs'
        elif value is None:  # the run or its export failed
            verdicts.append(False)
        elif ref is None:  # nothing to compare with yet
            verdicts.append(None)
        else:
            tol = 1e-6 + (0 if kind == 'same' else per_model(arg[-1], model))
            verdicts.append(dict(
                docs=abs(value - ref) <= tol, ort=abs(value - ref) <= tol,
                float=value >= ref - tol, vs=value >= ref - tol,
                same=value == ref)[kind])
    return False if False in verdicts else None if None in verdicts \
        else True


def bound_text(row: Row, model: str) -> str:
    """The row's bound for ``model``, and where it comes from."""
    text = dict(docs=lambda a: f'= {per_model(a[0], model)} ± {a[1]}',
                float=lambda a: f'Δ ≥ −{per_model(a[0], model)}',
                same=lambda a: f'= {a[0]} exactly',
                vs=lambda a: f'≥ {a[0]} − {a[1]}',
                ort=lambda a: f'ORT within {a[0]} of PyTorch',
                fails=lambda a: f'stops with "{a[0]}"')
    return '; '.join(text[k](a) for k, *a in row.bounds) + f' ({row.why})'


def settings_text(row: Row) -> str:
    if row.hook is not None:
        return hook_text(row.hook).replace('{source}', f'<{row.source}>')
    if row.source is not None:
        return (f'export of {row.source}: '
                f'{" ".join(row.export) or "weight-only"}')
    return 'tools/evaluate.py'


def report(args: argparse.Namespace,
           selected: Sequence[Tuple[str, Row]]) -> List[dict]:
    """Rewrite matrix.json and matrix.md from the row files: every chosen
    row (run or not) and every finished one.

    Returns:
        list[dict]: One record per (model, row).
    """
    records, chosen = [], {(m, r.name) for m, r in selected}
    for model in [*args.models, *(m for m in MODELS if m not in args.models)]:
        done = {r.name: load_record(args.out, model, r.name) for r in ROWS}
        for row in ROWS:
            rec = dict(done[row.name]) or dict(status='not run', key={})
            if not done[row.name] and (model, row.name) not in chosen:
                continue
            if row.source and row.hook is None and done[row.name]:
                # an export row: its source's PyTorch mAP
                rec['mAP'] = done[row.source].get('mAP')
            m, ort = rec.get('mAP'), rec.get('ort_mAP')
            base = None if row.name == 'float' else done['float'].get('mAP')
            records.append(dict(
                model=model, row=row.name, settings=settings_text(row),
                status=rec['status'], error=rec.get('error'), mAP=m,
                float_mAP=base, delta=None if None in (m, base) else round(
                    m - base, 1), ort_mAP=ort, ort_delta=None if None in (
                        ort, m) else round(ort - m, 1),
                avg_bits=rec.get('avg_bits'), bound=bound_text(row, model),
                within_bound=None if rec['status'] == 'not run' else check(
                    row, rec, done, model), warnings=rec.get('warnings', []),
                seconds=rec.get('seconds'), commands=rec.get('commands', []),
                quick=rec['key'].get('quick')))
    command = shlex.join(['python', 'experiments/option_matrix.py',
                          *sys.argv[1:]])
    write_json(osp.join(args.out, 'matrix.json'),
                                  dict(command=command, records=records))
    with open(osp.join(args.out, 'matrix.md'), 'w') as f:
        f.write(markdown(command, records))
    return records


def _num(value: Optional[float], sign: bool = False) -> str:
    return '-' if value is None else f'{value:+.1f}' if sign else \
        f'{value:.1f}'


def markdown(command: str, records: Sequence[dict]) -> str:
    """The table: the rows outside their bound first, then every row."""
    def cells(r: dict, *more: str) -> str:
        """A table line: model, row, (settings), mAP, Δ, ORT, (more),
        bound, warnings; a failed step's error where its number would be."""
        error = f"error ({r['error']})" if r['error'] else r['status']
        ort = '-' if r['ort_mAP'] is None and (
            r['mAP'] is None or not r['error']) else error \
            if r['ort_mAP'] is None else \
            f"{r['ort_mAP']:.1f} ({_num(r['ort_delta'], True)})"
        warn = f"{len(r['warnings'])}: " + '; '.join(r['warnings'])[:150] \
            if r['warnings'] else 'none'
        row = [r['model'], r['row'] + (' (quick)' if r['quick'] else ''),
               *more[:1], error if r['mAP'] is None else _num(r['mAP']),
               _num(r['delta'], True), ort, *more[1:], r['bound'], warn]
        return '| ' + ' | '.join(str(c).replace('|', '\\|') for c in row) \
            + ' |'

    outside = [r for r in records if r['within_bound'] is False]
    checked = sum(r['within_bound'] is not None for r in records)
    quick = sorted({str(r['quick']) for r in records if r['quick']})
    text = [
        '# Option matrix: every setting of docs/usage.md on the small '
        'models', '', f'Command: `{command}`', '',
        'Rewritten from `rows/<model>/<row>.json` by every run (each row\'s '
        "commands are in `matrix.json`). mAP: bbox mAP (%) through mmdet's "
        "test loop (an export row: its source's); Δ: minus the model's "
        'float row; ORT: the ONNX export under ONNX Runtime (in brackets: '
        "minus PyTorch); warnings: the `warnings` of the run's summary.", '']
    if quick:
        text += [f'**Quick rows** (`--quick`: the first {", ".join(quick)} '
                 'val images, 8 calibration images, 2 trace samples) are '
                 'smoke runs, not results.', '']
    text += [f'## Outside their bound: {len(outside)} of {checked} checked '
             'rows', '', *(['| model | row | mAP | Δ | ORT | bound | '
                            'warnings |', '|---' * 7 + '|'] if outside else
                           ['None.']), *(cells(r) for r in outside),
             '', '## All rows', '', '| model | row | settings | mAP | Δ vs '
             'float | ORT mAP | avg bits | within bound | s | bound | '
             'warnings |', '|---' * 11 + '|']
    verdict = {True: 'yes', False: '**NO**', None: 'n/a'}
    for r in records:
        bits = '-' if r['avg_bits'] is None else f"{r['avg_bits']:.2f}"
        text.append(cells(
            r, r['settings'], bits, '-' if r['status'] == 'not run' else
            verdict[r['within_bound']], '-' if r['seconds'] is None else
            f"{r['seconds']:.0f}"))
    return '\n'.join(text) + '\n'


def finished(row: Row, rec: dict, quick: Optional[int]) -> bool:
    """A row a rerun skips: run with the same settings, without an error
    (unless the row is meant to stop with one)."""
    return bool(rec) and rec['key'] == row_key(row, quick) and (
        rec['status'] == 'ok' or row.bounds[0][0] == 'fails')


def main() -> int:
    args = parse_args()
    if args.quick is not None and args.quick < 1:
        raise HawqUserError('--quick takes a positive number of val images')
    selected = select(args)
    out = osp.abspath(args.out)  # the tools run in the repository
    args.out = osp.relpath(out, ROOT) if out.startswith(ROOT + os.sep) \
        else out
    os.chdir(ROOT)
    set_interrupt_note(lambda: f'the finished rows are saved in {args.out}/'
                       'rows; rerun the same command to go on from them')
    if not args.report:
        ran = 0
        for k, (model, row) in enumerate(selected, 1):
            head = f'[{k}/{len(selected)}] {model}/{row.name}'
            if not args.redo and finished(row, load_record(
                    args.out, model, row.name), args.quick):
                print(f'{head}: finished before, skipped', flush=True)
                continue
            print(f'{head}: running', flush=True)
            rec, ran = run_row(model, row, args), ran + 1
            r = next(x for x in report(args, selected)
                     if (x['model'], x['row']) == (model, row.name))
            print(f"{head}: {rec['status']}, mAP {_num(r['mAP'])} (Δ "
                  f"{_num(r['delta'], True)}), ORT {_num(r['ort_mAP'])}, "
                  f"within bound: {r['within_bound']}, {rec['seconds']:.0f} s"
                  + (f"; {rec['error']}" if 'error' in rec else ''),
                  flush=True)
        print(f'{ran} row(s) run, {len(selected) - ran} finished before')
    records = report(args, selected)
    print(f"{osp.join(args.out, 'matrix.md')}: {len(records)} rows, "
          f"{sum(r['within_bound'] is False for r in records)} outside "
          'their bound')
    return 0


if __name__ == '__main__':
    run_cli(main)
