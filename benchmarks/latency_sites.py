"""Which activation sites to keep float: by MACs, or by a latency table
measured on the runtime (issue 30, item 4; HAWQ-V3's latency table).

From a ptq run with ``activations=dict(sensitivity=True)`` (its
``activation_sites.json``: each site's layer, MACs and the layer's damage,
the value the site choice reads), the tool measures each layer's latency
gain on the runtime (``mmdet_hawq.deploy.latency_table``), then for each
damage budget (a share of the total damage of every layer going int8) asks
the exact program (``mmdet_hawq.allocation.sites.fastest_int8_sites``) for
the plan of most gain within it, once with the MACs as the gain and once
with the measured time. Both plans are exported and timed side by side
with the all-int8 and all-float models (interleaved rounds), and with
--eval scored on the val split on the runtime.

Example:
    python benchmarks/latency_sites.py configs/detr/detr_tiny_shapes.py \\
        --run results/option_matrix/rows/detr/w8a8_mse_sensitivity \\
        --runtime openvino --budgets 0.02 0.05 0.2 --eval \\
        --out results/runtimes/latency_sites_detr.json
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os.path as osp  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

from mmdet_hawq.deploy.runtimes import RUNTIMES  # noqa: E402
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_positive, check_work_dir, read_config, write_json)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402


def step(what: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {what}', flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--run', required=True, metavar='WORK_DIR',
                        help='a tools/ptq.py run with activations='
                        'dict(sensitivity=True)')
    parser.add_argument('--runtime', choices=list(RUNTIMES),
                        default='openvino')
    parser.add_argument('--budgets', type=float, nargs='+',
                        default=[0.02, 0.05, 0.2],
                        help='damage budgets, as shares of the total damage '
                        'of every layer int8')
    parser.add_argument('--images', type=int, default=30)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--eval', action='store_true',
                        help='mAP of each plan on the runtime')
    parser.add_argument('--work-dir')
    parser.add_argument('--out')
    args = parser.parse_args()
    check_positive(args, ('images', 'rounds', 'threads'))
    if any(not 0 <= b <= 1 for b in args.budgets):
        raise HawqUserError('--budgets take shares between 0 and 1')
    from mmdet_hawq.engine.exported import ptq_run_files
    files = dict(zip(('packed', 'ranges', 'sites'), ptq_run_files(
        args.run, ('packed.pth', 'activations.json',
                   'activation_sites.json'),
        'activations=dict(sensitivity=True)')))
    cfg = read_config(args.config)
    name = osp.splitext(osp.basename(args.config))[0]
    args.work_dir = args.work_dir or osp.join('work_dirs', 'latency_sites',
                                              name)
    check_work_dir(args.work_dir)
    if args.out:
        check_work_dir(osp.dirname(osp.abspath(args.out)))
    logging.getLogger().setLevel(logging.ERROR)

    import numpy as np

    from mmdet_hawq.allocation.sites import fastest_int8_sites
    from mmdet_hawq.deploy.latency_table import (export_plan,
                                                 layer_latency_gains)
    from mmdet_hawq.deploy.timing import time_models
    from mmdet_hawq.engine.exported import (default_input_shape, evaluate_map,
                                          load_for_export, test_images,
                                          test_loader)
    from mmdet_hawq.quant.activations import load_ranges
    with open(files['sites']) as f:
        sites = json.load(f)
    if not all('layer_damage' in s for s in sites):
        raise HawqUserError(
            f'--run {args.run}: its activation_sites.json has no damage: '
            'pass a run with activations=dict(sensitivity=True)')
    ranges = load_ranges(files['ranges'])
    layer_of = {s['site']: s['layer'] for s in sites if s['site'] in ranges}
    damage: Dict[str, float] = {}
    macs: Dict[str, float] = {}
    for s in sites:
        if s['site'] in ranges:
            damage[s['layer']] = max(0.0, s['layer_damage'])
            macs[s['layer']] = macs.get(s['layer'], 0) + s['macs']
    model, packed = load_for_export(cfg, files['packed'])
    shape = default_input_shape(cfg)
    images = [img.cpu().numpy().astype(np.float32)[None] for img, _ in
              test_images(test_loader(cfg), args.images)]
    options = {'precision': None} if args.runtime == 'openvino' else {}
    step(f'latency table: {len(damage)} layers on {args.runtime}')
    table = layer_latency_gains(model, shape, packed, ranges, layer_of,
                                images, args.work_dir, args.runtime,
                                args.threads, args.rounds, options)
    total = sum(damage.values())
    plans: Dict[str, List[str]] = {}
    rows: List[Dict[str, Any]] = []
    for budget in args.budgets:
        for by, gain in (('macs', macs), ('latency', table['gains_ms'])):
            key = f'{by}_{budget:g}'
            chosen = fastest_int8_sites(damage, gain, budget * total)
            plans[key] = sorted(chosen)
            rows.append(dict(
                plan=key, by=by, budget=budget, int8_layers=len(chosen),
                layers=len(damage),
                damage_share=sum(damage[g] for g in chosen) / total,
                int8_macs_share=sum(macs[g] for g in chosen) /
                sum(macs.values()),
                # the table's additive prediction: all int8, plus the
                # gain of each layer kept float
                predicted_ms=table['all_int8_ms'] + sum(
                    v for g, v in table['gains_ms'].items()
                    if g not in chosen)))
    step(f'timing {len(plans)} plans beside all int8 and all float')
    models = {k: export_plan(model, osp.join(args.work_dir, f'{k}.onnx'),
                             shape, packed, ranges, layer_of, v)
              for k, v in plans.items()}
    models['all_int8'] = osp.join(args.work_dir, 'all_int8.onnx')
    models['all_float'] = osp.join(args.work_dir, 'all_float.onnx')
    latency = time_models({k: (f, args.runtime, options)
                           for k, f in models.items()}, images, args.threads,
                          args.rounds, warmup=1)
    for row in rows:
        row['latency'] = latency[row['plan']]
        if args.eval:
            row['mAP'] = evaluate_map(cfg, models[row['plan']], args.runtime,
                                      **options)['mAP']
    ends = {k: latency[k] for k in ('all_int8', 'all_float')}
    if args.eval:
        for k in ends:
            ends[k] = dict(ends[k], mAP=evaluate_map(
                cfg, models[k], args.runtime, **options)['mAP'])
    lines = ['| plan | damage budget | int8 layers | damage share | int8 '
             'MACs share | ms predicted | ms measured (spread) | mAP |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f'| by {r["by"]} | {r["budget"]:g} | {r["int8_layers"]}/'
            f'{r["layers"]} | {r["damage_share"]:.3f} | '
            f'{r["int8_macs_share"]:.3f} | {r["predicted_ms"]:.2f} | '
            f'{r["latency"]["median_ms"]:.2f} '
            f'({r["latency"]["spread_ms"]:.2f}) | '
            f'{r.get("mAP", float("nan")):.3f} |')
    for k, v in ends.items():
        lines.append(f'| {k} | - | - | - | - | - | {v["median_ms"]:.2f} '
                     f'({v["spread_ms"]:.2f}) | '
                     f'{v.get("mAP", float("nan")):.3f} |')
    print('\n'.join(lines))
    if args.out:
        write_json(args.out, dict(
            config=args.config, run=args.run, runtime=args.runtime,
            threads=args.threads, images=len(images), rounds=args.rounds,
            gains_ms=table['gains_ms'], macs=macs, damage=damage,
            all_int8_ms=table['all_int8_ms'],
            all_float_ms=table['all_float_ms'], plans=plans, rows=rows,
            ends=ends, command='python benchmarks/latency_sites.py ' +
            ' '.join(sys.argv[1:])))
    return 0


if __name__ == '__main__':
    run_cli(main)
