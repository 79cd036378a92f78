"""Reproduce the paper's Table 1 on a model: float, uniform and the three
sensitivity metrics at 6/5/4 (and 3) average bits, all through
``DistillSensitivityHook`` and mmdet's test loop.

Every row calls :func:`mmdet_hawq.api.quantize` in one Runner; the
calibration set is built once and shared by the rows. Traces are computed
once per (metric, estimator) and reused across bit targets through the
trace cache. Writes ``table1.md``, ``table1.json``,
``fig1_traces.png`` (log averaged trace per layer) and ``fig2_bits_5bit.png``
(bits per layer at 5 bits) into the work dir.

With ``--critical-classes NAME ...`` every sensitivity row restricts the
distillation KL term to those classes (the sensitivity setting
``critical_classes``), mmdet's ``CocoMetric`` runs class-wise and every row
(float and uniform included) records the AP of each critical class and
their mean beside the overall mAP; ``--also-all-classes`` runs every
sensitivity row with the KL over all classes too.

Example:
    python experiments/table1.py configs/detr/detr_tiny_shapes.py \
        --checkpoint checkpoints/detr_tiny_shapes.pth --work-dir results/table1
"""
import argparse
import copy
import json
import os
import os.path as osp
import time

from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from mmdet_hawq.api import QuantSettings
from mmdet_hawq.api.critical import check_critical_form, critical_indices
from mmdet_hawq.engine.calibration import (calibration_classes,
                                           calibration_set)
from mmdet_hawq.engine.cli import check_checkpoint, read_config, write_json
from mmdet_hawq.engine.run import quantize_in_runner, unwrap
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.evaluation import coco_map_bootstrap
from mmdet_hawq.quant import load_plan, plan_bits
from mmdet_hawq.report import plot_bits, plot_traces

