"""The official facebookresearch/detr checkpoint in mmdet's DETR-R50.

Names and shapes come from a key list the original code wrote
(``official_state.py``); the outputs are compared with the original code
itself (PyPI ``detr==0.1.4``), run in a venv of its own by
``detr_reference.py``: ``make detr-reference`` installs it (``make test``
does), and the comparison is skipped without it.
"""
import hashlib
import json
import os.path as osp
import subprocess

import pytest
import torch
from mmengine.runner import CheckpointLoader

from mmdet.datasets import CocoDataset
from mmdet.structures import DetDataSample
from mmdet_hawq.engine.checkpoint import prepare_state_dict
from mmdet_hawq.errors import HawqUserError
from mmdet_hawq.models import (COCO_CATEGORY_IDS, convert_official_detr,
                               is_official_detr, official_detr_state)
from ..conftest import ROOT, run_tool
from .official_state import (R50_CONFIG, build_detr_r50, official_keys,
                             random_official_state)

REF_VENV = osp.join(ROOT, '.venv-detr-ref')
RUNNER = osp.join(osp.dirname(osp.abspath(__file__)), 'detr_reference.py')
#: mmdet's fc_cls rows in the official head: the 80 ids, then no-object.
KEEP = [*COCO_CATEGORY_IDS, 91]


@pytest.fixture(scope='module')
def detr_r50():
    return build_detr_r50()


@pytest.fixture(scope='module')
def official_file(tmp_path_factory):
    """An official-format checkpoint file (``{'model': state}``)."""
    path = tmp_path_factory.mktemp('official') / 'detr-r50-random.pth'
    torch.save({'model': random_official_state()}, path)
    return str(path)


def test_converted_state_loads_strictly_with_every_tensor_in_place(detr_r50):
    state = random_official_state()
    names = list(state)
    converted = convert_official_detr(state)
    result = detr_r50.load_state_dict(converted, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    own = detr_r50.state_dict()
    assert sorted(own) == sorted(converted)
    assert all(own[k].shape == v.shape for k, v in converted.items())
    # the input is unchanged
    assert list(state) == names and state['class_embed.weight'].shape[0] == 92
    # spot checks of each renamed group
    pairs = {
        'backbone.0.body.layer4.2.bn3.running_var':
        detr_r50.backbone.layer4[2].bn3.running_var,
        'input_proj.weight': detr_r50.neck.convs[0].conv.weight,
        'transformer.encoder.layers.5.linear2.weight':
        detr_r50.encoder.layers[5].ffn.layers[1].weight,
        'transformer.decoder.layers.3.multihead_attn.in_proj_weight':
        detr_r50.decoder.layers[3].cross_attn.attn.in_proj_weight,
        'transformer.decoder.layers.0.norm3.bias':
        detr_r50.decoder.layers[0].norms[2].bias,
        'transformer.decoder.norm.weight': detr_r50.decoder.post_norm.weight,
        'query_embed.weight': detr_r50.query_embedding.weight,
        'bbox_embed.layers.2.weight': detr_r50.bbox_head.fc_reg.weight,
    }
    for name, tensor in pairs.items():
        assert torch.equal(state[name], tensor), name
    # class rows: label i is COCO id COCO_CATEGORY_IDS[i]; then no-object
    assert torch.equal(detr_r50.bbox_head.fc_cls.weight,
                       state['class_embed.weight'][KEEP])
    assert torch.equal(detr_r50.bbox_head.fc_cls.bias,
                       state['class_embed.bias'][KEEP])
    bn_counts = [v for k, v in converted.items()
                 if k.endswith('num_batches_tracked')]
    assert len(bn_counts) == 53 and all(int(v) == 0 for v in bn_counts)
    assert len(converted) == len(state) + 53


def test_coco_ids_are_mmdets_label_order():
    names = official_keys()['coco_categories']  # torchvision's, by id
    assert [names[i] for i in COCO_CATEGORY_IDS] == list(
        CocoDataset.METAINFO['classes'])
    assert sorted(COCO_CATEGORY_IDS) == list(COCO_CATEGORY_IDS)
    others = set(range(len(names))) - set(COCO_CATEGORY_IDS)
    assert {names[i] for i in others} == {'N/A', '__background__'}


def test_official_format_is_told_apart(detr_r50, build_tiny_model):
    state = random_official_state()
    assert is_official_detr(state)
    assert official_detr_state({'model': state}) is state
    assert official_detr_state(state) is state
    assert not is_official_detr(detr_r50.state_dict())
    assert not is_official_detr(build_tiny_model().state_dict())
    assert official_detr_state({'state_dict': detr_r50.state_dict()}) is None


def test_unconvertible_official_keys_are_one_clear_error():
    state = random_official_state()
    state['transformer.encoder.norm.weight'] = torch.ones(256)  # pre-norm
    with pytest.raises(HawqUserError,
                       match='transformer.encoder.norm.weight') as err:
        convert_official_detr(state)
    assert 'pre-norm' in str(err.value) and '\n' not in str(err.value)
    with pytest.raises(HawqUserError, match='class_ids reach 95'):
        convert_official_detr(random_official_state(), class_ids=(1, 95))


def sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_convert_tool_writes_a_strict_mmdet_checkpoint(official_file,
                                                       tmp_path, detr_r50):
    before = sha256(official_file)
    out = str(tmp_path / 'mmdet.pth')
    proc = run_tool('tools/convert_detr_checkpoint.py', official_file, out,
                    '--config', R50_CONFIG)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'checked against' in proc.stdout
    assert sha256(official_file) == before
    saved = torch.load(out, weights_only=True)
    assert saved['meta']['converted_from'] == 'facebookresearch/detr'
    detr_r50.load_state_dict(saved['state_dict'], strict=True)
    # refuses to overwrite its input, and non-official input
    for args, msg in (((official_file, official_file), 'is the input file'),
                      ((out, str(tmp_path / 'again.pth')),
                       'not an official facebookresearch/detr')):
        proc = run_tool('tools/convert_detr_checkpoint.py', *args)
        assert proc.returncode == 2
        line = proc.stderr.strip().splitlines()[-1]
        assert msg in line and line.startswith('error: ')
    assert sha256(official_file) == before


def mmdet_inputs(model, images):
    """mmdet's batch of RGB uint8 images (H, W, 3), as its pipeline gives
    them (BGR, (3, H, W)), through its data preprocessor (pads, masks)."""
    samples = []
    for img in images:
        sample = DetDataSample()
        shape = tuple(img.shape[:2])
        sample.set_metainfo(dict(img_shape=shape, ori_shape=shape,
                                 scale_factor=(1., 1.)))
        samples.append(sample)
    inputs = [img.flip(-1).permute(2, 0, 1).contiguous() for img in images]
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples),
                                   False)


