"""What the deployment tools share: a detector and its packed weights from a
config and a checkpoint, the exported input size, the test images, and the
COCO metrics of an exported model on a runtime (:func:`evaluate_exported`).

The tools (``export_onnx.py``, ``evaluate_onnx.py``, ``benchmark_deploy.py``)
go through these, so a checkpoint is checked as strictly as for
``tools/ptq.py`` (:func:`~mmdet_hawq.engine.detector.build_detector`).
"""
import copy
import os.path as osp
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping,
                    Optional, Sequence, Tuple)

import numpy as np
import torch
import torch.nn as nn

from ..errors import HawqUserError
from ..quant.packing import is_packed
from .checkpoint import load_checkpoint_file
from .cli import check_checkpoint

__all__ = [
    'benchmark_inputs', 'build_packed_detector', 'coco_metrics',
    'default_input_shape', 'ptq_run_files',
    'evaluate_exported', 'evaluate_map', 'load_for_export', 'quantize_w8a8',
    'random_images', 'test_images', 'test_loader'
]

#: What runs one image: (1, 3, H, W) float32 → scores (L, 1, Q, C) and
#: normalised boxes (L, 1, Q, 4).
Outputs = Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]


def load_for_export(cfg: Any, checkpoint: str
                    ) -> Tuple[nn.Module, Optional[Mapping[str, Mapping]]]:
    """The detector with the checkpoint's weights, and its packed weights.

    Args:
        cfg (mmengine.Config): The detector's config.
        checkpoint (str): A float checkpoint or a packed low-bit one.

    Returns:
        tuple: The detector in eval mode (a packed file's weights
        dequantized: the fake-quantized model), and the packed file's
        ``packed`` entries (None for a float checkpoint).

    Raises:
        HawqUserError: The file is missing or does not fit the model.
    """
    from mmdet.utils import register_all_modules

    from .detector import build_detector
    check_checkpoint(checkpoint, urls=False)
    register_all_modules()
    model = build_detector(cfg, checkpoint)
    raw = load_checkpoint_file(checkpoint)
    return model, (raw['packed'] if is_packed(raw) else None)


