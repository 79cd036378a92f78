"""Does the activation site choice catch ranges that break the model?

An experiment of issue 28: the small model's activation ranges are broken
on purpose, two ways, and the run's mAP is measured with every site int8,
with the site choice at an ``int8_macs`` budget as it now is (by each
layer's measured damage,
:func:`mmdet_hawq.api.activation_sites.corrected_damage`), and with the choice
as it was (the quadratic model's predictions alone):

* ``old-observer``: percentile ranges from the observer as it was before
  the fix, which kept views of the live tensors, so every site before an
  in-place ReLU or residual ``+=`` saw rewritten values;
* ``shrunk``: MSE ranges, those of the sites matching ``--shrink``
  shrunk to ``--factor`` of their width, so that they clip.

Each row is a run of the config's hook in mmdet's test loop (the Runner,
``CocoMetric``); the rows resume from ``<out>/<case>/<row>/row.json``. The
run folders keep ``hawq/activation_sites.json`` (every site's predicted
and its layer's measured damage), which ``experiments/validate_sensitivity.py
--activations`` reads to compare them with the damage measured on held-out
images.

Example:
    python experiments/broken_ranges.py \\
        configs/detr/detr_tiny_shapes_w8a8.py \\
        --case old-observer --out results/broken_ranges
"""
import argparse
import copy
import fnmatch
import json
import math
import os
import os.path as osp
import time
from contextlib import ExitStack, contextmanager
from typing import Dict

from mmengine.runner import Runner

import mmdet_hawq.api.activation_sites as api_activations
import mmdet_hawq.quant.activations as quant_activations
from mmdet_hawq.engine.cli import read_config, write_json
from mmdet_hawq.errors import HawqUserError, run_cli

CASES = ('old-observer', 'shrunk')
ROWS = {  # row → (activations settings over the case's method, choice)
    'all_int8': (dict(), 'measured'),
    'budget_measured': (dict(sensitivity=True), 'measured'),
    'budget_predicted': (dict(sensitivity=True), 'predicted'),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='a config with DistillSensitivityHook')
    p.add_argument('--case', choices=CASES, required=True)
    p.add_argument('--out', default='results/broken_ranges')
    p.add_argument('--shrink', default='backbone.layer1.*',
                   help='sites whose ranges are shrunk (fnmatch; case '
                   'shrunk)')
    p.add_argument('--factor', type=float, default=0.2,
                   help='share of the range kept (case shrunk)')
    p.add_argument('--int8-macs', type=float, default=0.95,
                   help='the budget of the budget_* rows')
    p.add_argument('--rows', nargs='+', choices=['correct', *ROWS],
                   default=['correct', *ROWS])
    return p.parse_args()


def old_add(self, x) -> None:
    """The observer's ``add`` before the fix: it kept views."""
    flat = x.detach().reshape(-1).float()
    self.elements += flat.numel()
    self.lo = min(self.lo, float(flat.min()))
    self.hi = max(self.hi, float(flat.max()))
    if self.kept < quant_activations.SAMPLE_PER_SITE:
        step = max(1, math.ceil(flat.numel() /
                                quant_activations.SAMPLE_PER_BATCH))
        part = flat[::step]  # a view on the CPU: the bug
        self.samples.append(part)
        self.kept += part.numel()


def run_row(cfg, row: str, case: str, out: str, args) -> dict:
    """One run of the hook and mmdet's test loop; its mAP and summary."""
    folder = osp.join(out, row)
    done = osp.join(folder, 'row.json')
    if osp.isfile(done):
        with open(done) as f:
            return json.load(f)
    cfg = copy.deepcopy(cfg)
    hook = cfg.custom_hooks[0]
    method = 'percentile' if case == 'old-observer' else 'mse'
    settings, choice = ROWS.get(row, (dict(), 'measured'))
    if settings.get('sensitivity'):
        settings = dict(settings, int8_macs=args.int8_macs)
    hook['activations'] = dict(bits=8, method=method, **settings)
    cfg.work_dir = folder
    start = time.time()
    with ExitStack() as stack:
        if row != 'correct':
            stack.callback(_restore())
            if case == 'old-observer':
                quant_activations._Observer.add = old_add
            else:
                _shrink_ranges(args.shrink, args.factor)
        if choice == 'predicted':
            api_activations.corrected_damage = _predicted_only

        metrics = Runner.from_cfg(cfg).test()
    with open(osp.join(folder, 'hawq', 'summary.json')) as f:
        summary = json.load(f)
    result = dict(case=case, row=row, activations=hook['activations'],
                  choice=choice, mAP=metrics['coco/bbox_mAP'],
                  int8_sites=summary['activations']['int8_sites'],
                  sites=summary['activations']['sites'],
                  warnings=summary.get('warnings', []),
                  seconds=round(time.time() - start, 1))
    write_json(done, result)
    return result


def _restore():
    """A callable that puts back what a row patches."""
    saved = (quant_activations._Observer.add, api_activations.observe_sites,
             api_activations.calibrate_range,
             api_activations.corrected_damage)

    def restore() -> None:
        (quant_activations._Observer.add, api_activations.observe_sites,
         api_activations.calibrate_range,
         api_activations.corrected_damage) = saved
    return restore


def _predicted_only(predicted, measured):
    """The choice as it was: the quadratic model's predictions alone."""
    return dict(predicted)


def _shrink_ranges(pattern: str, factor: float) -> None:
    """From now on the ranges of the sites matching ``pattern`` (fnmatch)
    are ``factor`` of their calibrated ones: they clip."""
    original_observe = api_activations.observe_sites
    original_range = api_activations.calibrate_range
    observed: Dict[str, dict] = {}

    @contextmanager
    def observe(sites, outputs=None):
        with original_observe(sites, outputs) as seen:
            observed['seen'] = seen
            yield seen

    def calibrate(observer, method, bits=8):
        rng = original_range(observer, method, bits)
        name = next(n for n, o in observed['seen'].items() if o is observer)
        if not fnmatch.fnmatchcase(name, pattern):
            return rng
        return quant_activations.ActivationRange(rng.lo * factor,
                                                 rng.hi * factor, bits)
    api_activations.observe_sites = observe
    api_activations.calibrate_range = calibrate


def main() -> int:
    args = parse_args()
    cfg = read_config(args.config)
    if not any(h.get('type') == 'DistillSensitivityHook'
               for h in cfg.get('custom_hooks', [])):
        raise HawqUserError(f'{args.config} has no DistillSensitivityHook')
    out = osp.join(args.out, args.case)
    if args.int8_macs != 0.95:
        out += f'_int8_macs{args.int8_macs:g}'
    os.makedirs(out, exist_ok=True)
    rows = []
    for k, row in enumerate(args.rows, start=1):
        print(f'[{k}/{len(args.rows)}] {args.case} {row}', flush=True)
        rows.append(run_row(cfg, row, args.case, out, args))
        print(f"    mAP {rows[-1]['mAP']:.4f}, {rows[-1]['int8_sites']} of "
              f"{rows[-1]['sites']} sites int8, {rows[-1]['seconds']} s",
              flush=True)
    write_json(osp.join(out, 'rows.json'), dict(config=args.config, rows=rows))
    return 0


if __name__ == '__main__':
    run_cli(main)
