"""Predicted vs measured damage: which sensitivity predicts what
quantization does to the outputs.

For each sensitivity report given (the ``layers.json`` a hook run writes:
per-layer averaged traces ``s_l``), the prediction of quantizing layer ``l``
to ``b`` bits is ``s_l · e_l(b)``, with ``e_l`` the error term the ILP uses
for that metric. The measured damage is the distillation loss of the whole
model against the float teacher on held-out images (the val split, not the
calibration images), with layer ``l`` alone at ``b`` bits (per layer), or
with a whole plan applied (per plan: random plans and the reports' own ILP
plans). Spearman's rank correlation says how well each metric orders the
damage.

Writes ``validation.json`` (every measurement), ``validation.md`` (the rank
correlations) and ``scatter_layers.png``/``scatter_plans.png`` (log-log, one
colour per metric) into ``--out-dir``.

Activation sites (``--activations``, runs with
``activations=dict(sensitivity=True)``): the prediction for a layer's inputs
(and a convolution's output) at int8 is the run's predicted damage, trace ×
squared error on the calibration images; the measured damage is the
increase of the same distillation loss on the held-out images when only
that layer's activation sites are fake-quantized, on the run's quantized
weights. Spearman's ρ over the layers comes with a bootstrap 95% interval
(the layers resampled). Written to ``activations.json`` and
``activations.md`` in ``--out-dir``.

Example:
    python experiments/validate_sensitivity.py \\
        configs/dino/dino_tiny_shapes.py \\
        --checkpoint checkpoints/dino_tiny_shapes.pth \\
        --report outquant-gn=results/dino_tiny_shapes_table1/rows/\\
4-bit_outquant_gauss_newton --bits 2 3 4 --out-dir results/validation_dino
"""
import argparse
import copy
import json
import os.path as osp
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from mmengine.logging import MMLogger
from mmengine.runner import Runner
from mmengine.utils import ProgressBar
from scipy.stats import spearmanr

from mmdet_hawq.api import CalibrationSettings, distillation_objective
from mmdet_hawq.engine.calibration import build_calibration
from mmdet_hawq.engine.cli import load_detector, read_config, write_json
from mmdet_hawq.engine.run import unwrap
from mmdet_hawq.errors import HawqUserError, run_cli
from mmdet_hawq.models import (DISTILLATION_DEFAULTS, class_activation,
                               decoder_outputs)
from mmdet_hawq.quant import (error_terms, load_plan, make_plan, plan_bits,
                              quantizable_weights, temporarily_quantized)
from mmdet_hawq.report import plot_prediction_scatter
from mmdet_hawq.sensitivity import preprocess_batches


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--report', nargs='+', default=[],
                   metavar='LABEL=DIR',
                   help='sensitivity run folders (with layers.json and '
                   'summary.json), each with a label')
    p.add_argument('--activations', nargs='+', default=[],
                   metavar='LABEL=DIR',
                   help='ptq runs with activations=dict(sensitivity=True) '
                   '(their hawq/ folder: activation_sites.json, '
                   'packed.pth): per-site predicted vs measured damage')
    p.add_argument('--bootstrap', type=int, default=1000,
                   help='resamples of the sites for the 95%% interval of '
                   'the activation rank correlation')
    p.add_argument('--bits', type=int, nargs='+', default=[3, 4],
                   help='bit-widths of the per-layer test')
    p.add_argument('--num-images', type=int, default=32,
                   help='held-out val images the damage is measured on')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--plans', type=int, default=50,
                   help='random plans of the per-plan test (0: none)')
    p.add_argument('--extra-plans', nargs='*', default=[], metavar='DIR',
                   help='more ILP runs (folders with plan.json) whose plans '
                   'join the per-plan test, e.g. other budgets')
    p.add_argument('--plan-bits', type=int, nargs='+', default=[3, 4, 5, 6],
                   help='bit-widths a random plan draws from per layer')
    p.add_argument('--plan-target', type=float,
                   help='average bits every random plan is moved to (within '
                   '0.05), so that plans are compared at one budget as the '
                   'ILP compares them (default: no target)')
    p.add_argument('--map', action='store_true',
                   help="also measure every plan's bbox mAP with mmdet's "
                   'test loop on the val split (slow: one evaluation per '
                   'plan)')
    p.add_argument('--temperature', type=float,
                   help='T of the measured distillation loss (default: by '
                   'the class head)')
    p.add_argument('--lambda-kl', type=float,
                   help='KL weight of the measured loss (default: by the '
                   'class head)')
    p.add_argument('--out-dir', required=True)
    return p.parse_args()


