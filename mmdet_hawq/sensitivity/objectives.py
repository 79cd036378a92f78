"""The three sensitivity objectives, built from an mmdet DETR-family model.

* :class:`DetrLossObjective` — the detector's training loss (Hungarian
  matching to the ground truth), for Loss Sensitivity.
* :class:`DistillationObjective` — the paper's multi-layer distillation loss
  (Eq. 5) between the student and a frozen float teacher, for Output
  Sensitivity Float (student = float weights) and Quant (student = 8-bit
  weights)::

      Σ_layers mean_{images, queries} [ λ_KL · KL_T(p_s ‖ p_t)
                                        + ||b_s − b_t||_1 ]

  with the paper's softmax KL at temperature T for a softmax head, and for a
  sigmoid (focal) head the per-class Bernoulli KL between ``σ(z_s/T)`` and
  ``σ(z_t/T)``, summed over classes. Queries are matched by index (no
  Hungarian matching); every decoder layer's output goes through the head.
  With ``critical`` classes the KL term covers those classes only
  (:mod:`.class_head`); the box term is unchanged.

Batches are indices into preprocessed calibration batches; each objective's
``loss(i)`` returns batch ``i``'s share of the calibration-set loss, so the
sum over batches is the loss on the whole set (what the estimators need).
A loss or an output that is not finite stops the run with one
:class:`~mmdet_hawq.errors.HawqUserError` line naming the batch and its
images (one ``isfinite`` check per batch and evaluation).
The detector-specific parts (how to get the outputs, the class activation,
whether the loss needs the detector's training flag, the head and which
training flags the loss reads) come from the model's family adapter
(:mod:`mmdet_hawq.models.adapters`), through the constructors' arguments or
:func:`~mmdet_hawq.models.detector_family`; the class head's math from
:mod:`.class_head`.
"""
import os.path as osp
import sys
from contextlib import contextmanager, nullcontext
from typing import (Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple, Union)

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import HawqUserError, short_list
from ..models.family import (decoder_outputs, detector_family, same_queries,
                             shares_queries)
from .class_head import (ACTIVATIONS, check_columns, fisher_draw,
                         temperature_kl)

Batch = Dict  # {'inputs': Tensor (B, 3, H, W), 'data_samples': [...]}
Group = Tuple[torch.Tensor, torch.Tensor]  # scores (L, B, Q, C), boxes
#: ``(model, batch) → (scores, boxes)``, or a list of such groups
OutputsFn = Callable[[nn.Module, Batch], Union[Group, Sequence[Group]]]
#: What to do about a loss or outputs that are not finite on a batch.
NONFINITE_FIX = (
    'check that the checkpoint fits the config and does not come from a '
    'diverged training run (finite weights can still overflow), and that '
    "these images are intact, or calibrate on other images (the hook's "
    'calibration.dataset)')
#: The same for the detector's loss, which also reads the annotations.
DETECTOR_LOSS_FIX = (
    "check these images' annotations (boxes of zero or negative size), that "
    'the checkpoint fits the config and does not come from a diverged '
    'training run (finite weights can still overflow), and that the images '
    "are intact, or calibrate on other images (the hook's "
    'calibration.dataset)')


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


def preprocess_batches(model: nn.Module, loader) -> List[Batch]:
    """Run the model's data preprocessor over a dataloader, once."""
    batches = []
    with torch.no_grad():
        for data in loader:
            batches.append(model.data_preprocessor(data, training=False))
    return batches


def batch_images(batch: Batch) -> List[str]:
    """File names of a batch's images, as far as its data samples say.

    Args:
        batch (dict): A preprocessed batch; its ``data_samples`` may carry
            ``img_path`` in their metainfo.

    Returns:
        list[str]: Base names of the images that have a path.
    """
    names = []
    for sample in batch.get('data_samples') or []:
        path = getattr(sample, 'metainfo', {}).get('img_path')
        if path:
            names.append(osp.basename(str(path)))
    return names