TARGETS = ((6, (4, 7)), (5, (3, 6)), (4, (3, 6)), (3, (2, 5)))
METHODS = (  # label, metric, estimator
    ('Loss Sen', 'losssen', 'hutchinson'),
    ('Out Sen Float', 'outfloat', 'hutchinson'),
    ('Out Sen Float', 'outfloat', 'gauss_newton'),
    ('Out Sen Quant', 'outquant', 'hutchinson'),
    ('Out Sen Quant', 'outquant', 'gauss_newton'),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--work-dir', default='results/table1')
    p.add_argument('--num-images', type=int, default=100)
    p.add_argument('--hutchinson-samples', type=int, default=30)
    p.add_argument('--gn-samples', type=int, default=60)
    p.add_argument('--tol', type=float, default=0.05)
    p.add_argument('--targets', type=int, nargs='+', default=[6, 5, 4, 3])
    p.add_argument('--negative-traces', default='ucb',
                   help='trace policy of the ILP (ucb, zero, abs, error)')
    p.add_argument('--cache-dir',
                   help='trace cache to use (default: <work-dir>/cache)')
    p.add_argument('--methods', nargs='+',
                   help='only these metric:estimator rows, e.g. '
                   'outquant:gauss_newton (default: all five)')
    p.add_argument('--temperature', type=float,
                   help='distillation temperature T (default: by the class '
                   'head, see mmdet_hawq.models.DISTILLATION_DEFAULTS)')
    p.add_argument('--lambda-kl', type=float,
                   help='weight of the KL term (default: by the class head)')
    p.add_argument('--seeds', type=int, default=1,
                   help='repeat every sensitivity row over this many '
                   'calibration sets (sensitivity seeds 0..N-1) and report '
                   'mean ± standard deviation')
    p.add_argument('--bootstrap', type=int, default=200,
                   help='replicates of the bootstrap over the validation '
                   'images: a 95%% interval of every row\'s mAP (the same '
                   'draws for every row; 0: none)')
    p.add_argument('--min-bits', nargs='+', metavar='PATTERN=BITS',
                   default=[], help='the fewest bits the ILP may give the '
                   'weights a pattern matches, e.g. \'backbone.*=3\' (the '
                   'hook\'s min_bits)')
    p.add_argument('--proposals', action='store_true',
                   help='two-stage models: also distil the encoder '
                   'proposals (the sensitivity setting proposals=True)')
    p.add_argument('--no-uniform', action='store_true',
                   help='skip the 8-bit and uniform rows (e.g. when only a '
                   'sensitivity setting changes between runs)')
    p.add_argument('--critical-classes', nargs='+', metavar='NAME',
                   help='restrict the distillation KL term of every '
                   'sensitivity row to these dataset classes and report '
                   'their AP (class-wise CocoMetric) on every row')
    p.add_argument('--also-all-classes', action='store_true',
                   help='with --critical-classes: run every sensitivity row '
                   'with the KL over all classes too')
    p.add_argument('--roundings', nargs='+', choices=('nearest', 'gptq'),
                   default=['nearest'],
                   help='run every quantized row with each rounding: '
                   "nearest (the paper's) and/or GPTQ (the hook's "
                   "rounding='gptq')")
    p.add_argument('--scales', nargs='+', choices=('tensor', 'channel'),
                   default=['tensor'],
                   help='run every quantized row with per-tensor (the '
                   "paper's) and/or per-channel scales")
    p.add_argument('--gptq-error-terms', nargs='+',
                   choices=('nearest', 'gptq'), default=['nearest'],
                   help='ILP error terms of the GPTQ sensitivity rows: '
                   "nearest rounding's, and/or scaled by GPTQ's "
                   'output-error ratio (one row each)')
    p.add_argument('--gptq-options', nargs='+', action=DictAction,
                   help='other GPTQ settings of the hook, e.g. '
                   'sequential=False damp=0.01')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    return p.parse_args()


def parse_min_bits(items) -> Optional[dict]:
    """``['backbone.*=3', ...]`` → ``{'backbone.*': 3}``; nothing given →
    None (the hook's default floors)."""
    if not items:
        return None
    out = {}
    for item in items:
        pattern, _, bits = item.rpartition('=')
        if not pattern or not bits.isdigit():
            raise HawqUserError(
                f'--min-bits {item!r} is not PATTERN=BITS: give e.g. '
                "'backbone.*=3'")
        out[pattern] = int(bits)
    return out


def rows_to_run(args):
    rows = [] if args.no_uniform else [dict(
        precision='8-bit', label='Uniform', estimator='',
        hook=dict(metric='uniform', bits=8))]
    for target, rng in TARGETS:
        if target not in args.targets:
            continue
        for variant in variants(args):
            rows += target_rows(args, target, rng, variant)
    return rows


def variants(args) -> List[dict]:
    """Rounding × scales (× GPTQ error terms) of the quantized rows, as
    ``rounding``/``scales``/``error_terms`` fields."""
    out = []
    for rounding in args.roundings:
        for scales in args.scales:
            for terms in (args.gptq_error_terms if rounding == 'gptq'
                          else [None]):
                out.append(dict(rounding=rounding, scales=scales,
                                error_terms=terms))
    return out


def variant_hook(args, variant: dict, sensitivity: bool) -> dict:
    """The hook arguments of a variant."""
    hook = dict(per_channel=variant['scales'] == 'channel',
                calibration=dict(num_images=args.num_images))
    if variant['rounding'] == 'gptq':
        gptq = dict(args.gptq_options or {})
        if sensitivity:
            gptq['error_terms'] = variant['error_terms']
        hook.update(rounding='gptq', gptq=gptq)
    return hook


def target_rows(args, target: int, rng, variant: dict) -> List[dict]:
    """The uniform and sensitivity rows of one bit target and variant."""
    rows = []
    tag = dict(rounding=variant['rounding'], scales=variant['scales'])
    if not args.no_uniform and variant['error_terms'] in (None, 'nearest'):
        rows.append(dict(precision=f'{target}-bit', label='Uniform',
                         estimator='', **tag,
                         hook=dict(metric='uniform', bits=target,
                                   **variant_hook(args, variant, False))))
    for label, metric, est in METHODS:
        if args.methods and f'{metric}:{est}' not in args.methods:
            continue
        samples = args.gn_samples if est == 'gauss_newton' else \
            args.hutchinson_samples
        for critical in kl_classes(args):
            sens = dict(
                estimator=est, tol=args.tol, min_samples=min(10, samples),
                negative_traces=args.negative_traces,
                cache_dir=args.cache_dir or osp.join(args.work_dir,
                                                     'cache'),
                temperature=args.temperature, lambda_kl=args.lambda_kl,
                proposals=args.proposals, max_samples=samples)
            if critical is not None:
                sens['critical_classes'] = list(critical)
            rows.append(dict(
                precision=f'{target}-bit', label=label, estimator=est,
                kl_classes=critical, error_terms=variant['error_terms'],
                **tag,
                hook=dict(metric=metric, target_bits=target,
                          bit_range=rng,
                          min_bits=parse_min_bits(args.min_bits),
                          sensitivity=sens,
                          **variant_hook(args, variant, True))))
    return rows


def row_slug(row: dict) -> str:
    """The row's folder under ``rows/``: precision, metric, estimator, and
    the variant where it is not the paper's."""
    slug = (f"{row['precision']}_{row['hook']['metric']}_"
            f"{row['estimator'] or 'none'}")
    if row.get('kl_classes'):
        slug += '_critical'
    if row.get('rounding', 'nearest') != 'nearest':
        slug += f"_{row['rounding']}"
        if row.get('error_terms') == 'gptq':
            slug += '_gptqterms'
    if row.get('scales', 'tensor') != 'tensor':
        slug += '_perchannel'
    return slug


def kl_classes(args) -> List[Optional[List[str]]]:
    """The KL classes each sensitivity row runs with: None (all classes),
    the critical classes, or both."""
    if not args.critical_classes:
        return [None]
    return ([None] if args.also_all_classes else []) + [
        list(args.critical_classes)]


def check_critical(args, cfg: Config) -> None:
    """Check the critical class names before any run, and turn on the
    class-wise AP of the test evaluator."""
    if args.also_all_classes and not args.critical_classes:
        raise HawqUserError('--also-all-classes needs --critical-classes')
    if not args.critical_classes:
        return
    names = check_critical_form(args.critical_classes, 'outquant')
    classes = calibration_classes(cfg, None)
    if classes:
        critical_indices(names, classes)
    evaluators = cfg.test_evaluator if isinstance(
        cfg.test_evaluator, (list, tuple)) else [cfg.test_evaluator]
    for ev in evaluators:
        if ev.get('type') == 'CocoMetric':
            ev['classwise'] = True


def critical_ap(metrics: Dict[str, float],
                names: Sequence[str]) -> Dict[str, float]:
    """``{class: AP}`` from class-wise ``CocoMetric`` metrics (keys
    ``coco/<class>_precision``)."""
    missing = [n for n in names if f'coco/{n}_precision' not in metrics]
    if missing:
        raise HawqUserError(
            f'the test metrics have no class-wise AP of {missing} (keys '
            f'{sorted(metrics)}): the test evaluator must be a CocoMetric '
            "whose annotation file names these categories")
    return {n: float(metrics[f'coco/{n}_precision']) for n in names}


def with_critical_ap(record: dict, runs: Sequence[Dict[str, float]],
                     names: Optional[Sequence[str]]) -> dict:
    """Add the critical classes' AP (mean over ``runs``) and their mean."""
    if not names:
        return record
    per_run = [critical_ap(m, names) for m in runs]
    ap = {n: float(np.mean([r[n] for r in per_run])) for n in names}
    record.update(critical_AP=ap, critical_mAP=float(np.mean(list(
        ap.values()))))
    return record


def main() -> int:
    args = parse_args()
    known = {f'{m}:{e}' for _, m, e in METHODS}
    unknown = set(args.methods or ()) - known
    if unknown:
        raise HawqUserError(f'--methods {sorted(unknown)} unknown: use some '
                            f'of {sorted(known)}')
    cfg = read_config(args.config, args.cfg_options)
    cfg.load_from = check_checkpoint(args.checkpoint, '--checkpoint')
    cfg.work_dir = args.work_dir
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if h.get('type') != 'DistillSensitivityHook']
    check_critical(args, cfg)
    names = args.critical_classes
    os.makedirs(args.work_dir, exist_ok=True)
    cfg.test_evaluator['outfile_prefix'] = detections_prefix(args.work_dir,
                                                             'float')
    detections = cfg.test_evaluator['outfile_prefix'] + '.bbox.json'
    runner = Runner.from_cfg(cfg)
    float_metrics = runner.test()  # loads the checkpoint, float row
    model = unwrap(runner.model)
    float_state = copy.deepcopy(model.state_dict())
    results = [with_critical_ap(
        dict(precision='Float', label='N/A', estimator='',
             mAP=float_metrics['coco/bbox_mAP'], out='float',
             **bootstrap(cfg, detections, args.bootstrap)),
        [float_metrics], names)]
    calibrations = {}  # one calibration set per setting, shared by the rows
    for row in rows_to_run(args):
        slug = row_slug(row)
        sensitivity = row['hook']['metric'] != 'uniform'
        seeds = range(args.seeds) if sensitivity else [0]
        runs, start = [], time.time()
        for seed in seeds:
            out = slug if args.seeds == 1 or len(seeds) == 1 else \
                f'{slug}_seed{seed}'
            kwargs = copy.deepcopy(row['hook'])
            if sensitivity:
                kwargs['calibration']['seed'] = seed
            model.load_state_dict(float_state)
            settings = QuantSettings.from_kwargs(kwargs)
            calibration = calibrations.get(repr(settings.calibration))
            if calibration is None and settings.reads_calibration:
                calibration = calibrations.setdefault(
                    repr(settings.calibration),
                    calibration_set(cfg, model, settings.calibration))
            summary = quantize_in_runner(
                runner, settings, osp.join(args.work_dir, 'rows', out),
                calibration=calibration).summary
            written = keep_detections(runner, args.work_dir, out)
            detections = written if seed == 0 else detections
            runs.append(runner.test_loop.run())
        maps = [m['coco/bbox_mAP'] for m in runs]
        record = dict(
            precision=row['precision'], label=row['label'],
            estimator=row['estimator'], mAP=float(np.mean(maps)),
            avg_bits=summary['avg_bits'],
            packed_mib=summary['packed_bytes'] / 2**20,
            seconds=round(time.time() - start, 1),
            plan_seconds=summary['plan_seconds'],
            rounding_seconds=summary['rounding_seconds'],
            rounding=row.get('rounding', 'nearest'),
            scales=row.get('scales', 'tensor'),
            out=slug if len(runs) == 1 else f'{slug}_seed0',
            **bootstrap(cfg, detections, args.bootstrap))
        if len(runs) > 1:
            record.update(mAP_runs=maps, mAP_std=float(np.std(maps, ddof=1)))
        if row.get('error_terms'):
            record['error_terms'] = row['error_terms']
        if sensitivity and names:
            record['kl_classes'] = row['kl_classes'] or 'all'
        results.append(with_critical_ap(record, runs, names))
        runner.logger.info(f'table1: {record}')
        write_json(osp.join(args.work_dir, 'table1.json'), results)
    write_table(args.work_dir, results, names)
    write_figures(args.work_dir, results, list(float_state))
    return 0


