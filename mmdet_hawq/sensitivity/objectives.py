"""The three sensitivity objectives, built from an mmdet DETR model.

* :class:`DetrLossObjective` — the DETR training loss (Hungarian matching to
  the ground truth), for Loss Sensitivity.
* :class:`DistillationObjective` — the paper's multi-layer distillation loss
  (Eq. 5) between the student and a frozen float teacher, for Output
  Sensitivity Float (student = float weights) and Quant (student = 8-bit
  weights)::

      Σ_layers mean_{images, queries} [ λ_KL · KL(softmax(p_s/T) ‖
                                        softmax(p_t/T)) + ||b_s − b_t||_1 ]

  Queries are matched by index (no Hungarian matching); every decoder layer's
  output goes through the shared head.

Batches are indices into preprocessed calibration batches; each objective's
``loss(i)`` returns batch ``i``'s share of the calibration-set loss, so the
sum over batches is the loss on the whole set (what the estimators need).
"""
import sys
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .gauss_newton import softmax_fisher_draw

Batch = Dict  # {'inputs': Tensor (B, 3, H, W), 'data_samples': [DetDataSample]}


@contextmanager
def hessian_mode(model: nn.Module,
                 params: Dict[str, nn.Parameter]) -> Iterator[None]:
    """Eval mode, gradients on ``params`` only, math attention kernel.

    mmdet's ResNet re-freezes stages in ``train()``, so ``requires_grad`` is
    set explicitly after ``eval()``; fused attention kernels have no double
    backward, so the math SDPA kernel is forced. Everything is restored on
    exit.

    Args:
        model (nn.Module): The student.
        params (dict): Weights that gradients are taken for.
    """
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    targeted = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in targeted)
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def detr_outputs(model: nn.Module,
                 batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class logits and boxes of every decoder layer.

    Args:
        model (nn.Module): An mmdet ``DETR`` (or a detector with the same
            ``extract_feat`` / ``forward_transformer`` / ``bbox_head``).
        batch (dict): Preprocessed ``inputs`` and ``data_samples``.

    Returns:
        tuple: logits (L, B, Q, C+1) and normalised (cx, cy, w, h) boxes
        (L, B, Q, 4), L = number of decoder layers.
    """
    feats = model.extract_feat(batch['inputs'])
    head_inputs = model.forward_transformer(feats, batch['data_samples'])
    cls, box = model.bbox_head(**head_inputs)
    return cls, box


def preprocess_batches(model: nn.Module, loader) -> List[Batch]:
    """Run the model's data preprocessor over a dataloader, once."""
    batches = []
    with torch.no_grad():
        for data in loader:
            batches.append(model.data_preprocessor(data, training=False))
    return batches


class DistillationObjective:
    """The multi-layer distillation loss of a student against a teacher.

    The teacher's outputs of a batch are computed once, when the batch is
    first used (a process of a distributed run computes only its share), by
    the same code path as the student's (gradients enabled, same attention
    kernel), so that a student equal to its teacher gets the teacher's
    outputs bit for bit and the loss is exactly 0.0.

    Args:
        student (nn.Module): The model differentiated (its weights are the
            float ones or the 8-bit ones).
        teacher (nn.Module): The frozen float model.
        batches (Sequence[Batch]): Preprocessed calibration batches.
        params (dict): The targeted weights of ``student``.
        lambda_kl (float): Weight of the KL term. Defaults to 0.05.
        temperature (float): Softmax temperature. Defaults to 6.0.
        layers (Sequence[int], optional): Decoder layers used (indices into
            L, negative allowed). Defaults to None (all).
    """

    def __init__(self,
                 student: nn.Module,
                 teacher: nn.Module,
                 batches: Sequence[Batch],
                 params: Dict[str, nn.Parameter],
                 lambda_kl: float = 0.05,
                 temperature: float = 6.0,
                 layers: Optional[Sequence[int]] = None) -> None:
        self.student = student
        self.batches = list(batches)
        self.lambda_kl = float(lambda_kl)
        self.temperature = float(temperature)
        self.layers = None if layers is None else list(layers)
        self.num_images = sum(b['inputs'].shape[0] for b in self.batches)
        self.teacher = teacher
        self._teacher_params = {
            n: p for n, p in teacher.named_parameters() if n in params
        }
        self._targets: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def target(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (logits, boxes) of batch ``index`` (cached)."""
        if index not in self._targets:
            with hessian_mode(self.teacher, self._teacher_params):
                cls, box = self._select(
                    *detr_outputs(self.teacher, self.batches[index]))
            self._targets[index] = (cls.detach(), box.detach())
        return self._targets[index]

    def _select(self, cls: torch.Tensor,
                box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.layers is None:
            return cls, box
        return cls[self.layers], box[self.layers]

    def _norm(self, cls: torch.Tensor) -> float:
        # mean over all calibration images and queries of each layer
        return 1.0 / (self.num_images * cls.shape[2])

    def loss(self, index: int) -> torch.Tensor:
        """Batch ``index``'s share of the calibration-set distillation loss.
        """
        cls, box = self._select(*detr_outputs(self.student,
                                              self.batches[index]))
        t_cls, t_box = self.target(index)
        T = self.temperature
        log_s = F.log_softmax(cls / T, dim=-1)
        log_t = F.log_softmax(t_cls / T, dim=-1)
        kl = (log_s.exp() * (log_s - log_t)).sum()
        l1 = (box - t_box).abs().sum()
        return (self.lambda_kl * kl + l1) * self._norm(cls)

    def gauss_newton_sample(self, index: int,
                            generator: torch.Generator) -> torch.Tensor:
        """``s = Σ u·z`` with ``E[uuᵀ]`` = the KL term's output Hessian at
        the student's softmax (the L1 term has no curvature; at the 8-bit
        student the residual terms are omitted)."""
        cls, _ = self._select(*detr_outputs(self.student,
                                            self.batches[index]))
        u = softmax_fisher_draw(cls, self.temperature,
                                self.lambda_kl * self._norm(cls), generator)
        return (u * cls).sum()


@contextmanager
def local_normalisers(head: nn.Module) -> Iterator[None]:
    """Normalise a batch's DETR loss by that batch alone.

    In a distributed run mmdet's DETR heads average their normalisers (the
    number of boxes) over the ranks with ``reduce_mean``, an all-reduce
    inside the loss. The loss of a calibration batch — and its Hessian —
    must not depend on which batches the other ranks hold (nor may a rank
    with fewer batches leave the others waiting), so ``reduce_mean`` is the
    identity here, as it is in one process.

    Args:
        head (nn.Module): The detector's ``bbox_head``.
    """
    modules = {sys.modules[c.__module__] for c in type(head).__mro__}
    modules = [m for m in modules if hasattr(m, 'reduce_mean')]
    saved = [m.reduce_mean for m in modules]
    try:
        for m in modules:
            m.reduce_mean = _identity
        yield
    finally:
        for m, fn in zip(modules, saved):
            m.reduce_mean = fn


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class DetrLossObjective:
    """The DETR training loss (Hungarian matching), summed over its terms.

    Args:
        model (nn.Module): The detector (eval mode: no dropout).
        batches (Sequence[Batch]): Preprocessed batches with ground truth.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch]) -> None:
        self.model = model
        self.batches = list(batches)
        self.num_images = sum(b['inputs'].shape[0] for b in self.batches)

    def loss(self, index: int) -> torch.Tensor:
        """Batch ``index``'s loss weighted by its share of the images."""
        batch = self.batches[index]
        with local_normalisers(self.model.bbox_head):
            losses = self.model.loss(batch['inputs'], batch['data_samples'])
        total = sum(v for k, v in losses.items() if 'loss' in k)
        return total * (batch['inputs'].shape[0] / self.num_images)
