"""OpenVINO's per-layer performance counters of exported models: the time
of one image per executed layer type and precision, and each type's share
(where the time goes once the integer kernels run: the Amdahl bound).

Example:
    python benchmarks/profile_openvino.py \\
        work_dirs/runtimes/dino_r50/ours.onnx \\
        work_dirs/runtimes/dino_r50/fp32.onnx --precision default \\
        --out results/runtimes/dino_r50_openvino_profile.json
"""
import warnings

warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                        category=UserWarning)

import argparse  # noqa: E402
import sys  # noqa: E402

from mmdet_hawq.engine.cli import write_json  # noqa: E402
from mmdet_hawq.errors import HawqUserError, run_cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='+', help='.onnx or .xml files')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--precision', choices=['f32', 'bf16', 'default'],
                        default='default',
                        help="float layers' precision (default: OpenVINO's)")
    parser.add_argument('--top', type=int, default=12)
    parser.add_argument('--out', help='JSON file for the profiles')
    args = parser.parse_args()
    if args.threads < 1 or args.top < 1:
        raise HawqUserError('--threads and --top take positive integers')
    import numpy as np

    from mmdet_hawq.deploy.runtimes import make_session
    record = dict(threads=args.threads, precision=args.precision,
                  command='python benchmarks/profile_openvino.py ' +
                  ' '.join(sys.argv[1:]), models={})
    for path in args.models:
        session = make_session(
            path, 'openvino', args.threads, perf_count=True,
            precision=None if args.precision == 'default'
            else args.precision)
        image = np.random.default_rng(1).uniform(
            0, 255, session.input_shape).astype(np.float32)
        times = session.profile(image)
        total = sum(times.values())
        record['models'][path] = dict(total_ms=total, ms=times)
        print(f'{path}: {total:.0f} ms of layer time')
        for key, ms in list(times.items())[:args.top]:
            print(f'  {key:45s} {ms:9.1f} ms  {ms / total:6.1%}')
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == '__main__':
    run_cli(main)