def match_detections(mine, ref, size):
    """Pair mmdet's top-k detections of one image with the official
    per-query results (same query: same label, nearest score and box).

    Returns:
        tuple: max abs differences (scores, boxes in pixels) over the pairs.
    """
    h, w = size
    boxes = ref['boxes'].clone()  # mmdet clips to the image, DETR does not
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    labels = torch.tensor(COCO_CATEGORY_IDS)[mine.labels]
    cost = ((mine.bboxes[:, None] - boxes[None]).abs().amax(-1) / max(h, w) +
            (mine.scores[:, None] - ref['scores'][None]).abs() +
            (labels[:, None] != ref['labels'][None]).float())
    pair = cost.argmin(1)
    assert sorted(pair.tolist()) == list(range(len(ref['scores'])))
    assert torch.equal(labels, ref['labels'][pair])
    return ((mine.scores - ref['scores'][pair]).abs().max().item(),
            (mine.bboxes - boxes[pair]).abs().max().item())


def reference_or_skip() -> None:
    if not osp.isfile(osp.join(REF_VENV, '.stamp')):
        pytest.skip('the original DETR code (PyPI detr 0.1.4) is not '
                    'installed: run `make detr-reference` (make test does)')


def test_key_list_is_what_the_original_code_writes():
    reference_or_skip()  # make detr-reference wrote keys.json with it
    with open(osp.join(REF_VENV, 'keys.json')) as f:
        made = json.load(f)
    shipped = official_keys()
    assert made['state_dict'] == shipped['state_dict']
    assert made['coco_categories'] == shipped['coco_categories']


def test_outputs_match_the_original_detr(tmp_path):
    reference_or_skip()
    gen = torch.Generator().manual_seed(1)
    # two sizes in one padded batch (masks matter), and one image alone
    # (mmdet then uses no mask)
    batches = [[(200, 300), (240, 180)], [(160, 224)]]
    images = [[torch.randint(0, 256, (*s, 3), generator=gen,
                             dtype=torch.uint8) for s in b] for b in batches]
    torch.save(images, tmp_path / 'images.pt')
    proc = subprocess.run(
        [osp.join(REF_VENV, 'bin', 'python'), RUNNER, 'run', str(tmp_path),
         '--seed', '0'], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refs = torch.load(tmp_path / 'outputs.pt', weights_only=True)

    model = build_detr_r50()
    # the plugin's own path: the loader converts, the check is strict
    ckpt = CheckpointLoader.load_checkpoint(str(tmp_path / 'official.pth'))
    prepare_state_dict(model, ckpt)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    diff = {}
    for batch, sizes, ref in zip(images, batches, refs):
        data = mmdet_inputs(model, batch)
        with torch.no_grad():
            logits, boxes = model(**data, mode='tensor')  # 6 decoder layers
            preds = model(**data, mode='predict')
        assert logits.shape == (6, len(batch), 100, 81)
        probs = ref['logits'].softmax(-1)[..., KEEP]  # softmax over all 92
        found = dict(
            logits=(logits - ref['logits'][..., KEEP]).abs().max().item(),
            probabilities=(logits.softmax(-1) - probs).abs().max().item(),
            boxes=(boxes - ref['boxes']).abs().max().item())
        for pred, res, size in zip(preds, ref['results'], sizes):
            scores, pixels = match_detections(pred.pred_instances, res, size)
            found[f'scores {size}'] = scores
            found[f'pixel boxes / size {size}'] = pixels / max(size)
        for key, value in found.items():
            diff[key] = max(diff.get(key, 0), value)
    print('max abs differences vs the original DETR:', diff)
    assert max(diff.values()) <= 1e-4, diff
