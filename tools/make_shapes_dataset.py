"""Generate the synthetic COCO-format shapes benchmark.

Example:
    python tools/make_shapes_dataset.py --out-dir data/shapes
"""
import argparse
import sys

from mmdet_hawq.datasets import ShapesSpec, generate_shapes_dataset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default='data/shapes')
    parser.add_argument('--num-train', type=int, default=3000)
    parser.add_argument('--num-val', type=int, default=500)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--image-size', type=int,
                        default=ShapesSpec.image_size)
    parser.add_argument('--max-objects', type=int,
                        default=ShapesSpec.max_objects)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    spec = ShapesSpec(image_size=args.image_size, max_objects=args.max_objects)
    files = generate_shapes_dataset(args.out_dir, args.num_train,
                                    args.num_val, args.seed, spec)
    for split, path in files.items():
        print(f'{split}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