def read_report(spec: str, names: List[str]) -> dict:
    """``LABEL=DIR`` → label, metric, per-layer traces and the ILP plan."""
    label, sep, folder = spec.partition('=')
    if not sep or not label:
        raise HawqUserError(f'--report {spec!r}: write LABEL=DIR, e.g. '
                            'outquant-gn=results/.../rows/4-bit_outquant_'
                            'gauss_newton')
    files = {k: osp.join(folder, f'{k}.json')
             for k in ('layers', 'summary', 'plan')}
    for f in files.values():
        if not osp.isfile(f):
            raise HawqUserError(f'--report {label}: {f} does not exist: give '
                                'the folder of a sensitivity run (tools/'
                                'ptq.py or experiments/table1.py rows/...)')
    with open(files['layers']) as f:
        layers = {r['name']: r for r in json.load(f)}
    with open(files['summary']) as f:
        metric = json.load(f)['metric']
    missing = [n for n in names if layers.get(n, {}).get('trace_used')
               is None]
    if missing:
        raise HawqUserError(f'--report {label}: no trace for {missing[0]} '
                            f'(and {len(missing) - 1} more): the run was '
                            'made on another model or weight selection')
    return dict(label=label, metric=metric,
                traces={n: float(layers[n]['trace_used']) for n in names},
                plan={n: plan_bits(load_plan(files['plan'])).get(n)
                      for n in names})


class Damage:
    """Distillation loss of the model against its float teacher on fixed
    held-out batches, for weights set to given bit-widths."""

    def __init__(self, model, batches, weights, lambda_kl: float,
                 temperature: float) -> None:
        self.model = model
        self.weights = weights
        # the damage is measured on what the detector outputs: its decoder
        self.objective = distillation_objective(
            model, weights, batches, None, None, lambda_kl, temperature,
            outputs=decoder_outputs)
        self.num_batches = len(batches)

    @torch.no_grad()
    def __call__(self, bits: Dict[str, Optional[int]]) -> float:
        """Loss with every weight in ``bits`` fake-quantized (others float).
        """
        with temporarily_quantized(self.weights, make_plan(bits)):
            return float(sum(self.objective.loss(i).item()
                             for i in range(self.num_batches)))


def random_plan(numels: Dict[str, int], bits: List[int],
                target: Optional[float], rng: np.random.Generator,
                tol: float = 0.05) -> Dict[str, int]:
    """Bits drawn per layer from ``bits``; with ``target``, random layers
    are then stepped down or up one bit-width at a time until the
    parameter-weighted average is within ``tol`` of it."""
    names = list(numels)
    plan = {n: int(rng.choice(bits)) for n in names}
    if target is None:
        return plan
    total = sum(numels.values())
    avg = sum(numels[n] * plan[n] for n in names) / total
    for _ in range(100 * len(names)):
        if abs(avg - target) <= tol:
            return plan
        n = names[rng.integers(len(names))]
        i = bits.index(plan[n]) + (1 if avg < target else -1)
        if 0 <= i < len(bits):
            step = numels[n] * (bits[i] - plan[n]) / total
            if abs(avg + step - target) < abs(avg - target):
                plan[n], avg = bits[i], avg + step
    raise HawqUserError(f'--plan-target {target}: no random plan within '
                        f'{tol} of it with --plan-bits {bits}')


def run_facts(args, img_ids: list, lambda_kl: float, temperature: float,
              start: float) -> dict:
    """What every record of a run starts with: its arguments, images,
    distillation settings and time."""
    return dict(args=vars(args), img_ids=img_ids, lambda_kl=lambda_kl,
                temperature=temperature,
                seconds=round(time.time() - start, 1))


