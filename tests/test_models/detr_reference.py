"""Runs the original facebookresearch DETR code (PyPI ``detr==0.1.4``) for
the tests; it is started with the reference venv's python (``make
detr-reference``), never imported by pytest.

The reference venv holds torch, torchvision and the ``detr`` package, whose
top-level packages are ``models``, ``util`` and ``datasets``. Two shims,
applied before its modules load, and nothing else:

* ``util/misc.py`` reads ``float(torchvision.__version__[:3]) < 0.7``, true
  for torchvision 0.29 ("0.2"), and then imports two helpers that torchvision
  removed long ago. They are only used by ``util.misc.interpolate`` on empty
  tensors, which detection inference never calls; placeholders that raise are
  put in their place.
* ``models/backbone.py`` builds torchvision's ResNet-50 with
  ``pretrained=is_main_process()``, which would download ImageNet weights;
  it gets ``False`` (every weight is set here and saved).

Commands:
    ``keys OUT.json``: the official model's state-dict names and shapes, and
    torchvision's COCO category names by id.
    ``run DIR --seed N``: reads ``DIR/images.pt`` (batches: lists of uint8
    RGB images (H, W, 3)), builds the official DETR-R50 with random weights,
    writes them as an official checkpoint ``DIR/official.pth`` (``{'model':
    state}``) and the outputs of each batch, padded, to ``DIR/outputs.pt``.
"""
import argparse
import json

import torch
import torchvision
import torchvision.ops.misc


def _removed(*args, **kwargs):
    raise RuntimeError('removed from torchvision; not used by DETR inference')


torchvision.ops._new_empty_tensor = _removed
torchvision.ops.misc._output_size = _removed

import models.backbone  # noqa: E402  (after the shim)
import datasets.transforms as T  # noqa: E402
from models.detr import build  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

models.backbone.is_main_process = lambda: False

#: main.py's defaults (the DETR-R50 of the paper), on the CPU.
ARGS = dict(
    lr_backbone=1e-5, frozen_weights=None, backbone='resnet50',
    dilation=False, position_embedding='sine', enc_layers=6, dec_layers=6,
    dim_feedforward=2048, hidden_dim=256, dropout=0.1, nheads=8,
    num_queries=100, pre_norm=False, masks=False, aux_loss=True,
    set_cost_class=1, set_cost_bbox=5, set_cost_giou=2, mask_loss_coef=1,
    dice_loss_coef=1, bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1,
    dataset_file='coco', device='cpu')


def build_official():
    """The official DETR-R50 model and its ``PostProcess``, in eval mode."""
    model, _, post = build(argparse.Namespace(**ARGS))
    return model.eval(), post['bbox']


def normalize(image: torch.Tensor) -> torch.Tensor:
    """The official test transform without resizing: uint8 RGB (H, W, 3) ->
    float (3, H, W), ImageNet mean and std."""
    to_tensor = T.ToTensor()
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    img, _ = to_tensor(image.numpy(), None)
    img, _ = norm(img, None)
    return img


def unused_coco_ids() -> list:
    """Ids 0..90 that are no COCO category, from torchvision's names."""
    from torchvision.models._meta import _COCO_CATEGORIES
    return [i for i, name in enumerate(_COCO_CATEGORIES)
            if name in ('N/A', '__background__')]


def randomize_(model, samples, gen: torch.Generator) -> None:
    """Random weights with sane activations, in place.

    The frozen batch norms start as identities; each gets the mean and
    variance of its input on ``samples`` (a trained network's statistics
    describe its data) times a random factor, and a random affine part. The
    11 class rows of ids COCO does not use get a logit of -1e4, as in a
    trained model, so that the softmax over 92 rows equals mmdet's over 81.
    """
    def calibrate(module, inputs):
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3))
        n = mean.numel()
        module.running_mean.copy_(mean + 0.1 * var.sqrt() *
                                  torch.randn(n, generator=gen))
        module.running_var.copy_(var * (0.5 + torch.rand(n, generator=gen)))
        module.weight.copy_(0.5 + torch.rand(n, generator=gen))
        module.bias.copy_(0.2 * torch.randn(n, generator=gen))

    bns = [m for m in model.modules()
           if type(m).__name__ == 'FrozenBatchNorm2d']
    handles = [m.register_forward_pre_hook(calibrate) for m in bns]
    with torch.no_grad():
        model.backbone(samples)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for p in (model.query_embed.weight, model.input_proj.bias):
            p.normal_(generator=gen)
        for name, p in model.transformer.named_parameters():
            if p.dim() == 1:  # biases and norms: not zeros and ones
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        unused = unused_coco_ids()
        model.class_embed.weight[unused] = 0
        model.class_embed.bias[unused] = -1e4


def infer(model, post, images) -> dict:
    """One padded batch: logits (6, B, 100, 92) and boxes (6, B, 100, 4) of
    every decoder layer, and ``PostProcess`` results at the image sizes."""
    samples = nested_tensor_from_tensor_list([normalize(i) for i in images])
    with torch.no_grad():
        out = model(samples)
        sizes = torch.tensor([list(i.shape[:2]) for i in images])
        results = post(out, sizes)
    layers = [*out['aux_outputs'], out]
    return dict(logits=torch.stack([o['pred_logits'] for o in layers]),
                boxes=torch.stack([o['pred_boxes'] for o in layers]),
                results=results)


def run(out_dir: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batches = torch.load(f'{out_dir}/images.pt')
    model, post = build_official()
    randomize_(model, nested_tensor_from_tensor_list(
        [normalize(i) for i in batches[0]]), gen)
    torch.save({'model': model.state_dict()}, f'{out_dir}/official.pth')
    torch.save([infer(model, post, b) for b in batches],
               f'{out_dir}/outputs.pt')


def keys(out: str) -> None:
    from importlib.metadata import version
    from torchvision.models._meta import _COCO_CATEGORIES
    model, _ = build_official()
    head = dict(
        made_by='.venv-detr-ref/bin/python tests/test_models/'
        'detr_reference.py keys OUT.json (after make detr-reference)',
        detr=version('detr'), torch=torch.__version__,
        torchvision=torchvision.__version__, args=ARGS,
        coco_categories=list(_COCO_CATEGORIES))
    lines = [f' {json.dumps(k)}: {json.dumps(v)},' for k, v in head.items()]
    shapes = [f'  {json.dumps(k)}: {json.dumps(list(v.shape))}'
              for k, v in model.state_dict().items()]
    with open(out, 'w') as f:
        f.write('{\n' + '\n'.join(lines) + '\n "state_dict": {\n' +
                ',\n'.join(shapes) + '\n }\n}\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('keys')
    p.add_argument('out')
    p = sub.add_parser('run')
    p.add_argument('dir')
    p.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    if args.cmd == 'keys':
        keys(args.out)
    else:
        run(args.dir, args.seed)


if __name__ == '__main__':
    main()
