"""Reports of a quantization run: per-layer tables (JSON + CSV) and figures.

Figures follow the paper: Figure 1 (log averaged Hessian trace per layer,
one line per metric, layers in model order) and Figure 2 (bits per layer).
"""
import csv
import json
import os
import os.path as osp
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .quant import pack_state_dict, plan_bits, save_plan
from .quant.activations import save_ranges
from .quant.selection import weight_group

if TYPE_CHECKING:  # the API sits beside this module, not below it
    from .api import QuantResult


def write_layer_report(out_dir: str, rows: List[Dict],
                       summary: Mapping) -> Dict[str, str]:
    """Write ``layers.csv``, ``layers.json`` and ``summary.json``.

    Args:
        out_dir (str): Folder, created if missing.
        rows (list[dict]): One dict per weight; the CSV's columns are every
            key of any row, in order of first appearance (empty where a row
            lacks one).
        summary (Mapping): Run-level facts (bits, sizes, settings).

    Returns:
        dict: Kind → path of each file written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(
        csv=osp.join(out_dir, 'layers.csv'),
        json=osp.join(out_dir, 'layers.json'),
        summary=osp.join(out_dir, 'summary.json'))
    with open(paths['json'], 'w') as f:
        json.dump(rows, f, indent=1)
    if rows:
        keys = list(dict.fromkeys(k for row in rows for k in row))
        with open(paths['csv'], 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for row in rows:
                writer.writerow({
                    k: json.dumps(v) if isinstance(v, (list, dict)) else v
                    for k, v in row.items()
                })
    with open(paths['summary'], 'w') as f:
        json.dump(dict(summary), f, indent=1)
    return paths


def _group_spans(names: Sequence[str]):
    spans, start = [], 0
    for i in range(1, len(names) + 1):
        if i == len(names) or weight_group(names[i]) != weight_group(
                names[start]):
            spans.append((weight_group(names[start]), start, i - 1))
            start = i
    return spans


def _shade_groups(ax, names: Sequence[str]) -> None:
    for k, (group, lo, hi) in enumerate(_group_spans(names)):
        if k % 2:
            ax.axvspan(lo - 0.5, hi + 0.5, color='0.92', zorder=0)
        ax.text((lo + hi) / 2, 1.01, group, transform=ax.get_xaxis_transform(),
                ha='center', va='bottom', fontsize=8)


def plot_traces(path: str, names: Sequence[str],
                traces: Mapping[str, Mapping[str, Sequence[float]]],
                title: str = 'Averaged Hessian trace per layer') -> str:
    """Figure 1: log10 averaged trace per layer, one line per metric.

    Args:
        path (str): PNG path.
        names (Sequence[str]): Weight names in model order.
        traces (Mapping): Metric label → dict with ``mean`` and ``se`` lists
            aligned with ``names``. Non-positive means are drawn as gaps.
        title (str): Figure title. Defaults to 'Averaged Hessian trace per
            layer'.

    Returns:
        str: ``path``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.12), 4))
    x = np.arange(len(names))
    for label, t in traces.items():
        mean = np.asarray(t['mean'], dtype=float)
        se = np.asarray(t['se'], dtype=float)
        ok = mean > 0
        y = np.where(ok, np.log10(np.where(ok, mean, 1)), np.nan)
        with np.errstate(divide='ignore', invalid='ignore'):
            # a lower bound at or below 0 has no log: draw 2 decades down
            lo = np.where(ok & (mean > se),
                          y - np.log10(np.abs(mean - se)), 2.0)
            hi = np.where(ok, np.log10(np.abs(mean + se)) - y, 0)
        ax.errorbar(x, y, yerr=[np.nan_to_num(lo), np.nan_to_num(hi)],
                    marker='.', lw=1, capsize=1.5, label=label)
    _shade_groups(ax, names)
    ax.set_xlabel('layer (model order)')
    ax.set_ylabel('log10 averaged Hessian trace')
    ax.set_title(title, pad=16)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bits(path: str, names: Sequence[str],
              plans: Mapping[str, Mapping[str, Optional[int]]],
              title: str = 'Bits per layer') -> str:
    """Figure 2: bit-width per layer, one step line per plan.

    Args:
        path (str): PNG path.
        names (Sequence[str]): Weight names in model order.
        plans (Mapping): Label → plan (weight name → bits or None).
        title (str): Figure title. Defaults to 'Bits per layer'.

    Returns:
        str: ``path``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.12), 3.5))
    x = np.arange(len(names))
    for label, plan in plans.items():
        bits = [plan.get(n) if plan.get(n) is not None else np.nan
                for n in names]
        ax.step(x, bits, where='mid', lw=1.2, label=label)
    _shade_groups(ax, names)
    ax.set_xlabel('layer (model order)')
    ax.set_ylabel('bits')
    ax.set_title(title, pad=16)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(path: str, curves: Mapping[str, List[Dict]]) -> str:
    """Predicted perturbation against average bits, one line per metric."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pts in curves.items():
        ax.plot([p['avg_bits'] for p in pts],
                [max(p['perturbation'], 1e-30) for p in pts], '.-',
                label=label)
    ax.set_yscale('log')
    ax.set_xlabel('average bits')
    ax.set_ylabel('predicted perturbation Σ s·e')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prediction_scatter(
        path: str, points: Mapping[str, Sequence[Sequence[float]]],
        title: str) -> str:
    """Measured damage against predicted, log-log, one colour per metric.

    Args:
        path (str): The PNG to write.
        points (Mapping): ``label → (predicted, measured)`` value lists of
            equal length; points with a value <= 0 cannot be drawn on log
            axes and are left out (their count is in the legend).
        title (str): The plot's title.

    Returns:
        str: ``path``.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, (pred, meas) in points.items():
        pred, meas = np.asarray(pred, float), np.asarray(meas, float)
        keep = (pred > 0) & (meas > 0)
        note = f' ({int((~keep).sum())} <= 0 left out)' if \
            (~keep).any() else ''
        ax.scatter(pred[keep], meas[keep], s=10, alpha=0.7,
                   label=label + note)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('predicted Σ s·e')
    ax.set_ylabel('measured distillation loss')
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sensitivity_report(out_dir: str, metric: str, estimator: str,
                             names: Sequence[str], traces: Mapping,
                             pareto: List[Dict]) -> None:
    """Write a sensitivity run's ``traces.json`` (all samples), ``traces.png``
    (Figure 1 style), ``pareto.json`` and ``pareto.png``.

    Args:
        out_dir (str): Folder (exists).
        metric (str): The sensitivity metric, for labels.
        estimator (str): The trace estimator, for labels.
        names (Sequence[str]): Layer names in model order.
        traces (Mapping): ``TraceResult.to_dict()`` plus ``tol``; ``mean``
            and ``se`` lists are plotted.
        pareto (list[dict]): The Pareto curve (``avg_bits``,
            ``perturbation`` per point).
    """
    with open(osp.join(out_dir, 'pareto.json'), 'w') as f:
        json.dump(pareto, f, indent=1)
    plot_pareto(osp.join(out_dir, 'pareto.png'), {metric: pareto})
    plot_traces(osp.join(out_dir, 'traces.png'), names,
                {f'{metric} ({estimator})':
                 dict(mean=traces['mean'], se=traces['se'])})
    with open(osp.join(out_dir, 'traces.json'), 'w') as f:
        json.dump(traces, f, default=str)


def write_run(out_dir: str, model: nn.Module, result: 'QuantResult',
              save_packed: bool = True) -> Dict[str, Any]:
    """Write everything a quantization run leaves in ``out_dir``.

    ``packed.pth`` (the packed low-bit checkpoint, when ``save_packed``),
    ``plan.json``, the per-layer report and ``summary.json``
    (:func:`write_layer_report`), ``bits_per_layer.png`` (Figure 2 style),
    for the sensitivity metrics :func:`write_sensitivity_report`'s files,
    and with quantized activations ``activations.json`` (each int8 site's
    range) and ``activation_sites.json`` (every site: precision, MACs,
    squared error, and trace and predicted damage with ``sensitivity``).

    Args:
        out_dir (str): Folder, created if missing.
        model (nn.Module): The quantized detector (unwrapped).
        result (QuantResult): What :func:`~mmdet_hawq.api.quantize`
            returned; its summary gets ``packed_file`` and ``packed_bytes``.
        save_packed (bool): Write ``packed.pth``. Defaults to True.

    Returns:
        dict: The summary as written.
    """
    os.makedirs(out_dir, exist_ok=True)
    summary = result.summary
    if save_packed:
        path = osp.join(out_dir, 'packed.pth')
        torch.save(pack_state_dict(model, result.quantized, result.plan),
                   path)
        summary.update(packed_file=path, packed_bytes=osp.getsize(path))
    save_plan(result.plan, osp.join(out_dir, 'plan.json'))
    write_layer_report(out_dir, result.layers, summary)
    metric = summary['metric']
    plot_bits(osp.join(out_dir, 'bits_per_layer.png'), list(result.plan),
              {metric: plan_bits(result.plan)},
              title=f'Bits per layer ({metric}, '
              f'{summary["avg_bits"]:.2f} bits on average)')
    if result.sensitivity_report is not None:
        write_sensitivity_report(out_dir, **result.sensitivity_report)
    if result.activations is not None:
        save_ranges(result.activations,
                    osp.join(out_dir, 'activations.json'))
        with open(osp.join(out_dir, 'activation_sites.json'), 'w') as f:
            json.dump(result.activation_sites, f, indent=1)
    return summary