def plan_map(cfg, checkpoint: str, out_dir: str
             ) -> Callable[[Dict[str, int]], float]:
    """A function plan → bbox mAP through mmdet's test loop on the val
    split (the Runner's model, fake-quantized per plan, then restored)."""
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    cfg.work_dir = osp.join(out_dir, 'runner')
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', [])
                        if h.get('type') != 'DistillSensitivityHook']
    runner = Runner.from_cfg(cfg)
    runner.test()  # loads the checkpoint
    model = unwrap(runner.model)
    params = dict(model.named_parameters())

    def evaluate(plan: Dict[str, int]) -> float:
        with temporarily_quantized(params, make_plan(plan)):
            return float(runner.test_loop.run()['coco/bbox_mAP'])

    return evaluate


def rank_correlation(pred: List[float], meas: List[float]) -> float:
    rho = spearmanr(pred, meas).statistic
    return float(rho) if np.isfinite(rho) else float('nan')


#: Predictions of a layer's activation damage compared (activation_sites.json
#: columns summed over the layer's sites): the run's trace × error, and each
#: factor alone (what a Hessian-free or an error-free rule would rank by).
PREDICTORS = dict(predicted='predicted_damage', error_only='squared_error',
                  trace_only='trace')
#: Layer values of runs since the measured correction (every site of a
#: layer carries them): the damage the site choice reads, measured on the
#: calibration images.
LAYER_PREDICTORS = dict(choice='layer_damage')
#: The measured damage the top layers must hold for :func:`top_share`.
TOP_SHARE = 0.9


def top_share(pred: List[float], meas: List[float]) -> float:
    """Share of the measured damage held by the ``k`` layers a predictor
    ranks first, where ``k`` is the fewest layers holding :data:`TOP_SHARE`
    of it: 1 when the predictor ranks the layers whose float precision
    recovers the loss first."""
    meas = np.maximum(np.asarray(meas, dtype=float), 0.0)
    total = meas.sum()
    if total <= 0:
        return float('nan')
    ordered = np.sort(meas)[::-1]
    k = int(np.searchsorted(np.cumsum(ordered), TOP_SHARE * total)) + 1
    top = np.argsort(-np.asarray(pred, dtype=float), kind='stable')[:k]
    return float(meas[top].sum() / ordered[:k].sum())


def validate_activations(spec: str, cfg, teacher, batches, lambda_kl: float,
                         temperature: float, resamples: int,
                         seed: int) -> dict:
    """Predicted vs measured damage of every layer's activation sites of
    one run (see the module docstring)."""
    from mmdet_hawq.engine.exported import load_for_export
    from mmdet_hawq.quant.activations import (ActivationRange,
                                              quantized_activations,
                                              sites_of)
    from mmdet_hawq.sensitivity import DistillationObjective
    label, sep, folder = spec.partition('=')
    files = {k: osp.join(folder, f) for k, f in (
        ('sites', 'activation_sites.json'), ('packed', 'packed.pth'),
        ('summary', 'summary.json'))}
    missing = [f for f in files.values() if not osp.isfile(f)]
    if not sep or not label or missing:
        raise HawqUserError(
            f'--activations {spec!r}: write LABEL=DIR with the hawq/ folder '
            'of a ptq run with activations (e.g. act=work_dirs/act/'
            f'detr_w8a8/hawq){"; missing " + missing[0] if missing else ""}')
    with open(files['sites']) as f:
        rows = json.load(f)
    with open(files['summary']) as f:
        bits = json.load(f)['activations']['bits']
    predictors = dict(PREDICTORS, **{
        k: c for k, c in LAYER_PREDICTORS.items() if c in rows[0]})
    if any('predicted_damage' not in r for r in rows):
        raise HawqUserError(
            f'--activations {label}: {files["sites"]} has no predicted '
            'damage: make the run with activations=dict(sensitivity=True)')
    student = load_for_export(cfg, files['packed'])[0]
    ranges = {r['site']: ActivationRange(r['lo'], r['hi'], bits)
              for r in rows}
    sites = sites_of(student, ranges)
    objective = DistillationObjective(
        student, teacher, batches, {}, lambda_kl, temperature,
        activation=class_activation(student), outputs=decoder_outputs)

    @torch.no_grad()
    def loss(quantized: Dict[str, object]) -> float:
        with quantized_activations(sites, quantized):
            return float(sum(objective.loss(i).item()
                             for i in range(len(batches))))

    base = loss({})
    layers: Dict[str, dict] = {}
    for r in rows:
        layer = layers.setdefault(r['layer'], dict(
            layer=r['layer'], sites=[], **{k: 0.0 for k in predictors}))
        for key, column in PREDICTORS.items():
            layer[key] += r[column]
        for key, column in LAYER_PREDICTORS.items():
            if key in predictors:
                layer[key] = r[column]
        layer['sites'].append(r['site'])
    bar = ProgressBar(len(layers))
    for layer in layers.values():
        layer['measured'] = loss({n: ranges[n] for n in layer['sites']}) - \
            base
        bar.update()
    meas = [x['measured'] for x in layers.values()]
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(meas), len(meas)) for _ in range(resamples)]
    correlations = {}
    for key in predictors:
        pred = [x[key] for x in layers.values()]
        boot = [rank_correlation([pred[i] for i in pick],
                                 [meas[i] for i in pick]) for pick in picks]
        boot = [b for b in boot if np.isfinite(b)]
        correlations[key] = dict(
            rho=rank_correlation(pred, meas), top_share=top_share(pred, meas),
            rho_95=np.percentile(boot, [2.5, 97.5]).tolist() if boot else
            [float('nan')] * 2)
    return dict(label=label, run=folder, base_loss=base,
                correlations=correlations, layers=list(layers.values()))