def build_packed_detector(cfg: Any, checkpoint: str) -> nn.Module:
    """The detector with a packed file's weights kept packed.

    Args:
        cfg (mmengine.Config): The detector's config.
        checkpoint (str): A packed low-bit checkpoint.

    Returns:
        nn.Module: The detector in eval mode; each quantized weight is a
        :class:`~mmdet_hawq.deploy.packed_weights.PackedWeight`.

    Raises:
        HawqUserError: The file is missing, not packed or does not fit.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from ..deploy.packed_weights import load_packed
    check_checkpoint(checkpoint, urls=False)
    register_all_modules()
    model = MODELS.build(copy.deepcopy(cfg.model))
    return load_packed(model, load_checkpoint_file(checkpoint),
                       keep_packed=True, source=checkpoint)


def default_input_shape(cfg: Any,
                        given: Optional[Sequence[int]] = None
                        ) -> Tuple[int, int]:
    """``(H, W)`` of the exported input: ``given``, or the test pipeline's
    fixed output size.

    Args:
        cfg (mmengine.Config): The detector's config.
        given (Sequence[int], optional): ``--shape H W``. Defaults to None.

    Returns:
        tuple[int, int]: ``(H, W)``.

    Raises:
        HawqUserError: ``given`` is not two positive integers, or the
            pipeline's output size is not fixed and none was given.
    """
    if given is not None:
        if len(given) != 2 or min(given) < 1:
            raise HawqUserError(
                f'--shape {list(given)} is not a size: pass two positive '
                'integers H W')
        return int(given[0]), int(given[1])
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get(
        'pipeline', [])
    for step in pipeline:
        if step.get('type') == 'Resize' and 'scale' in step:
            w, h = step['scale'] if not isinstance(step['scale'], int) \
                else (step['scale'], step['scale'])
            if not step.get('keep_ratio', False) or w == h:
                # keep_ratio into a square: square images come out this size
                return int(h), int(w)
    raise HawqUserError(
        'the test pipeline does not resize to one fixed size: pass the '
        'exported image size with --shape H W')


def test_loader(cfg: Any) -> Any:
    """The config's test dataloader.

    Args:
        cfg (mmengine.Config): The detector's config.

    Returns:
        torch.utils.data.DataLoader: Built by mmengine's Runner.

    Raises:
        HawqUserError: The annotation file is missing.
    """
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    dataset = loader_cfg.get('dataset', {})
    ann = osp.join(dataset.get('data_root', ''), dataset.get('ann_file', ''))
    if dataset.get('ann_file') and not osp.isfile(ann):
        raise HawqUserError(
            f'the test annotations {ann!r} do not exist: make the data '
            '(`make data` for the shapes benchmark) or point the config\'s '
            'test_dataloader at it')
    return Runner.build_dataloader(loader_cfg)


def test_images(loader: Any,
                limit: Optional[int] = None) -> Iterator[Tuple[Any, Any]]:
    """The images of a test dataloader as the pipeline loads them, one at a
    time.

    Args:
        loader (DataLoader): From :func:`test_loader`.
        limit (int, optional): Stop after this many. Defaults to None (all).

    Yields:
        tuple: uint8 image (3, H, W) and its DetDataSample.
    """
    count = 0
    for batch in loader:
        for image, sample in zip(batch['inputs'], batch['data_samples']):
            if limit is not None and count >= limit:
                return
            yield image, sample
            count += 1


def _evaluator(cfg: Any, dataset: Any) -> Any:
    from mmengine.evaluator import Evaluator
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = dataset.metainfo
    return evaluator


def coco_metrics(cfg: Any, head: nn.Module, outputs: Outputs,
                 items: Iterable[Tuple[Any, Any]], count: int,
                 dataset: Any) -> Dict[str, float]:
    """The config's test evaluator (mmdet's ``CocoMetric``) over the
    detections of ``outputs`` on ``items``.

    Args:
        cfg (mmengine.Config): The detector's config.
        head (nn.Module): A detector of the config: its head's
            post-processing (``predict_by_feat``) turns the outputs into
            detections; its weights are not used.
        outputs (Callable): Runs one image (an exported model on a runtime).
        items (Iterable): ``(uint8 image (3, H, W), DetDataSample)`` pairs,
            e.g. :func:`test_images`; the samples are not modified. Only
            these images are scored.
        count (int): How many items there are.
        dataset: The dataset they come from (its ``metainfo``).

    Returns:
        dict[str, float]: The metrics, e.g. ``coco/bbox_mAP``.
    """
    from ..deploy.onnx_runtime import detections_from_outputs
    evaluator = _evaluator(cfg, dataset)
    ids = []
    for image, sample in items:
        scores, boxes = outputs(image.cpu().numpy()[None].astype(np.float32))
        evaluator.process(detections_from_outputs(
            head, scores, boxes, [copy.deepcopy(sample)]))
        ids.append(sample.img_id)
    _only_images(evaluator, ids)
    return evaluator.evaluate(count)


def _only_images(evaluator: Any, ids: Sequence[int]) -> None:
    """Score only these images (mmdet's ``CocoMetric`` otherwise counts
    every image of the annotation file, the unseen ones as misses)."""
    for metric in evaluator.metrics:
        if hasattr(metric, 'img_ids'):
            metric.img_ids = list(ids)


def evaluate_exported(cfg: Any, model_file: str,
                      runtime: str = 'onnxruntime',
                      threads: int = 1,
                      max_images: Optional[int] = None,
                      compare: Optional[str] = None,
                      **options: Any) -> Dict[str, Any]:
    """COCO metrics of an exported detector on a runtime, image by image
    (batch 1) over the config's test split, through the head's own
    post-processing and the config's test evaluator.

    Args:
        cfg (mmengine.Config): The detector's config.
        model_file (str): From ``tools/export_onnx.py`` (or an OpenVINO
            ``.xml`` of one, on OpenVINO).
        runtime (str): ``'onnxruntime'`` or ``'openvino'``. Defaults to
            ``'onnxruntime'``.
        threads (int): Threads of one inference. Defaults to 1.
        max_images (int, optional): Only the first N test images (scored
            over those images alone). Defaults to None (all).
        compare (str, optional): A checkpoint (a packed file: the
            fake-quantized model) whose PyTorch model runs on the same
            images: its metrics and the largest differences of the raw
            outputs and of the detections are added. Defaults to None.
        **options: The runtime's settings
            (:func:`~mmdet_hawq.deploy.runtimes.make_session`).

    Returns:
        dict: The metrics, ``images``, ``s_per_image`` (the runtime's time),
        ``runtime``, ``kernel_precisions`` and, with ``compare``,
        ``torch_metrics``, ``max_abs_diff`` and ``detections_max_abs_diff``.

    Raises:
        HawqUserError: A file is missing, or the model is not an exported
            detector of this input size.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from ..deploy.onnx_runtime import OnnxDetector, detections_from_outputs
    from ..models import onnx_outputs
    register_all_modules()
    model = OnnxDetector(model_file, threads, runtime, **options)
    if compare:
        torch_model = load_for_export(cfg, compare)[0]
    else:  # the head's post-processing only: no weights needed
        torch_model = MODELS.build(copy.deepcopy(cfg.model)).eval()
    loader = test_loader(cfg)
    size = len(loader.dataset)
    if max_images:
        size = min(size, max_images)
    evaluator = _evaluator(cfg, loader.dataset)
    torch_eval = _evaluator(cfg, loader.dataset) if compare else None
    diff = dict(scores=0.0, boxes=0.0)
    det = dict(scores=0.0, bboxes_px=0.0, images_other_labels=0)
    seconds = 0.0
    for image, sample in test_images(loader, size):
        ref_sample = copy.deepcopy(sample)
        start = time.perf_counter()
        scores, boxes = model(image.cpu().numpy()[None].astype(np.float32))
        seconds += time.perf_counter() - start
        ours = detections_from_outputs(torch_model, scores, boxes, [sample])
        evaluator.process(ours)
        if torch_eval is None:
            continue
        with torch.no_grad():
            data = torch_model.data_preprocessor(
                dict(inputs=[image], data_samples=[ref_sample]), False)
            t_scores, t_boxes = onnx_outputs(torch_model, data)
        for key, got, ref in (('scores', scores, t_scores),
                              ('boxes', boxes, t_boxes)):
            ref = ref.cpu().numpy()[-len(got):]
            # equal infinities (DDQ-DETR's suppressed queries) differ by 0
            diff[key] = max(diff[key], float(
                np.abs(np.where(got == ref, 0, got - ref)).max()))
        ref_dets = detections_from_outputs(torch_model, t_scores, t_boxes,
                                           data['data_samples'])
        _compare_detections(ours[0].pred_instances,
                            ref_dets[0].pred_instances, det)
        torch_eval.process(ref_dets)
    if size < len(loader.dataset):  # score the evaluated images only
        ids = [loader.dataset.get_data_info(i)['img_id']
               for i in range(size)]
        _only_images(evaluator, ids)
        if torch_eval is not None:
            _only_images(torch_eval, ids)
    record: Dict[str, Any] = dict(
        evaluator.evaluate(size), images=size, runtime=runtime,
        threads=threads, s_per_image=seconds / max(size, 1),
        kernel_precisions=model.session.kernel_precisions())
    if torch_eval is not None:
        record.update(compare=compare, torch_metrics=torch_eval.evaluate(size),
                      max_abs_diff=diff, detections_max_abs_diff=det)
    return record


def evaluate_map(cfg: Any, model_file: str, runtime: str = 'onnxruntime',
                 threads: int = 1, max_images: Optional[int] = None,
                 **options: Any) -> Dict[str, Any]:
    """:func:`evaluate_exported` as the benchmarks record it.

    Returns:
        dict: ``mAP`` (the bbox mAP), ``metrics`` (all of them), ``images``
        and ``kernel_precisions``.
    """
    record = evaluate_exported(cfg, model_file, runtime, threads, max_images,
                               **options)
    metrics = {k: v for k, v in record.items() if k.startswith('coco/')}
    key = next(k for k in metrics if k.endswith('bbox_mAP'))
    return dict(mAP=metrics[key], metrics=metrics, images=record['images'],
                kernel_precisions=record['kernel_precisions'])


def random_images(shape: Tuple[int, int], count: int,
                  seed: int) -> List[np.ndarray]:
    """``count`` uniform-noise images as the graph takes them: float32
    (1, 3, H, W), 0-255 integers."""
    rng = np.random.default_rng(seed)
    return [np.floor(rng.uniform(0, 256, (1, 3) + tuple(shape))).astype(
        np.float32) for _ in range(count)]


def quantize_w8a8(model: Any, images: List[np.ndarray]
                  ) -> Tuple[Any, Dict[str, Any]]:
    """W8A8 by ``mmdet_hawq.quantize`` on ``images`` (float32 (1, 3, H, W),
    0-255, as the exported graph takes them): every weight 8 bits per
    tensor, every activation site 8 bits with MSE ranges.

    Returns:
        tuple: The packed weights (``packed`` of a packed checkpoint) and
        the activation ranges; ``model`` keeps its fake-quantized weights.
    """
    from mmdet.structures import DetDataSample

    from ..api import Calibration, QuantSettings, quantize
    from ..quant import pack_state_dict
    batches = []
    for image in images:
        h, w = image.shape[2:]
        sample = DetDataSample(metainfo=dict(
            img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        with torch.no_grad():
            batches.append(model.data_preprocessor(dict(
                inputs=[torch.from_numpy(image[0]).to(torch.uint8)],
                data_samples=[sample]), False))
    settings = QuantSettings(metric='uniform', bits=8,
                             activations=dict(method='mse'))
    result = quantize(model, Calibration(batches, list(range(len(batches))),
                                         []), settings)
    return pack_state_dict(model, result.quantized,
                           result.plan)['packed'], result.activations


def ptq_run_files(folder: str, names: Sequence[str],
                  needs: str = 'the activations setting') -> List[str]:
    """The files of a ``tools/ptq.py`` run's ``hawq/`` folder.

    Args:
        folder (str): The run's work dir.
        names (Sequence[str]): File names in its ``hawq/``.
        needs (str): What the run must have had, for the error line.

    Returns:
        list[str]: Their paths, in order.

    Raises:
        HawqUserError: One of them does not exist.
    """
    files = [osp.join(folder, 'hawq', n) for n in names]
    missing = [f for f in files if not osp.isfile(f)]
    if missing:
        raise HawqUserError(
            f'--run {folder}: {missing[0]!r} does not exist: pass the work '
            f'dir of a tools/ptq.py run with {needs}')
    return files


def benchmark_inputs(cfg: Any, checkpoint: Optional[str],
                     shape: Tuple[int, int], calib_count: Optional[int],
                     timed_count: int
                     ) -> Tuple[nn.Module, List[np.ndarray],
                                List[np.ndarray]]:
    """What a deployment benchmark runs: the detector, its calibration
    images and its timed images, as the exported graph takes them.

    Args:
        cfg (mmengine.Config): The detector's config.
        checkpoint (str, optional): A float checkpoint; None: the config's
            model with its initial weights (seeded), calibrated and timed
            on uniform noise (timing only).
        shape (tuple[int, int]): ``(H, W)`` of the export.
        calib_count (int, optional): Calibration images (default: the
            project's 100 train images; 4 noise images without a
            checkpoint).
        timed_count (int): Timed images (the first test images, or noise).

    Returns:
        tuple: The detector (eval mode), the calibration images and the
        timed images, each float32 (1, 3, H, W), 0-255.
    """
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from ..api import CalibrationSettings
    from .calibration import calibration_images
    register_all_modules()
    torch.manual_seed(0)
    if checkpoint is None:
        model = MODELS.build(cfg.model)
        model.init_weights()
        return (model.eval(), random_images(shape, calib_count or 4, 0),
                random_images(shape, timed_count, 1))
    model = load_for_export(cfg, checkpoint)[0]
    default = CalibrationSettings()
    calib = calibration_images(cfg, calib_count or default.num_images,
                               default.seed, shape)
    timed = [img.cpu().numpy().astype(np.float32)[None] for img, _ in
             test_images(test_loader(cfg), timed_count)]
    return model, calib, timed


def _compare_detections(ours: Any, ref: Any, diff: Dict[str, Any]) -> None:
    """Update ``diff`` with the largest score and box differences of two
    images' detections (same labels in the same order), else count the
    image."""
    if not torch.equal(ours.labels, ref.labels):
        diff['images_other_labels'] += 1
        return
    if len(ref.labels):
        diff['scores'] = max(diff['scores'], float(
            (ours.scores - ref.scores).abs().max()))
        diff['bboxes_px'] = max(diff['bboxes_px'], float(
            (ours.bboxes - ref.bboxes).abs().max()))