def check_batch_finite(values: Sequence[torch.Tensor], what: str,
                       batches: Sequence[Batch], index: int,
                       fix: str = NONFINITE_FIX) -> None:
    """Stop with one line when a batch's loss or outputs are not finite.

    One ``isfinite`` reduction per tensor and one device-to-host copy.

    Args:
        values (Sequence[Tensor]): A loss (one scalar) or outputs.
        what (str): What they are, e.g. ``'the distillation loss'`` or
            ``"the float teacher's outputs"``.
        batches (Sequence[Batch]): All calibration batches.
        index (int): The batch's index in ``batches``.
        fix (str): The likely fix. Defaults to :data:`NONFINITE_FIX`.

    Raises:
        HawqUserError: A value is NaN or Inf; the message names the batch
            (1-based), its images and the fix.
    """
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values])
    if bool(finite.all()):
        return
    if len(values) == 1 and values[0].numel() == 1:
        state = f'{what} is {values[0].item()}'
    else:
        state = f'{what} have NaN/Inf values'
    images = batch_images(batches[index])
    where = f'calibration batch {index + 1} of {len(batches)}' + (
        f' (images {short_list(images, 4)})' if images else '')
    raise HawqUserError(f'{state} on {where}: {fix}')


class DistillationObjective:
    """The multi-layer distillation loss of a student against a teacher.

    The teacher's outputs of a batch are computed once, when the batch is
    first used (a process of a distributed run computes only its share), by
    the same code path as the student's (gradients enabled, same attention
    kernel), so that a student equal to its teacher gets the teacher's
    outputs bit for bit and the loss is exactly 0.0. In a two-stage model
    the student replays the teacher's query selection on the same batch
    (:func:`~mmdet_hawq.models.same_queries`): query ``q`` of both is the
    same encoder proposal, so the loss measures the damage to each query,
    not a reordering of them.

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
        activation (str): The class head's ``'softmax'`` (DETR) or
            ``'sigmoid'`` (focal heads). Defaults to 'softmax'.
        outputs (Callable, optional): ``(model, batch) → (scores (L, B, Q,
            C), boxes (L, B, Q, 4))``, or a list of such groups (e.g. the
            decoder's and the encoder proposals' of a two-stage model:
            :func:`~mmdet_hawq.models.family.distillation_outputs`); each
            group is averaged over its images and queries. Defaults to None
            (:func:`~mmdet_hawq.models.family.decoder_outputs`).
        critical (Sequence[int], optional): Column indices of the critical
            classes (``0 .. K − 1``); the KL term is restricted to them (see
            :mod:`.class_head`). Defaults to None (every class).
    """

    def __init__(self,
                 student: nn.Module,
                 teacher: nn.Module,
                 batches: Sequence[Batch],
                 params: Dict[str, nn.Parameter],
                 lambda_kl: float = 0.05,
                 temperature: float = 6.0,
                 layers: Optional[Sequence[int]] = None,
                 activation: str = 'softmax',
                 outputs: Optional[OutputsFn] = None,
                 critical: Optional[Sequence[int]] = None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f'activation must be one of {ACTIVATIONS}, '
                             f'got {activation!r}')
        self.activation = activation
        self.critical = None if critical is None else sorted(
            int(c) for c in critical)
        self.outputs = outputs or decoder_outputs
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
        self._targets: Dict[int, List[Group]] = {}
        self._selections: Dict[int, List] = {}
        self._replays = shares_queries(student)

    def _groups(self, model: nn.Module, index: int) -> List[Group]:
        """``model``'s output groups on batch ``index``; ``layers`` selects
        from the first (the decoder's). The teacher records its query
        selection; the student replays it."""
        student = model is not self.teacher
        with same_queries(model, self._selections.setdefault(index, []),
                          replay=student):
            out = self.outputs(model, self.batches[index])
        groups = [tuple(out)] if torch.is_tensor(out[0]) else \
            [tuple(g) for g in out]
        if self.layers is not None:
            cls, box = groups[0]
            groups[0] = (cls[self.layers], box[self.layers])
        if self.critical is not None:
            for cls, _ in groups:
                check_columns(self.critical, cls.shape[-1], self.activation)
        return groups

    def target(self, index: int) -> List[Group]:
        """The teacher's (logits, boxes) groups of batch ``index`` (cached).
        """
        if index not in self._targets:
            with hessian_mode(self.teacher, self._teacher_params):
                groups = self._groups(self.teacher, index)
            check_batch_finite([t for g in groups for t in g],
                               "the float teacher's outputs", self.batches,
                               index)
            self._targets[index] = [(c.detach(), b.detach())
                                    for c, b in groups]
        return self._targets[index]

    def _norm(self, cls: torch.Tensor) -> float:
        # mean over all calibration images and queries (or tokens) of each
        # layer of a group
        return 1.0 / (self.num_images * cls.shape[2])

    def loss(self, index: int) -> torch.Tensor:
        """Batch ``index``'s share of the calibration-set distillation loss.
        """
        loss, targets = 0.0, self.target(index)  # the teacher first
        for (cls, box), (t_cls, t_box) in zip(self._groups(self.student,
                                                           index), targets):
            kl = temperature_kl(cls, t_cls, self.temperature,
                                self.activation, self.critical)
            l1 = (box - t_box).abs().sum()
            loss = loss + (self.lambda_kl * kl + l1) * self._norm(cls)
        check_batch_finite((loss, ), "the student's distillation loss",
                           self.batches, index)
        return loss

    def gauss_newton_sample(self, index: int,
                            generator: torch.Generator) -> torch.Tensor:
        """``s = Σ u·z`` with ``E[uuᵀ]`` = the KL term's output Hessian at
        the student's probabilities (:func:`.class_head.fisher_draw`), over
        every group (the L1 term has no
        curvature; at the 8-bit student the residual terms are omitted)."""
        if self._replays:  # the teacher's query selection first
            self.target(index)
        groups = self._groups(self.student, index)
        check_batch_finite([t for g in groups for t in g],
                           "the student's outputs", self.batches, index)
        s = 0.0
        for cls, _ in groups:
            u = fisher_draw(cls, self.temperature,
                            self.lambda_kl * self._norm(cls), generator,
                            self.activation, self.critical)
            s = s + (u * cls).sum()
        return s