def detections_prefix(work_dir: str, out: str) -> str:
    """Where ``CocoMetric`` writes a row's detections (``.bbox.json``)."""
    prefix = osp.join(work_dir, 'rows', out, 'detections')
    os.makedirs(osp.dirname(prefix), exist_ok=True)
    return prefix


def keep_detections(runner: Runner, work_dir: str, out: str) -> str:
    """Make the test evaluator's ``CocoMetric`` write the next run's
    detections into ``<work_dir>/rows/<out>/``; returns that JSON file."""
    prefix = detections_prefix(work_dir, out)
    for metric in runner.test_loop.evaluator.metrics:
        if hasattr(metric, 'outfile_prefix'):
            metric.outfile_prefix = prefix
    return f'{prefix}.bbox.json'


def bootstrap(cfg: Config, detections: str, reps: int) -> dict:
    """The row's 95% interval over the validation images (empty without
    replicates)."""
    if reps <= 0:
        return {}
    ci = coco_map_bootstrap(cfg.test_evaluator['ann_file'], detections,
                            reps=reps)
    return dict(mAP_ci=[ci['low'], ci['high']], bootstrap_reps=reps,
                mAP_replicates=[round(x, 6) for x in ci['replicates']])


def paired_delta(row: dict, base: dict) -> str:
    """``row``'s mAP minus ``base``'s, in points, with the 95% interval of
    the difference over the same bootstrap draws of the val images."""
    text = f"{100 * (row['mAP'] - base['mAP']):+.1f}"
    if len(row.get('mAP_replicates', ())) != len(
            base.get('mAP_replicates', ())) or 'mAP_replicates' not in row:
        return text
    diff = np.subtract(row['mAP_replicates'], base['mAP_replicates'])
    low, high = 100 * np.percentile(diff, [2.5, 97.5])
    return f'{text} ({low:+.1f} to {high:+.1f})'


