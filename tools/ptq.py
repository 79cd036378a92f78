"""Post-training quantization of an mmdet detector, then COCO evaluation.

Like mmdet's ``tools/test.py``: config → cfg-options → Runner → test. The
config's ``DistillSensitivityHook`` quantizes the weights after the checkpoint
is loaded and before the test loop; mmdet's ``CocoMetric`` scores the result.

With ``--launcher pytorch`` (``tools/dist_ptq.sh CONFIG N``) the
calibration batches are shared among the processes, the traces all-reduced,
the plan solved on rank 0 and mmdet's distributed test loop evaluates; on
machines without CUDA the processes talk over gloo.

Examples:
    python tools/ptq.py configs/detr/detr_tiny_shapes_uniform_4bit.py
    python tools/ptq.py configs/detr/detr_r50_outquant_5bit.py \
        --checkpoint detr-r50-e632da11.pth
    python tools/ptq.py configs/detr/detr_tiny_shapes.py --list-layers
    bash tools/dist_ptq.sh configs/detr/detr_r50_outquant_5bit.py 8 \
        --checkpoint detr_r50.pth
"""
import warnings

# setuptools' own deprecation notice, raised when mmengine imports
# pkg_resources: noise at the top of every run (set before the imports)
warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import os.path as osp  # noqa: E402
from copy import deepcopy  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdet_hawq.engine.process_group import (DEFAULT_TIMEOUT_S,  # noqa: E402
                                    init_cpu_process_group)
from mmdet_hawq.engine.cli import (  # noqa: E402
    check_checkpoint, check_work_dir, load_detector, read_config, write_json)
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='mmdet-hawq post-training quantization and evaluation')
    parser.add_argument('config', help='config file path')
    parser.add_argument(
        '--checkpoint', help='checkpoint to quantize (default: load_from of '
        'the config)')
    parser.add_argument('--work-dir', help='folder for logs and outputs')
    parser.add_argument(
        '--float', action='store_true',
        help='also evaluate the float model (without the hook) first')
    parser.add_argument(
        '--uniform-baseline', action='store_true',
        help='also evaluate uniform quantization at the hook\'s target bits')
    parser.add_argument(
        '--list-layers', action='store_true',
        help='print the candidate weights (included or why not) and exit')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, xxx=yyy format')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument(
        '--dist-timeout', type=float, default=None,
        help='seconds a collective waits for a rank before the run stops '
        f'with an error (default: env_cfg.dist_cfg.timeout of the config, '
        f'else {DEFAULT_TIMEOUT_S})')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_config(args: argparse.Namespace) -> Config:
    """Config with the command line applied; checks the inputs exist and
    the work dir can be written."""
    cfg = read_config(args.config, args.cfg_options)
    setup_launcher(cfg, args.launcher, args.dist_timeout)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.checkpoint is not None:
        cfg.load_from = args.checkpoint
    if args.list_layers:
        return cfg  # only the model's structure is needed
    if not cfg.get('load_from'):
        raise HawqUserError(
            f'{args.config}: no checkpoint to quantize: pass --checkpoint '
            'PATH or set load_from in the config')
    check_checkpoint(cfg.load_from, '--checkpoint')
    check_work_dir(cfg.work_dir)
    return cfg


def setup_launcher(cfg: Config, launcher: str,
                   timeout_s: Optional[float]) -> None:
    """Launcher, backend and collective timeout of a distributed run.

    mmengine starts the group on GPUs (NCCL); on machines without CUDA its
    pytorch launcher cannot (it calls ``torch.cuda.set_device``), so the
    gloo group is started here and the test loop's DDP wrapper is told to
    stay on the CPU.
    """
    cfg.launcher = launcher
    if launcher == 'none':
        return
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    if timeout_s is not None:
        dist_cfg['timeout'] = timeout_s
    dist_cfg.setdefault('timeout', DEFAULT_TIMEOUT_S)
    if torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise HawqUserError(
            f'--launcher {launcher} needs CUDA on this machine: on CPUs use '
            'torchrun with --launcher pytorch (tools/dist_ptq.sh CONFIG N)')
    dist_cfg['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None,
            broadcast_buffers=False)
    init_cpu_process_group(dist_cfg['timeout'])


