"""Behaviour unchanged: the same quantization runs with this tree and with an
earlier release, side by side; their mAPs, plans and packed files compared.

For each case, ``tools/ptq.py`` runs in a git worktree of ``--ref`` (made
under ``--ref-dir`` if missing, sharing this tree's ``data/``) and in this
tree, each in a fresh work dir (no trace cache is shared). A case passes
when every mAP printed by both is the same, the plans give every weight the
same bits, and the packed checkpoints are byte-identical. The table and
``compare_release.json`` go to ``--work-dir``; exit status 1 if any case
differs.

With ``--tables OLD NEW`` it compares two ``experiments/table1.py`` work dirs
instead: every row's mAP, average bits and packed size, and every row's
plan (bits per weight), e.g. the committed Table 1 and a re-run of it.

Examples:
    python release/compare_release.py --ref d6d0600 --work-dir /tmp/compare
    python release/compare_release.py --tables results/table1 /tmp/t1/table1
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import subprocess
import sys
import time
from typing import Dict, List, Optional

from mmdet_hawq.engine.cli import write_json

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: name, config file name, extra ptq arguments.
CASES = (
    ('demo', 'detr_tiny_shapes_outquant_5bit.py',
     ['--float', '--uniform-baseline']),
    ('uniform 4-bit per channel', 'detr_tiny_shapes_uniform_4bit.py',
     ['--cfg-options', 'custom_hooks.0.per_channel=True']),
    ('Out Sen Quant 3-bit GPTQ', 'detr_tiny_shapes_outquant_3bit_gptq.py',
     ['--uniform-baseline']),
    ('W8A8 with activation sensitivity', 'detr_tiny_shapes_w8a8.py', []),
)


def find_config(tree: str, name: str) -> str:
    """The config called ``name`` anywhere under ``tree/configs``."""
    for folder, _, files in os.walk(osp.join(tree, 'configs')):
        if name in files:
            return osp.relpath(osp.join(folder, name), tree)
    raise SystemExit(f'error: no config {name!r} under {tree}/configs')


def ensure_worktree(ref: str, path: str) -> str:
    """A worktree of ``ref`` at ``path`` with this tree's data."""
    if not osp.isdir(path):
        subprocess.run(['git', '-C', ROOT, 'worktree', 'add', '--detach',
                        path, ref], check=True)
    data = osp.join(path, 'data')
    if not osp.exists(data):
        os.symlink(osp.join(ROOT, 'data'), data)
    return path


def sha256(path: str) -> Optional[str]:
    if not osp.isfile(path):
        return None
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def plan_bits(path: str) -> Dict[str, Optional[int]]:
    """Bits by weight from a plan file of either release."""
    with open(path) as f:
        plan = json.load(f)
    return {n: e['bits'] if isinstance(e, dict) else e
            for n, e in plan.items()}


def run_case(tree: str, config: str, extra: List[str],
             work_dir: str) -> dict:
    """``tools/ptq.py`` in ``tree``; its mAPs, plan bits and packed file
    hashes."""
    env = dict(os.environ, PYTHONPATH=tree)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, 'tools/ptq.py', config, '--work-dir', work_dir]
        + extra, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise SystemExit(f'error: {config} failed in {tree}:\n{tail}')
    with open(osp.join(work_dir, 'ptq_results.json')) as f:
        results = json.load(f)
    out = dict(seconds=round(time.time() - start, 1), mAP={}, plans={},
               packed={})
    for run, res in results.items():
        out['mAP'][run] = res['metrics'].get('coco/bbox_mAP')
        folder = osp.join(work_dir, {'quantized': '', 'uniform':
                                     'uniform_baseline'}.get(run, 'x'),
                          'hawq')
        if osp.isfile(osp.join(folder, 'plan.json')):
            out['plans'][run] = plan_bits(osp.join(folder, 'plan.json'))
            out['packed'][run] = sha256(osp.join(folder, 'packed.pth'))
            ranges = osp.join(folder, 'activations.json')
            if osp.isfile(ranges):  # the activation ranges, with W8A8
                out['packed'][run + ' ranges'] = sha256(ranges)
    return out


#: The cells of a Table 1 row that must not move.
CELLS = ('precision', 'label', 'estimator', 'mAP', 'avg_bits', 'packed_mib')


def compare_tables(old: str, new: str) -> int:
    """Rows and plans of two ``experiments/table1.py`` work dirs; 0 if the
    same."""
    rows = [json.load(open(osp.join(d, 'table1.json'))) for d in (old, new)]
    if len(rows[0]) != len(rows[1]):
        print(f'{len(rows[0])} rows against {len(rows[1])}')
        return 1
    cells = plans = 0
    for a, b in zip(*rows):
        if {k: a.get(k) for k in CELLS} != {k: b.get(k) for k in CELLS}:
            cells += 1
            print(f'row differs: {a} / {b}')
        if a.get('out') and a['out'] != 'float':
            got = [plan_bits(osp.join(d, 'rows', a['out'], 'plan.json'))
                   for d in (old, new)]
            if got[0] != got[1]:
                plans += 1
                print(f"plan differs: {a['out']}")
    print(f'{len(rows[0])} rows: {cells} with other cells ({", ".join(CELLS)}'
          f'), {plans} with another plan')
    return 0 if cells == plans == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ref', help='git ref of the release')
    p.add_argument('--ref-dir', default='/tmp/hawq_ref')
    p.add_argument('--work-dir', default='/tmp/hawq_compare')
    p.add_argument('--tables', nargs=2, metavar=('OLD', 'NEW'),
                   help='compare two experiments/table1.py work dirs instead')
    args = p.parse_args()
    if args.tables:
        return compare_tables(*args.tables)
    if not args.ref:
        raise SystemExit('error: give --ref REF (a release to compare '
                         'with) or --tables OLD NEW')
    ref_tree = ensure_worktree(args.ref, args.ref_dir)
    rows, same_all = [], True
    for name, config, extra in CASES:
        got = {}
        for label, tree in (('release', ref_tree), ('this tree', ROOT)):
            work = osp.join(args.work_dir, name.replace(' ', '_'),
                            label.replace(' ', '_'))
            got[label] = run_case(tree, find_config(tree, config), extra,
                                  work)
        old, new = got['release'], got['this tree']
        same = dict(mAP=old['mAP'] == new['mAP'],
                    plans=old['plans'] == new['plans'],
                    packed=old['packed'] == new['packed']
                    and all(old['packed'].values()))
        same_all &= all(same.values())
        rows.append(dict(case=name, config=config, extra=extra,
                         release=old, this_tree=new, same=same))
        maps = ', '.join(f'{k} {old["mAP"][k]:.4f} / {new["mAP"][k]:.4f}'
                         for k in old['mAP'])
        print(f'{name}: mAP (release / this tree) {maps}; plans '
              f'{"same" if same["plans"] else "DIFFER"}; packed files '
              f'{"byte-identical" if same["packed"] else "DIFFER"}; '
              f'{old["seconds"]} s / {new["seconds"]} s', flush=True)
    write_json(osp.join(args.work_dir, 'compare_release.json'),
               dict(ref=args.ref, rows=rows))
    print('all cases the same' if same_all else 'SOME CASES DIFFER')
    return 0 if same_all else 1


if __name__ == '__main__':
    sys.exit(main())
