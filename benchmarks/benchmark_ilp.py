"""Time the ILP on a DETR-R50-sized layer set (random sensitivities).

Example:
    python benchmarks/benchmark_ilp.py --layers 130 --repeats 5
"""
import argparse
import statistics
import sys
import time

import numpy as np

from mmdet_hawq.allocation import solve_allocation


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--layers', type=int, default=130)
    p.add_argument('--bits', type=int, nargs='+', default=[3, 4, 5, 6])
    p.add_argument('--target', type=float, default=5.0)
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args()
    rng = np.random.RandomState(0)
    names = [f'l{i}' for i in range(args.layers)]
    sens = {n: float(rng.lognormal(0, 2)) for n in names}
    numels = {n: int(rng.randint(1000, 2_400_000)) for n in names}
    errors = {n: {b: float(rng.uniform(0.5, 1.5) * numels[n] * 4.0**-b)
                  for b in args.bits} for n in names}
    times, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        a = solve_allocation(sens, errors, numels, args.target, args.bits)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    # CPU time as well: on a loaded machine the wall time mostly waits
    print(f'{args.layers} layers x {len(args.bits)} bit-widths, target '
          f'{args.target}: median {statistics.median(times) * 1000:.1f} ms '
          f'(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; CPU '
          f'median {statistics.median(cpu) * 1000:.1f} ms) over '
          f'{args.repeats} solves; avg bits {a.avg_bits:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