def checked_model(cfg: Config) -> torch.nn.Module:
    """Fail fast, before any run: the checkpoint (mmdet's or the official
    DETR format) must fit the config's model strictly and be finite. The
    ``--float`` and ``--uniform-baseline`` runs rely on this check too.

    Returns:
        nn.Module: The model with the checkpoint's weights.
    """
    return load_detector(cfg, cfg.load_from, '--checkpoint')


def check_detector(cfg: Config) -> None:
    """Fail fast, before anything is built: the config's detector must be a
    supported DETR-family type."""
    from mmdet.utils import register_all_modules

    from mmdet_hawq.engine.detector import check_detector_type
    register_all_modules()
    check_detector_type(cfg.model)


def check_hooks(cfg: Config, model: torch.nn.Module) -> None:
    """Every check of the hooks that needs no data, before any run: their
    settings, budgets, weight patterns and plan files, then the data files
    the runs read (annotation files, image folders)."""
    from mmdet_hawq.api import QuantSettings
    from mmdet_hawq.engine.hooks.quantization_hook import check_run
    for hook_cfg in hawq_hooks(cfg):
        settings = QuantSettings.from_kwargs(
            quant_settings(hook_cfg), 'DistillSensitivityHook')
        check_run(settings, model, cfg)


def quant_settings(hook_cfg: dict) -> dict:
    """The quantization settings of a hook config (its keys less the
    hook's own)."""
    from mmdet_hawq.engine.hooks.quantization_hook import HOOK_ARGS
    return {k: v for k, v in hook_cfg.items() if k not in HOOK_ARGS}


def hawq_hooks(cfg: Config) -> list:
    return [
        h for h in cfg.get('custom_hooks', [])
        if h.get('type') == 'DistillSensitivityHook'
    ]


def uniform_baseline(hook: dict) -> dict:
    """The hook config of the uniform baseline of a sensitivity run: every
    weight at ``int(target_bits)`` with the same selection, scales,
    rounding and calibration images."""
    dropped = ('metric', 'target_bits', 'bit_range', 'min_bits', 'plan_file')
    base = {k: v for k, v in hook.items() if k not in dropped}
    return dict(base, metric='uniform', bits=int(hook['target_bits']))


