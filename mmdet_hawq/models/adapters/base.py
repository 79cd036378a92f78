"""The base family adapter: what every supported mmdet DETR-family detector
shares, and the hooks a family overrides.

Every detector here produces, in eval tensor mode, the class scores and boxes
of every decoder layer through one call chain (``extract_feat`` →
``forward_transformer`` → the head). What a family changes is said by its
adapter (:mod:`.detr`, :mod:`.deformable_detr`, :mod:`.ddq_detr`) and by no
other code.
"""
from contextlib import contextmanager
from typing import (Any, Callable, ContextManager, Dict, Iterator, List,
                    Mapping, Optional, Sequence, Tuple)

import torch
import torch.nn as nn

from ...errors import HawqUserError
from .queries import SelectionOp, shared_selection

Batch = Dict  # {'inputs': Tensor (B, 3, H, W), 'data_samples': [...]}
Group = Tuple[torch.Tensor, torch.Tensor]  # scores (L, B, Q, C), boxes
#: A context manager factory that swaps kernels for double backward.
KernelSwap = Callable[[], ContextManager[None]]
#: Test config name → (config, model overrides); the config is a project
#: path (``configs/...``) or one of mmdet's (``mmdet::...``).
TestConfigs = Mapping[str, Tuple[str, Dict[str, Any]]]