@contextmanager
def local_normalisers(losses: Sequence[nn.Module]) -> Iterator[None]:
    """Normalise a batch's DETR loss by that batch alone.

    In a distributed run mmdet's DETR heads average their normalisers (the
    number of boxes) over the ranks with ``reduce_mean``, an all-reduce
    inside the loss. The loss of a calibration batch — and its Hessian —
    must not depend on which batches the other ranks hold (nor may a rank
    with fewer batches leave the others waiting), so ``reduce_mean`` is the
    identity here, as it is in one process.

    Args:
        losses (Sequence[nn.Module]): The modules that compute the loss
            (the family adapter's ``loss_modules``: the head, ...); the
            modules defining their classes and base classes are patched.
    """
    modules = {sys.modules[c.__module__] for loss in losses
               for c in type(loss).__mro__}
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
    """The detector's training loss (Hungarian matching), summed over its
    terms.

    Random inputs of the loss (DINO's denoising queries) are drawn from a
    generator seeded by the batch index, so every evaluation of a batch's
    loss — every sample, every process — sees the same ones.

    Args:
        model (nn.Module): The detector (eval mode: no dropout).
        batches (Sequence[Batch]): Preprocessed batches with ground truth.
        training_flag (bool): Compute the loss with the ``training`` flag
            of the detector itself set, not its submodules' (and of the
            other modules its family's loss reads: the adapter's
            ``training_flag``). Defaults to False.
        seed (int): Seed of the loss's random inputs. Defaults to 0.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch],
                 training_flag: bool = False, seed: int = 0) -> None:
        self.model = model
        self.batches = list(batches)
        self.num_images = sum(b['inputs'].shape[0] for b in self.batches)
        self.training_flag = training_flag
        self.seed = int(seed)

    def loss(self, index: int) -> torch.Tensor:
        """Batch ``index``'s loss weighted by its share of the images."""
        batch = self.batches[index]
        family = detector_family(self.model)
        flag = family.training_flag(self.model) if self.training_flag \
            else nullcontext()
        device = batch['inputs'].device
        with local_normalisers(family.loss_modules(self.model)), flag, \
                torch.random.fork_rng(devices=[device] if device.type ==
                                      'cuda' else []):
            torch.manual_seed(self.seed * 1_000_003 + index)
            losses = self.model.loss(batch['inputs'], batch['data_samples'])
        # a term is a tensor, or a list of them (DDQ's per-layer dense
        # losses), as mmdet's parse_losses takes them
        total = sum(v if torch.is_tensor(v) else sum(v)
                    for k, v in losses.items() if 'loss' in k)
        total = total * (batch['inputs'].shape[0] / self.num_images)
        check_batch_finite((total, ), "the detector's loss", self.batches,
                           index, DETECTOR_LOSS_FIX)
        return total
