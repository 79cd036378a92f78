"""GPTQ's input statistics: which weights GPTQ can round, the ``H = Xᵀ X``
of their inputs (collected with forward hooks), and the order in which the
model calls them.

Which weights get GPTQ codes (:func:`gptq_targets`):

* ``nn.Linear`` (the deformable-attention ``sampling_offsets``,
  ``attention_weights``, ``value_proj`` and ``output_proj`` included): the
  inputs of any leading shape, flattened to (N, in);
* ``nn.Conv2d``: ``H`` over the input patches as ``F.unfold`` lays them out
  (the weight viewed as (out, in/groups · kh · kw) is in the same order),
  accumulated batch by batch; with ``groups > 1`` each group's rows get the
  ``H`` of the group's input channels;
* ``nn.MultiheadAttention``: the ``q``, ``k`` and ``v`` row blocks of
  ``in_proj_weight`` see different inputs (the ``query``, ``key`` and
  ``value`` passed to the module, positional embeddings already added by
  mmcv's wrapper), so each block has its own ``H`` but all share the scale of
  the whole parameter; ``out_proj`` is applied by torch without calling the
  Linear, so its inputs (the heads' concatenated outputs) are recomputed
  from the module's inputs;
* everything else (embeddings, ``Conv1d``/``Conv3d``, weights that see no
  input on the calibration batches) keeps nearest rounding.

Memory is ``in × in`` per weight (:func:`hessian_bytes`).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Optional, Sequence,
                    Tuple)

import torch
import torch.nn as nn
import torch.nn.functional as F

#: ``(model, batch) → anything``: one forward pass over a calibration batch.
ForwardFn = Callable[[nn.Module, Any], Any]

#: Kinds of weight that get GPTQ codes, with how their inputs are found.
KINDS = ('linear', 'conv2d', 'mha_in', 'mha_q', 'mha_k', 'mha_v', 'mha_out')


def conv2d_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches a Conv2d multiplies with its weight rows.

    ``conv(x)`` equals, per group ``g``, ``patches[g] @ W_gᵀ`` (reshaped)
    plus the bias, with ``W_g`` the group's rows of the weight viewed as
    (out, in/groups · kh · kw). Any padding mode, stride and dilation.

    Args:
        conv (nn.Conv2d): The layer.
        x (Tensor): (B, in, H, W) or (in, H, W) input.

    Returns:
        Tensor: (groups, B · L, in/groups · kh · kw) patches, L = number of
        output positions.
    """
    if x.dim() == 3:
        x = x[None]
    mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation,
                    stride=conv.stride)
    b, dk, length = cols.shape
    g = conv.groups
    return cols.reshape(b, g, dk // g, length).permute(1, 0, 3, 2).reshape(
        g, b * length, dk // g)


def mha_head_outputs(mha: nn.MultiheadAttention,
                     query: torch.Tensor,
                     key: torch.Tensor,
                     value: torch.Tensor,
                     key_padding_mask: Optional[torch.Tensor] = None,
                     attn_mask: Optional[torch.Tensor] = None,
                     is_causal: bool = False) -> torch.Tensor:
    """What ``mha.out_proj`` is applied to: the heads' concatenated outputs.

    torch applies ``out_proj`` inside ``F.multi_head_attention_forward``
    without calling the Linear, so no hook sees its input; it is recomputed
    here with the current weights, an identity output projection and no
    dropout.

    Args:
        mha (nn.MultiheadAttention): The module.
        query (Tensor): (L, B, E) or (B, L, E) with ``batch_first``, or
            unbatched (L, E).
        key (Tensor): Keys, laid out like ``query``.
        value (Tensor): Values, laid out like ``query``.
        key_padding_mask (Tensor, optional): (B, S). Defaults to None.
        attn_mask (Tensor, optional): Attention mask. Defaults to None.
        is_causal (bool): As torch's argument. Defaults to False.

    Returns:
        Tensor: (L · B, E) inputs of ``out_proj``.
    """
    if mha.batch_first and query.dim() == 3:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e = mha.embed_dim
    w = mha.out_proj.weight
    out, _ = F.multi_head_attention_forward(
        query, key, value, e, mha.num_heads, mha.in_proj_weight,
        mha.in_proj_bias, mha.bias_k, mha.bias_v, mha.add_zero_attn, 0.0,
        torch.eye(e, dtype=w.dtype, device=w.device),
        torch.zeros(e, dtype=w.dtype, device=w.device), training=False,
        key_padding_mask=key_padding_mask, need_weights=False,
        attn_mask=attn_mask,
        use_separate_proj_weight=not mha._qkv_same_embed_dim,
        q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight,
        v_proj_weight=mha.v_proj_weight, is_causal=is_causal)
    return out.reshape(-1, e)


class HessianAccumulator:
    """A running ``Σ xᵀ x`` over rows ``x`` of inputs, with a row count.

    Args:
        dim (int): Input width ``d``.
        device (torch.device, optional): Where the sum lives. Defaults to
            None (CPU).
        dtype (torch.dtype): Of the sum. Defaults to ``torch.float64``.

    Only the (d, d) sum is kept; one call's rows are converted to ``dtype``
    while they are added (for a conv, one batch's patches).

    Attributes:
        sum (Tensor): (d, d) ``Xᵀ X`` of the rows added so far.
        count (int): Rows added so far.
    """

    def __init__(self, dim: int, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.sum = torch.zeros(dim, dim, device=device, dtype=dtype)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows: ``x`` (..., d) is flattened to (N, d)."""
        rows = x.detach().reshape(-1, self.sum.shape[0]).to(self.sum)
        self.sum.addmm_(rows.T, rows)
        self.count += rows.shape[0]


@dataclass
class GptqTarget:
    """A weight that gets GPTQ codes and the module whose inputs feed it.

    Attributes:
        name (str): Parameter name, e.g. ``'encoder.layers.0.ffn.layers.1
            .weight'``.
        module (nn.Module): The module hooked (the ``nn.MultiheadAttention``
            for its ``out_proj``).
        kind (str): One of :data:`KINDS`.
        dims (tuple[int, ...]): ``d`` of each row block's Hessian.
    """

    name: str
    module: nn.Module
    kind: str
    dims: Tuple[int, ...]


def gptq_targets(model: nn.Module) -> Dict[str, GptqTarget]:
    """Every weight of ``model`` that GPTQ can round, by parameter name.

    Args:
        model (nn.Module): Any model.

    Returns:
        dict[str, GptqTarget]: In module order; weights not here (embeddings,
        ``Conv1d``/``Conv3d``) keep nearest rounding.
    """
    targets: Dict[str, GptqTarget] = {}
    mha_outs = set()

    def add(name: str, module: nn.Module, kind: str,
            dims: Tuple[int, ...]) -> None:
        targets.setdefault(name, GptqTarget(name, module, kind, dims))

    for mod_name, module in model.named_modules():
        prefix = f'{mod_name}.' if mod_name else ''
        if isinstance(module, nn.MultiheadAttention):
            e = module.embed_dim
            if module._qkv_same_embed_dim:
                add(prefix + 'in_proj_weight', module, 'mha_in', (e, e, e))
            else:
                add(prefix + 'q_proj_weight', module, 'mha_q', (e, ))
                add(prefix + 'k_proj_weight', module, 'mha_k',
                    (module.kdim, ))
                add(prefix + 'v_proj_weight', module, 'mha_v',
                    (module.vdim, ))
            add(prefix + 'out_proj.weight', module, 'mha_out', (e, ))
            mha_outs.add(id(module.out_proj))
        elif isinstance(module, nn.Linear) and id(module) not in mha_outs:
            add(prefix + 'weight', module, 'linear', (module.in_features, ))
        elif isinstance(module, nn.Conv2d):
            d = module.weight[0].numel()
            add(prefix + 'weight', module, 'conv2d', (d, ) * module.groups)
    return targets


def _mha_inputs(args: tuple, kwargs: dict) -> Dict[str, Any]:
    """``nn.MultiheadAttention.forward``'s arguments by name."""
    names = ('query', 'key', 'value', 'key_padding_mask', 'need_weights',
             'attn_mask', 'average_attn_weights', 'is_causal')
    got = dict(zip(names, args))
    got.update(kwargs)
    return got


def _kept_keys(x: torch.Tensor, mha: nn.MultiheadAttention,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of keys or values that are not padding, as (N, d)."""
    if mask is None or mask.dtype != torch.bool or x.dim() != 3:
        return x.reshape(-1, x.shape[-1])
    keep = ~mask  # (B, S)
    if not mha.batch_first:
        keep = keep.T  # (S, B) like x
    return x[keep]


class HessianCollector:
    """Accumulates ``H = Xᵀ X`` of chosen weights' inputs with hooks.

    Use as a context manager around forward passes: hooks are registered on
    entry and removed on exit; the sums stay (one (d, d) tensor per row
    block of each weight, on the weight's device). Keys and values that a
    boolean ``key_padding_mask`` marks as padding are left out of the
    ``k``/``v`` Hessians (their projections never reach the output).

    Args:
        model (nn.Module): The model.
        names (Sequence[str]): Weights to collect for; each must be in
            :func:`gptq_targets`.
        dtype (torch.dtype): Of the sums. Defaults to ``torch.float64``.

    Raises:
        KeyError: A name is not a GPTQ target.
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 dtype: torch.dtype = torch.float64) -> None:
        all_targets = gptq_targets(model)
        unknown = [n for n in names if n not in all_targets]
        if unknown:
            raise KeyError(f'not GPTQ targets: {unknown}')
        self.targets = {n: all_targets[n] for n in names}
        params = dict(model.named_parameters(remove_duplicate=False))
        self.accumulators: Dict[str, List[HessianAccumulator]] = {
            n: [HessianAccumulator(d, params[n].device, dtype)
                for d in t.dims]
            for n, t in self.targets.items()
        }
        self._handles: List[Any] = []

    def hessians(self, name: str) -> List[torch.Tensor]:
        """(d, d) ``Xᵀ X`` of each row block of weight ``name``."""
        return [acc.sum for acc in self.accumulators[name]]

    def count(self, name: str) -> int:
        """Input rows seen by weight ``name`` (its first row block)."""
        return self.accumulators[name][0].count

    def __enter__(self) -> 'HessianCollector':
        by_module: Dict[int, List[GptqTarget]] = {}
        for target in self.targets.values():
            by_module.setdefault(id(target.module), []).append(target)
        for group in by_module.values():
            module = group[0].module
            hook = self._hook(group)
            self._handles.append(module.register_forward_pre_hook(
                hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, group: List[GptqTarget]) -> Callable:
        accs = self.accumulators

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for target in group:
                acc = accs[target.name]
                if target.kind == 'linear':
                    x = args[0] if args else kwargs['input']
                    acc[0].add(x)
                elif target.kind == 'conv2d':
                    x = args[0] if args else kwargs['input']
                    for g, patches in enumerate(conv2d_patches(module, x)):
                        acc[g].add(patches)
                else:
                    self._add_mha(module, target, acc,
                                  _mha_inputs(args, kwargs))

        return hook

    @staticmethod
    def _add_mha(mha: nn.MultiheadAttention, target: GptqTarget,
                 acc: List[HessianAccumulator],
                 inputs: Dict[str, Any]) -> None:
        """Add a multi-head attention call's inputs to ``target``'s sums."""
        mask = inputs.get('key_padding_mask')
        q, k, v = inputs['query'], inputs['key'], inputs['value']
        if target.kind == 'mha_in':
            acc[0].add(q)
            acc[1].add(_kept_keys(k, mha, mask))
            acc[2].add(_kept_keys(v, mha, mask))
        elif target.kind == 'mha_q':
            acc[0].add(q)
        elif target.kind in ('mha_k', 'mha_v'):
            acc[0].add(_kept_keys(k if target.kind == 'mha_k' else v, mha,
                                  mask))
        else:
            acc[0].add(mha_head_outputs(
                mha, q, k, v, mask, inputs.get('attn_mask'),
                bool(inputs.get('is_causal', False))))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block (no dropout; mmdet's
    detectors take their inference branches), its mode restored after: a
    hook's ``before_test`` runs before the test loop calls ``eval()``."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _StopForward(Exception):
    """Ends a forward pass once no hooked module is called any more."""


@torch.no_grad()
def collect_hessians(model: nn.Module, names: Sequence[str],
                     batches: Sequence[Any],
                     forward_fn: ForwardFn,
                     calls: Optional['CallSequence'] = None
                     ) -> HessianCollector:
    """Run ``forward_fn`` over the batches and collect the weights' ``H``.

    Args:
        model (nn.Module): The model, in the state it should be measured.
        names (Sequence[str]): GPTQ targets to collect for.
        batches (Sequence): Calibration batches.
        forward_fn (Callable): ``(model, batch) → anything``.
        calls (CallSequence, optional): The targets' call sequence on a
            batch (:func:`call_sequence`): each pass then stops after the
            last call of these weights' modules, as long as the pass calls
            the modules in that sequence (else it runs to the end).
            Defaults to None (whole passes).

    Returns:
        HessianCollector: With the sums over all batches.
    """
    collector = HessianCollector(model, names)
    with collector:
        stopper = calls.stopper(collector.targets.values()) if calls else \
            None
        try:
            for batch in batches:
                if stopper is not None:
                    stopper.reset()
                try:
                    forward_fn(model, batch)
                except _StopForward:
                    pass
        finally:
            if stopper is not None:
                stopper.remove()
    return collector


class CallSequence:
    """The order in which a model's GPTQ target modules are called.

    Args:
        modules (dict[int, nn.Module]): The target modules by ``id``.
        order (list[int]): Module ids in call order, with repeats.
    """

    def __init__(self, modules: Dict[int, nn.Module],
                 order: List[int]) -> None:
        self.modules = modules
        self.order = order

    def stopper(self, targets: Any) -> Optional['_Stopper']:
        """Hooks that end a pass after the last call of ``targets``'
        modules (None when those are called last anyway)."""
        wanted = {id(t.module) for t in targets}
        last = max((i for i, m in enumerate(self.order) if m in wanted),
                   default=len(self.order))
        if last >= len(self.order) - 1:
            return None
        return _Stopper(self, last)


class _Stopper:
    """Counting pre-hooks on every target module: the call after ``last``
    raises :class:`_StopForward` while the calls follow the sequence."""

    def __init__(self, calls: CallSequence, last: int) -> None:
        self.calls, self.last = calls, last
        self.count, self.follows = 0, True
        self.handles = [m.register_forward_pre_hook(self._hook)
                        for m in calls.modules.values()]

    def reset(self) -> None:
        self.count, self.follows = 0, True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple) -> None:
        order = self.calls.order
        if self.count >= len(order) or order[self.count] != id(module):
            self.follows = False  # another call sequence: run to the end
        self.count += 1
        if self.follows and self.count > self.last + 1:
            raise _StopForward


@torch.no_grad()
def call_sequence(model: nn.Module, names: Sequence[str], batch: Any,
                  forward_fn: ForwardFn) -> CallSequence:
    """The calls of ``names``' modules during one pass over ``batch``.

    Args:
        model (nn.Module): The model.
        names (Sequence[str]): GPTQ targets.
        batch: One calibration batch.
        forward_fn (Callable): ``(model, batch) → anything``.

    Returns:
        CallSequence: Module ids in call order, repeats included.
    """
    targets = gptq_targets(model)
    modules = {id(targets[n].module): targets[n].module for n in names}
    order: List[int] = []

    def hook(module: nn.Module, args: tuple) -> None:
        order.append(id(module))

    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    try:
        forward_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return CallSequence(modules, order)


def forward_order(model: nn.Module, names: Sequence[str], batch: Any,
                  forward_fn: ForwardFn) -> List[str]:
    """``names`` in the order their modules are first called on ``batch``.

    Within one ``nn.MultiheadAttention``, ``in_proj`` (or ``q``, ``k``,
    ``v``) comes before ``out_proj``. Names never called come last, in the
    given order.

    Args:
        model (nn.Module): The model.
        names (Sequence[str]): GPTQ targets.
        batch: One calibration batch.
        forward_fn (Callable): ``(model, batch) → anything``.

    Returns:
        list[str]: The same names, reordered.
    """
    return first_call_order(model, names,
                            call_sequence(model, names, batch, forward_fn))


def first_call_order(model: nn.Module, names: Sequence[str],
                     calls: CallSequence) -> List[str]:
    """:func:`forward_order` from a recorded :class:`CallSequence`."""
    targets = gptq_targets(model)
    rank: Dict[int, int] = {}
    for m in calls.order:
        rank.setdefault(m, len(rank))
    position = {n: i for i, n in enumerate(names)}
    never = len(rank)
    return sorted(names, key=lambda n: (
        rank.get(id(targets[n].module), never),
        targets[n].kind == 'mha_out', position[n]))


def hessian_bytes(model: nn.Module, names: Sequence[str],
                  sequential: bool = True, stage_size: int = 1,
                  bytes_per_element: int = 8) -> int:
    """Peak memory of the ``H`` sums :func:`~.gptq.gptq_apply` holds at once.

    Each weight holds ``Σ_blocks d²`` elements (three ``E²`` blocks for an
    ``in_proj_weight``, ``groups`` blocks for a grouped conv). Sequentially,
    the peak is the largest stage's sum, stages being ``stage_size``
    consecutive weights of ``names`` (pass them in forward order); otherwise
    the sum over all.
    Quantizing one weight needs about three more ``d × d`` float64 matrices
    (the dampened ``H``, its inverse and Cholesky factor) on top.

    Args:
        model (nn.Module): The model (only shapes are read).
        names (Sequence[str]): Weights quantized with GPTQ.
        sequential (bool): As in :func:`~.gptq.gptq_apply`. Defaults to True.
        stage_size (int): As in :func:`~.gptq.gptq_apply`. Defaults to 1.
        bytes_per_element (int): 8 for the float64 sums. Defaults to 8.

    Returns:
        int: Bytes.
    """
    targets = gptq_targets(model)
    sizes = [sum(d * d for d in targets[n].dims) * bytes_per_element
             for n in names if n in targets]
    if not sizes:
        return 0
    if not sequential:
        return sum(sizes)
    return max(sum(sizes[i:i + stage_size])
               for i in range(0, len(sizes), stage_size))