def main() -> int:
    args = parse_args()
    logger = MMLogger.get_instance('validate_sensitivity')
    cfg = read_config(args.config)
    model = load_detector(cfg, args.checkpoint, '--checkpoint')
    weights = quantizable_weights(model)
    names = list(weights)
    if not args.report and not args.activations:
        raise HawqUserError('give --report LABEL=DIR (weights) or '
                            '--activations LABEL=DIR (activation sites)')
    reports = [read_report(s, names) for s in args.report]
    activation = class_activation(model)
    lambda_kl, temperature = DISTILLATION_DEFAULTS[activation]
    lambda_kl = args.lambda_kl if args.lambda_kl is not None else lambda_kl
    temperature = args.temperature or temperature
    val = copy.deepcopy(cfg)
    val.train_dataloader = copy.deepcopy(cfg.test_dataloader)
    loader, img_ids = build_calibration(val, CalibrationSettings(
        num_images=args.num_images, seed=args.seed))
    batches = preprocess_batches(model, loader)
    if args.activations:
        return main_activations(args, cfg, model, batches, img_ids,
                                lambda_kl, temperature)
    damage = Damage(model, batches, weights, lambda_kl, temperature)
    all_bits = set(args.bits) | set(args.plan_bits)
    start = time.time()
    logger.info(f'per layer: {len(names)} weights x bits {args.bits} on '
                f'{len(img_ids)} held-out images')
    layers = []
    bar = ProgressBar(len(names) * len(args.bits))
    for n in names:
        for b in args.bits:
            layers.append(dict(name=n, bits=b, measured=damage({n: b})))
            bar.update()
    rng = np.random.default_rng(args.seed)
    numels = {n: p.numel() for n, p in weights.items()}
    plans = [dict(kind='random', plan=random_plan(
        numels, sorted(args.plan_bits), args.plan_target, rng))
        for _ in range(args.plans)]
    plans += [dict(kind=f"ilp {r['label']}", plan=r['plan'])
              for r in reports if None not in r['plan'].values()]
    for folder in args.extra_plans:
        path = osp.join(folder, 'plan.json')
        if not osp.isfile(path):
            raise HawqUserError(f'--extra-plans: {path} does not exist: give '
                                'folders of sensitivity runs')
        plan = plan_bits(load_plan(path))
        if any(plan.get(n) is None for n in names):
            raise HawqUserError(f'--extra-plans: {path} leaves some of the '
                                'weights float: give runs made on the same '
                                'weight selection')
        plans.append(dict(kind=f'ilp {osp.basename(osp.normpath(folder))}',
                          plan={n: plan.get(n) for n in names}))
    all_bits = sorted(set(all_bits) | {
        b for p in plans for b in p['plan'].values() if b is not None})
    errors = {m: error_terms(weights, all_bits, reference_bits=8 if
                             m == 'outquant' else None)
              for m in {r['metric'] for r in reports}}
    logger.info(f'per plan: {len(plans)} plans')
    bar = ProgressBar(len(plans))
    test_map = plan_map(cfg, args.checkpoint, args.out_dir) if args.map \
        else None
    for p in plans:
        p['measured'] = damage(p['plan'])
        if test_map is not None:
            p['mAP'] = test_map(p['plan'])
        p['avg_bits'] = sum(numels[n] * p['plan'][n] for n in names) / sum(
            numels.values())
        bar.update()
    table = []
    for r in reports:
        s, e = r['traces'], errors[r['metric']]
        for row in layers:
            row[r['label']] = s[row['name']] * e[row['name']][row['bits']]
        for p in plans:
            p[r['label']] = sum(s[n] * e[n][p['plan'][n]] for n in names)
        by_bits = {b: rank_correlation(
            [x[r['label']] for x in layers if x['bits'] == b],
            [x['measured'] for x in layers if x['bits'] == b])
            for b in args.bits}
        table.append(dict(
            label=r['label'], metric=r['metric'],
            layer_rho=by_bits,
            layer_rho_all=rank_correlation([x[r['label']] for x in layers],
                                           [x['measured'] for x in layers]),
            plan_rho=rank_correlation([p[r['label']] for p in plans],
                                      [p['measured'] for p in plans]),
            plan_map_rho=rank_correlation(
                [p[r['label']] for p in plans],
                [-p['mAP'] for p in plans]) if args.map else None))
    write_json(osp.join(args.out_dir, 'validation.json'), dict(
        run_facts(args, img_ids, lambda_kl, temperature, start),
        correlations=table, layers=layers,
        plans=[{k: v for k, v in p.items() if k != 'plan'} for p in plans]))
    labels = [r['label'] for r in reports]
    plot_prediction_scatter(
        osp.join(args.out_dir, 'scatter_layers.png'),
        {lab: ([x[lab] for x in layers], [x['measured'] for x in layers])
         for lab in labels}, 'one layer quantized alone')
    plot_prediction_scatter(
        osp.join(args.out_dir, 'scatter_plans.png'),
        {lab: ([p[lab] for p in plans], [p['measured'] for p in plans])
         for lab in labels}, 'whole plans')
    head = ('| sensitivity | metric | ' + ' | '.join(
        f'per layer ρ, {b} bits' for b in args.bits)
        + ' | per layer ρ, all | per plan ρ |'
        + (' per plan ρ with mAP drop |' if args.map else ''))
    lines = [head, '|' + '---|' * (4 + len(args.bits) + args.map)]
    for t in table:
        cells = ' | '.join(f'{t["layer_rho"][b]:.3f}' for b in args.bits)
        extra = f" {t['plan_map_rho']:.3f} |" if args.map else ''
        lines.append(f"| {t['label']} | {t['metric']} | {cells} | "
                     f"{t['layer_rho_all']:.3f} | {t['plan_rho']:.3f} |"
                     + extra)
    with open(osp.join(args.out_dir, 'validation.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


def main_activations(args, cfg, model, batches, img_ids, lambda_kl: float,
                     temperature: float) -> int:
    """The ``--activations`` test: one row per run."""
    start = time.time()
    results = [validate_activations(spec, cfg, model, batches, lambda_kl,
                                    temperature, args.bootstrap, args.seed)
               for spec in args.activations]
    write_json(osp.join(args.out_dir, 'activations.json'), dict(
        run_facts(args, img_ids, lambda_kl, temperature, start),
        runs=results))
    keys = [k for k in (*PREDICTORS, *LAYER_PREDICTORS)
            if any(k in r['correlations'] for r in results)]
    lines = ['| run | layers | ' + ' | '.join(
        f'ρ {k} (95% interval), top share' for k in keys) + ' |',
        '|---|---|' + '---|' * len(keys)]
    for r in results:
        c = r['correlations']
        lines.append(f"| {r['label']} | {len(r['layers'])} | " + ' | '.join(
            f"{c[k]['rho']:.3f} ({c[k]['rho_95'][0]:.3f}, "
            f"{c[k]['rho_95'][1]:.3f}), {c[k]['top_share']:.2f}"
            if k in c else '–' for k in keys) + ' |')
    lines.append('')
    lines.append(f'top share: the measured damage of the layers a predictor '
                 f'ranks first, over that of the fewest layers holding '
                 f'{TOP_SHARE:.0%} of it (1: those layers ranked first).')
    with open(osp.join(args.out_dir, 'activations.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    return 0


if __name__ == '__main__':
    run_cli(main)