class DetrAdapter:
    """Facts and calls of one detector family (this base: a one-stage
    DETR-style detector whose head is ``bbox_head``).

    Attributes:
        name (str): Human-readable name, e.g. ``'DINO'``.
        detector (str): mmdet class name (subclasses match too).
        loss_needs_training_flag (bool): The detector's ``loss`` reads its
            own ``training`` flag (two-stage proposals, denoising queries).
        loss_note (str): How Loss Sen treats the family, for reports.
        test_configs (TestConfigs): The small configs the test suite builds
            (shrunk) for this family, by test name.
        double_backward_kernels (tuple): Kernel swaps the family's layers
            need for double backward (:mod:`~mmdet_hawq.sensitivity.
            double_backward`).
    """

    name: str = ''
    detector: str = ''
    loss_needs_training_flag: bool = False
    loss_note: str = ''
    test_configs: TestConfigs = {}
    double_backward_kernels: Tuple[KernelSwap, ...] = ()

    def head(self, model: nn.Module) -> nn.Module:
        """The detection head (class and box FFNs, post-processing)."""
        return model.bbox_head

    def class_activation(self, model: nn.Module) -> str:
        """``'sigmoid'`` for a per-class sigmoid/focal head (the head's
        ``loss_cls.use_sigmoid``), else ``'softmax'`` (``num_classes + 1``
        columns, the last one no-object)."""
        loss_cls = getattr(self.head(model), 'loss_cls', None)
        return 'sigmoid' if getattr(loss_cls, 'use_sigmoid', False) else \
            'softmax'

    def float_weights(self, model: nn.Module) -> Dict[int, str]:
        """``id(parameter)`` → why it stays float, for every weight the head
        owns: the final class/box FFNs, whose quantization the paper found
        catastrophic (found by identity, so a branch a decoder also holds
        under another name is still recognised)."""
        head = self.head(model)
        reason = f'final class/box FFN of the head ({type(head).__name__})'
        return {id(p): reason for p in head.parameters()}

    def default_min_bits(self, model: nn.Module) -> Dict[str, int]:
        """Weight name → fewest bits the ILP may give it (none here)."""
        return {}

    def decoder_outputs(self, model: nn.Module, batch: Batch) -> Group:
        """Class scores and boxes of every decoder layer, in eval tensor mode.

        Args:
            model (nn.Module): A detector of this family.
            batch (dict): Preprocessed ``inputs`` and ``data_samples``.

        Returns:
            tuple: scores (L, B, Q, C) — C = num_classes + 1 for a softmax
            head, num_classes for a sigmoid one — and normalised (cx, cy,
            w, h) boxes (L, B, Q, 4), L = number of decoder layers.

        Raises:
            HawqUserError: The head does not return per-layer scores and
                boxes (e.g. a decoder built without ``return_intermediate``).
        """
        feats = model.extract_feat(batch['inputs'])
        head_inputs = model.forward_transformer(feats, batch['data_samples'])
        out = self.head(model)(**head_inputs)
        ok = (isinstance(out, (tuple, list)) and len(out) >= 2
              and all(torch.is_tensor(t) and t.dim() == 4 for t in out[:2])
              and out[1].shape[-1] == 4)
        if not ok:
            shapes = [tuple(t.shape) if torch.is_tensor(t) else
                      type(t).__name__ for t in
                      (out if isinstance(out, (tuple, list)) else [out])]
            raise HawqUserError(
                f'{type(model).__name__}: its head returned {shapes} in '
                'tensor mode, not the class scores and boxes of every '
                'decoder layer (L, B, Q, C) and (L, B, Q, 4): build the '
                'decoder with return_intermediate=True')
        return out[0], out[1]

    def proposal_branches(self, model: nn.Module
                          ) -> Optional[Tuple[nn.Module, nn.Module]]:
        """The encoder proposal class and box branches (None: one-stage)."""
        return None

    def distillation_outputs(self, model: nn.Module,
                             batch: Batch) -> List[Group]:
        """Every output the distillation loss compares, in groups.

        The first group is :meth:`decoder_outputs`. A two-stage model adds
        its encoder proposals over all tokens, caught from the proposal
        branches during the same forward: class logits (1, B, N, C) and the
        box branch's offsets before the sigmoid (1, B, N, 4). Their top-k
        selection has no gradient, so without this group the weights that
        decide which tokens become queries look insensitive.

        Args:
            model (nn.Module): A detector of this family.
            batch (dict): Preprocessed ``inputs`` and ``data_samples``.

        Returns:
            list[tuple]: ``(scores, boxes)`` per group.
        """
        branches = self.proposal_branches(model)
        if branches is None:
            return [self.decoder_outputs(model, batch)]
        caught: Dict[str, torch.Tensor] = {}

        def catch(key: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any,
                     output: torch.Tensor) -> None:
                caught[key] = output.clone()  # a live tensor: a copy
            return hook

        handles = [m.register_forward_hook(catch(k))
                   for k, m in zip(('cls', 'box'), branches)]
        try:
            groups = [self.decoder_outputs(model, batch)]
        finally:
            for h in handles:
                h.remove()
        groups.append((caught['cls'][None], caught['box'][None]))
        return groups

    def selection_ops(self, model: nn.Module) -> Sequence[SelectionOp]:
        """The functions that choose the decoder's queries from the
        encoder's tokens (none for a one-stage detector), for
        :meth:`same_queries`."""
        return ()

    def same_queries(self, model: nn.Module, record: List[Any],
                     replay: bool) -> ContextManager[None]:
        """Record the model's query selections (the teacher's), or replay
        recorded ones (the student's), inside the block
        (:func:`~.queries.shared_selection`)."""
        return shared_selection(self.selection_ops(model), record, replay)

    def loss_modules(self, model: nn.Module) -> List[nn.Module]:
        """The modules that compute the detector's loss (whose
        normalisers must stay local to a batch)."""
        return [self.head(model)]

    def training_flag_modules(self, model: nn.Module) -> List[nn.Module]:
        """The modules whose own ``training`` flag the loss reads."""
        return [model]

    @contextmanager
    def training_flag(self, model: nn.Module) -> Iterator[None]:
        """Set the ``training`` flag of :meth:`training_flag_modules` only:
        the loss builds its training-only inputs (two-stage proposal
        outputs, denoising queries), while dropout and batch norms stay in
        eval mode."""
        modules = self.training_flag_modules(model)
        was = [m.training for m in modules]
        for m in modules:
            m.training = True
        try:
            yield
        finally:
            for m, flag in zip(modules, was):
                m.training = flag

    def onnx_outputs(self, model: nn.Module, batch: Batch) -> Group:
        """The outputs of the exported ONNX graph: (L, B, Q, C) scores and
        (L, B, Q, 4) boxes that :meth:`predict` turns into detections."""
        return self.decoder_outputs(model, batch)

    def predict(self, model: nn.Module, scores: torch.Tensor,
                boxes: torch.Tensor, metas: Sequence[dict],
                rescale: bool = True) -> List[Any]:
        """Detections from :meth:`onnx_outputs` by the head's own
        post-processing (``predict_by_feat``).

        Args:
            model (nn.Module): The detector (its head and ``test_cfg``).
            scores (Tensor): (L, B, Q, C) class scores.
            boxes (Tensor): (L, B, Q, 4) normalised boxes.
            metas (Sequence[dict]): The B images' metainfo.
            rescale (bool): Boxes in the original image's pixels. Defaults
                to True.

        Returns:
            list[InstanceData]: One per image.
        """
        return self.head(model).predict_by_feat(
            scores, boxes, batch_img_metas=list(metas), rescale=rescale)
