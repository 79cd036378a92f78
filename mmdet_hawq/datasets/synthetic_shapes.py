"""Deterministic synthetic detection benchmark in COCO format ("shapes").

Each image holds 1 to ``max_objects`` filled shapes of ``SHAPES_CLASSES`` with
random sizes, aspect ratios and colours over a textured, noisy background.
Colour is drawn independently of class, so only shape tells classes apart.
Boxes are the exact extents of the drawn shapes, ``[x, y, w, h]`` in pixels.

The output loads through mmdet's ``CocoDataset`` with
``metainfo=dict(classes=SHAPES_CLASSES)`` and is scored by ``CocoMetric``:
category ids are ``1..K`` in the order of ``SHAPES_CLASSES``.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES_CLASSES: Tuple[str, ...] = ('ellipse', 'rectangle', 'triangle', 'cross')


@dataclass(frozen=True)
class ShapesSpec:
    """Parameters of the synthetic dataset.

    Args:
        image_size (int): Side of the square images in pixels. Defaults to 128.
        min_objects (int): Fewest objects per image. Defaults to 1.
        max_objects (int): Most objects per image. Defaults to 5.
        min_size (int): Smallest box side in pixels. Defaults to 16.
        max_size (int): Largest box side in pixels. Defaults to 56.
        max_aspect (float): Largest ratio of the long to the short box side.
            Defaults to 2.0.
        max_iou (float): Largest IoU allowed between two objects' boxes, so
            that objects overlap but none is hidden. Defaults to 0.3.
        noise_std (float): Standard deviation of the per-pixel Gaussian noise,
            in grey levels. Defaults to 12.0.
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 5
    min_size: int = 16
    max_size: int = 56
    max_aspect: float = 2.0
    max_iou: float = 0.3
    noise_std: float = 12.0


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return float(inter / (area - inter))


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """Smooth random colour field plus a coarse texture, (size, size, 3)."""
    grid = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray(grid.astype(np.uint8)).resize((size, size),
                                                      Image.BICUBIC),
        dtype=np.float32)
    cells = rng.choice([4, 8, 16])
    texture = rng.normal(0, 12, size=(size // cells, size // cells, 1))
    texture = np.kron(texture, np.ones((cells, cells, 1)))
    return smooth + texture.astype(np.float32)


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, box: np.ndarray,
                colour: Tuple[int, int, int], rng: np.random.RandomState):
    """Draw shape ``label`` filling ``box`` (x1, y1, x2, y2 inclusive)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    name = SHAPES_CLASSES[label]
    if name == 'ellipse':
        draw.ellipse([x1, y1, x2, y2], fill=colour)
    elif name == 'rectangle':
        draw.rectangle([x1, y1, x2, y2], fill=colour)
    elif name == 'triangle':
        apex = int(rng.randint(x1, x2 + 1))
        if rng.rand() < 0.5:
            pts = [(apex, y1), (x1, y2), (x2, y2)]
        else:
            pts = [(apex, y2), (x1, y1), (x2, y1)]
        draw.polygon(pts, fill=colour)
    elif name == 'cross':
        tw = max(2, (x2 - x1) // 3)
        th = max(2, (y2 - y1) // 3)
        cx = int(rng.randint(x1 + tw // 2, x2 - tw // 2 + 1))
        cy = int(rng.randint(y1 + th // 2, y2 - th // 2 + 1))
        draw.rectangle([cx - tw // 2, y1, cx - tw // 2 + tw - 1, y2],
                       fill=colour)
        draw.rectangle([x1, cy - th // 2, x2, cy - th // 2 + th - 1],
                       fill=colour)
    else:  # pragma: no cover - SHAPES_CLASSES and this switch go together
        raise ValueError(f'unknown shape {name!r}')


def render_image(spec: ShapesSpec, seed: int
                 ) -> Tuple[np.ndarray, List[np.ndarray], List[int]]:
    """Render one image.

    Args:
        spec (ShapesSpec): Dataset parameters.
        seed (int): Seed of this image alone.

    Returns:
        tuple: ``(image, boxes, labels)``: a uint8 array (H, W, 3) in RGB,
        a list of ``[x1, y1, x2, y2]`` boxes in pixels (exclusive right and
        bottom edges) and a list of 0-based labels.
    """
    rng = np.random.RandomState(seed)
    size = spec.image_size
    canvas = Image.fromarray(
        np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    n = rng.randint(spec.min_objects, spec.max_objects + 1)
    boxes: List[np.ndarray] = []
    labels: List[int] = []
    for _ in range(50 * n):
        if len(boxes) == n:
            break
        side = rng.uniform(spec.min_size, spec.max_size)
        aspect = np.exp(rng.uniform(-1, 1) * np.log(spec.max_aspect))
        w = int(np.clip(side * np.sqrt(aspect), spec.min_size, size - 2))
        h = int(np.clip(side / np.sqrt(aspect), spec.min_size, size - 2))
        x1 = rng.randint(0, size - w + 1)
        y1 = rng.randint(0, size - h + 1)
        box = np.array([x1, y1, x1 + w, y1 + h], dtype=np.float64)
        if any(_box_iou(box, b) > spec.max_iou for b in boxes):
            continue
        label = int(rng.randint(len(SHAPES_CLASSES)))
        colour = tuple(int(c) for c in rng.randint(0, 256, size=3))
        _draw_shape(draw, label, box - np.array([0, 0, 1, 1]), colour, rng)
        boxes.append(box)
        labels.append(label)
    image = np.asarray(canvas, dtype=np.float32)
    image = image + rng.normal(0, spec.noise_std, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), boxes, labels


def generate_split(out_dir: str, split: str, num_images: int, seed: int,
                   spec: ShapesSpec = ShapesSpec()) -> str:
    """Write ``num_images`` images and their COCO annotation file.

    Images go to ``out_dir/<split>/NNNNNN.png`` and annotations to
    ``out_dir/annotations/instances_<split>.json`` (sorted keys, so the same
    seed gives a byte-identical file).

    Args:
        out_dir (str): Root folder of the dataset.
        split (str): Split name, e.g. ``'train'``.
        num_images (int): Number of images.
        seed (int): Seed of the split; image ``i`` uses
            ``seed * 1_000_003 + i``.
        spec (ShapesSpec): Dataset parameters. Defaults to ``ShapesSpec()``.

    Returns:
        str: Path of the annotation file.
    """
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    root = Path(out_dir)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    for i in range(num_images):
        image, boxes, labels = render_image(spec, seed * 1_000_003 + i)
        file_name = f'{i:06d}.png'
        Image.fromarray(image).save(root / split / file_name)
        images.append(
            dict(id=i + 1, file_name=file_name, width=spec.image_size,
                 height=spec.image_size))
        for box, label in zip(boxes, labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                dict(id=len(annotations) + 1, image_id=i + 1,
                     category_id=label + 1, bbox=[x1, y1, x2 - x1, y2 - y1],
                     area=(x2 - x1) * (y2 - y1), iscrowd=0))
    coco = dict(
        info=dict(description='mmdet-hawq synthetic shapes', seed=seed,
                  spec=asdict(spec)),
        images=images,
        annotations=annotations,
        categories=[
            dict(id=k + 1, name=name, supercategory='shape')
            for k, name in enumerate(SHAPES_CLASSES)
        ])
    ann_file = root / 'annotations' / f'instances_{split}.json'
    ann_file.write_text(json.dumps(coco, sort_keys=True))
    return str(ann_file)


def generate_shapes_dataset(out_dir: str, num_train: int = 3000,
                            num_val: int = 500, seed: int = 0,
                            spec: ShapesSpec = ShapesSpec()) -> Dict[str, str]:
    """Write the train and val splits of the benchmark.

    Args:
        out_dir (str): Root folder, e.g. ``'data/shapes'``.
        num_train (int): Train images. Defaults to 3000.
        num_val (int): Val images. Defaults to 500.
        seed (int): Base seed; val uses ``seed + 1``. Defaults to 0.
        spec (ShapesSpec): Dataset parameters. Defaults to ``ShapesSpec()``.

    Returns:
        dict: Split name to annotation file path.
    """
    return {
        'train': generate_split(out_dir, 'train', num_train, seed, spec),
        'val': generate_split(out_dir, 'val', num_val, seed + 1, spec),
    }