def list_layers(cfg: Config) -> None:
    """Print the candidate weights of the config's model."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    from mmdet_hawq.models import (class_activation, detection_head,
                                   detector_family)
    from mmdet_hawq.quant import DEFAULT_EXCLUDE, list_weights
    hooks = hawq_hooks(cfg)
    opts = hooks[0] if hooks else {}
    model = MODELS.build(cfg.model)
    print(f'{type(model).__name__}: {detector_family(model).name}, '
          f'{class_activation(model)} class head '
          f'({type(detection_head(model)).__name__})')
    infos = list_weights(model, opts.get('include'),
                         opts.get('exclude', DEFAULT_EXCLUDE))
    width = max(len(i.name) for i in infos)
    for i in infos:
        state = 'quantized' if i.included else f'float ({i.reason})'
        print(f'{i.name:<{width}}  {str(list(i.shape)):<20} '
              f'{i.numel:>9}  {state}')
    n_q = sum(i.numel for i in infos if i.included)
    print(f'{sum(i.included for i in infos)} of {len(infos)} weights '
          f'quantized: {n_q} of {sum(i.numel for i in infos)} elements')


def run_test(cfg: Config) -> dict:
    """mmdet's test loop on ``cfg``; its metrics, and the summary the hook
    wrote (empty without a hook)."""
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    summary = {}
    for hook in hawq_hooks(cfg):
        path = osp.join(cfg.work_dir, hook.get('out_subdir', 'hawq'),
                        'summary.json')
        if is_main_process() and osp.isfile(path):
            with open(path) as f:
                summary = json.load(f)
    return dict(metrics=metrics, summary=summary)


def _map(result: dict) -> float:
    return result['metrics'].get('coco/bbox_mAP', float('nan'))


def main() -> int:
    args = parse_args()
    cfg = load_config(args)
    if args.list_layers:
        list_layers(cfg)
        return 0
    if not hawq_hooks(cfg):
        raise HawqUserError(
            f'{args.config} has no DistillSensitivityHook in custom_hooks: '
            'use a configs/*/*_{uniform,losssen,outfloat,outquant}_*bit.py '
            'config or add the hook (see README)')
    check_detector(cfg)
    check_hooks(cfg, checked_model(cfg))
    results = {}
    if args.float:
        float_cfg = deepcopy(cfg)
        float_cfg.custom_hooks = [
            h for h in cfg.get('custom_hooks', [])
            if h.get('type') != 'DistillSensitivityHook'
        ]
        float_cfg.work_dir = osp.join(cfg.work_dir, 'float')
        results['float'] = run_test(float_cfg)
    hook = hawq_hooks(cfg)[0]
    if args.uniform_baseline and hook.get('target_bits') is not None:
        base_cfg = deepcopy(cfg)
        base_cfg.custom_hooks = [
            h for h in cfg.custom_hooks
            if h.get('type') != 'DistillSensitivityHook'
        ] + [uniform_baseline(hook)]
        base_cfg.work_dir = osp.join(cfg.work_dir, 'uniform_baseline')
        results['uniform'] = run_test(base_cfg)
    results['quantized'] = run_test(cfg)
    if is_main_process():
        report(cfg, hook, results)
    return 0


def _gptq(summary: dict) -> str:
    """', GPTQ rounding' for a run that used it (nothing for nearest)."""
    return ', GPTQ rounding' if summary.get('rounding') == 'gptq' else ''


def report(cfg: Config, hook: dict, results: dict) -> None:
    """Print the summary lines and write ``ptq_results.json``."""
    q = results['quantized']
    s = q['summary']
    lines = ['', '== mmdet-hawq PTQ summary ==']
    if 'float' in results:
        lines.append(f"float      bbox mAP {_map(results['float']):.4f}")
    if 'uniform' in results:
        u = results['uniform']['summary']
        lines.append(f"uniform    bbox mAP {_map(results['uniform']):.4f}  "
                     f"(avg {u['avg_bits']:.3f} bits{_gptq(u)})")
    lines.append(
        f"quantized  bbox mAP {_map(q):.4f}"
        f"  ({s.get('metric')}{_gptq(s)}, avg "
        f"{s.get('avg_bits', float('nan')):.3f} bits over quantized weights)")
    lines.append(
        f"weights    {s.get('weight_bytes', 0) / 2**20:.3f} MiB at these bits,"
        f" fp32 {s.get('fp32_bytes', 0) / 2**20:.3f} MiB")
    if 'packed_bytes' in s:
        lines.append(f"packed     {osp.relpath(s['packed_file'])}: "
                     f"{s['packed_bytes'] / 2**20:.3f} MiB on disk")
    out_dir = osp.join(cfg.work_dir, hook.get('out_subdir', 'hawq'))
    figures = [osp.join(out_dir, f) for f in ('bits_per_layer.png',
                                              'traces.png')
               if osp.isfile(osp.join(out_dir, f))]
    if figures:
        lines.append('figures    ' + '  '.join(figures))
    # what the log warned of (e.g. too few calibration images for GPTQ)
    for name, label in (('uniform', 'uniform baseline: '), ('quantized', '')):
        if name in results:
            lines.extend(f'warning    {label}{text}' for text in
                         results[name]['summary'].get('warnings', []))
    print('\n'.join(lines))
    out = osp.join(cfg.work_dir, 'ptq_results.json')
    write_json(out, results)
    print(f'results: {out}')


if __name__ == '__main__':
    run_cli(main)