def variant_key(row: dict) -> tuple:
    """Rows compared with one uniform row: same bits, rounding, scales."""
    return (row['precision'], row.get('rounding', 'nearest'),
            row.get('scales', 'tensor'))


def write_table(work_dir: str, results,
                names: Optional[Sequence[str]] = None) -> None:
    """``table1.md``; with critical ``names``, a column of the KL classes
    of the sensitivity rows and the AP of each critical class and their
    mean. With rows of other roundings or scales than the paper's, columns
    of the rounding, the scales, the ILP's error terms, the gap to float
    and the seconds of the plan and of the rounding."""
    uniform = {variant_key(r): r for r in results if r['label'] == 'Uniform'}
    varied = any(r.get('rounding', 'nearest') != 'nearest' or
                 r.get('scales', 'tensor') != 'tensor' for r in results)
    float_row = next((r for r in results if r['label'] == 'N/A'), None)
    extra = ['KL classes'] if names else []
    aps = [f'{n} AP' for n in names or ()] + (
        ['critical mean AP'] if names else [])
    kind = ['Rounding', 'Scales', 'ILP error terms'] if varied else []
    gap = ['Δ vs float (paired 95% interval)'] if varied else []
    secs = ['plan s', 'rounding s'] if varied else []
    head = ['Precision', 'Quant scheme', 'Estimator', *kind, *extra,
            'mAP (%)', '95% interval over val images (seed 0\'s run)',
            'Δ vs uniform (paired 95% interval)', *gap,
            *aps, 'avg bits', 'packed MiB', *secs]
    lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
    for r in results:
        delta = '-' if r['label'] in ('Uniform', 'N/A') or \
            variant_key(r) not in uniform else \
            paired_delta(r, uniform[variant_key(r)])
        bits = f"{r['avg_bits']:.2f}" if 'avg_bits' in r else '32'
        size = f"{r['packed_mib']:.2f}" if 'packed_mib' in r else '-'
        est = {'gauss_newton': 'Gauss-Newton', 'hutchinson': 'Hutchinson',
               '': ''}[r['estimator']]
        cell = f"{100 * r['mAP']:.1f}" + (
            f" ± {100 * r['mAP_std']:.1f}" if 'mAP_std' in r else '')
        ci = '-' if 'mAP_ci' not in r else \
            f"{100 * r['mAP_ci'][0]:.1f}–{100 * r['mAP_ci'][1]:.1f}"
        cells = [r['precision'], r['label'], est]
        if varied:
            quantized = r['label'] != 'N/A'
            cells += [r.get('rounding', 'nearest') if quantized else '-',
                      f"per {r.get('scales', 'tensor')}" if quantized
                      else '-',
                      r.get('error_terms') or '-']
        if names:
            kl = r.get('kl_classes', '')
            cells.append(kl if isinstance(kl, str) else ', '.join(kl))
        cells += [cell, ci, delta]
        if varied:
            cells.append('-' if r is float_row or float_row is None else
                         paired_delta(r, float_row))
        if names:
            cells += [f"{100 * r['critical_AP'][n]:.1f}" for n in names]
            cells.append(f"{100 * r['critical_mAP']:.1f}")
        cells += [bits, size]
        if varied:
            cells += [str(r.get('plan_seconds', '-')),
                      str(r.get('rounding_seconds', '-'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    with open(osp.join(work_dir, 'table1.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def write_figures(work_dir: str, results, state_names) -> None:
    traces, plans = {}, {}
    for r in results:
        out = osp.join(work_dir, 'rows', r.get('out', ''))
        if r.get('out') is None or variant_key(r)[1:] != ('nearest',
                                                          'tensor'):
            continue
        tfile = osp.join(out, 'traces.json')
        label = f"{r['label']} ({r['estimator']})" if r['estimator'] else \
            r['label']
        if isinstance(r.get('kl_classes'), list):
            label += ' critical'
        if osp.isfile(tfile) and label not in traces:
            with open(tfile) as f:
                t = json.load(f)
            from mmdet_hawq.sensitivity import TraceResult
            tr = TraceResult(t['names'], t['numels'], t['samples'])
            traces[label] = dict(mean=tr.mean().tolist(),
                                 se=tr.stderr().tolist(), names=t['names'])
        if r['precision'] == '5-bit':
            plans[label] = plan_bits(load_plan(osp.join(out, 'plan.json')))
    if traces:
        names = next(iter(traces.values()))['names']
        plot_traces(osp.join(work_dir, 'fig1_traces.png'), names, traces)
    if plans:
        names = list(next(iter(plans.values())))
        plot_bits(osp.join(work_dir, 'fig2_bits_5bit.png'), names, plans,
                  title='Bits per layer at 5 bits on average')


if __name__ == '__main__':
    run_cli(main)
