"""GPTQ second-order rounding on the paper's grid (Frantar et al., 2022).

The grid is the paper's Eq. 6 grid, unchanged: the scale is
``max|W| / (2^(b-1) - 1)`` of the float weight (per tensor, or per output
channel with ``axis=0``), computed before any update. Only the integer codes
differ from nearest rounding: GPTQ rounds the columns of ``W`` (out, in) one
after the other and spreads each column's rounding error over the columns not
yet rounded, so that the layer's output error ``||X Wᵀ − X Qᵀ||²`` on the
calibration inputs ``X`` (N, in) is small. It needs ``H = Xᵀ X`` (in, in)
per layer, accumulated from the layer's inputs with forward hooks
(:class:`HessianCollector`); memory is ``in × in`` per layer.

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

:func:`gptq_apply` quantizes the weights a precision plan names, in forward
order, each with the ``H`` its inputs have once the earlier weights are
quantized (``sequential=True``), or all with the float model's ``H``.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import HawqUserError
from .quantizer import QuantizedWeight, choose_scale, qmax, quantize_weight

#: ``(model, batch) → anything``: one forward pass over a calibration batch.
ForwardFn = Callable[[nn.Module, Any], Any]
Hessians = Union[torch.Tensor, Sequence[torch.Tensor]]

#: Kinds of weight that get GPTQ codes, with how their inputs are found.
KINDS = ('linear', 'conv2d', 'mha_in', 'mha_q', 'mha_k', 'mha_v', 'mha_out')
_MHA_ROLES = {'mha_q': 'query', 'mha_k': 'key', 'mha_v': 'value'}


def _gptq_rows(weight: torch.Tensor, hessian: torch.Tensor,
               scale: torch.Tensor, limit: int, damp: float,
               act_order: bool, block_size: int,
               zero_dead: bool) -> torch.Tensor:
    """GPTQ codes of a 2-D weight with one Hessian (float64 inside).

    Args:
        weight (Tensor): (r, d) float weight.
        hessian (Tensor): (d, d) ``Xᵀ X`` of the inputs.
        scale (Tensor): 0-d, or (r, 1) per row.
        limit (int): Largest code, ``2^(b-1) - 1``.
        damp (float): Relative dampening of the diagonal.
        act_order (bool): Round columns by descending ``diag(H)``.
        block_size (int): Columns per lazy-update block.
        zero_dead (bool): Code 0 for columns whose input is always 0.

    Returns:
        Tensor: (r, d) float64 integer-valued codes.
    """
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    d = w.shape[1]
    s = scale.detach().to(device=w.device, dtype=torch.float64)
    s = s.reshape(-1) if s.dim() else s.expand(w.shape[0])
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    if zero_dead:
        w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    u = _inverse_cholesky_upper(h, damp)
    codes = torch.zeros_like(w)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            code = torch.round(col / s).clamp_(-limit, limit)
            codes[:, i1 + i] = code
            err = (col - code * s) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``Uᵀ U``), float64.

    ``λ = damp · mean(diag(H))``; if ``H + λI`` is still not positive
    definite in floating point, ``λ`` grows tenfold, up to five times.

    Args:
        h (Tensor): (d, d) symmetric positive semi-definite, diagonal > 0.
        damp (float): Relative dampening.

    Returns:
        Tensor: (d, d) upper-triangular ``U``.
    """
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        lam = lam * 10 if lam > 0 else 1e-8 * mean_diag
    raise ValueError('the input Hessian is not positive definite even with '
                     f'dampening {float(lam / mean_diag):g} · mean(diag H)')


def gptq_quantize(weight: torch.Tensor,
                  hessian: Hessians,
                  bits: int,
                  axis: Optional[int] = None,
                  damp: float = 0.01,
                  act_order: bool = False,
                  block_size: int = 128,
                  zero_dead: bool = True) -> QuantizedWeight:
    """GPTQ codes of ``weight`` on the Eq. 6 grid of the float weight.

    The weight is viewed as (out, d) with ``d = numel / out`` (a conv's
    (out, in, kh, kw) in ``F.unfold``'s order). With ``G`` Hessians the rows
    are split into ``G`` equal blocks, block ``g`` rounded with
    ``hessian[g]`` (the q/k/v blocks of ``in_proj_weight``, the groups of a
    grouped conv); the scale is the whole weight's either way. Columns are
    rounded one by one (in order of descending ``diag(H)`` with
    ``act_order``); each column's error, divided by the diagonal of the
    upper Cholesky factor ``U`` of ``(H + λI)⁻¹``, is subtracted from the
    later columns along ``U``'s row — within a block of ``block_size``
    columns at once and from the columns after it when the block is done
    (Algorithm 1 of the GPTQ paper). ``λ = damp · mean(diag(H))``. An input
    that is always 0 (``H_jj = 0``) gets ``H_jj = 1`` and, as in GPTQ, its
    column the code 0 when ``zero_dead`` (else nearest rounding; its error
    is not spread either way, and neither changes the calibration outputs).

    Args:
        weight (Tensor): (out, d) or (out, ...) float weight.
        hessian (Tensor | Sequence[Tensor]): (d, d) ``Xᵀ X`` of the inputs,
            or one per row block.
        bits (int): Bit-width, 2 to 8.
        axis (int, optional): 0 for one scale per output channel; None for
            per tensor (the paper). Defaults to None.
        damp (float): Relative dampening. Defaults to 0.01.
        act_order (bool): Round columns by descending ``diag(H)`` (the codes
            come back in the original order). Defaults to False.
        block_size (int): Columns per lazy-update block; any value gives
            the same codes up to floating point. Defaults to 128.
        zero_dead (bool): Code 0 for dead inputs, as GPTQ does. Defaults to
            True.

    Returns:
        QuantizedWeight: int8 codes of ``weight``'s shape, with the scale of
        :func:`~mmdet_hawq.quant.quantizer.choose_scale` of the float weight.

    Raises:
        ValueError: ``axis`` is not None or 0, the Hessians do not fit the
            weight, or ``weight`` is not finite.
    """
    if axis not in (None, 0):
        raise ValueError(f'axis must be None or 0, got {axis!r}')
    if weight.dim() < 2:
        raise ValueError('GPTQ needs a weight of at least 2 dimensions, got '
                         f'shape {tuple(weight.shape)}')
    if block_size < 1:
        raise ValueError(f'block_size must be positive, got {block_size}')
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()
    scale = choose_scale(w, bits, axis)
    hessians = [hessian] if torch.is_tensor(hessian) else list(hessian)
    out = w.shape[0]
    w2 = w.reshape(out, -1)
    rows = out // len(hessians)
    d = w2.shape[1]
    if rows * len(hessians) != out or any(
            tuple(h.shape) != (d, d) for h in hessians):
        raise ValueError(
            f'{len(hessians)} Hessian(s) of shapes '
            f'{[tuple(h.shape) for h in hessians]} do not fit a weight '
            f'viewed as {tuple(w2.shape)}')
    s_rows = scale.reshape(out, 1) if axis == 0 else scale
    codes = torch.cat([
        _gptq_rows(w2[g * rows:(g + 1) * rows], h,
                   s_rows[g * rows:(g + 1) * rows] if axis == 0 else s_rows,
                   qmax(bits), damp, act_order, block_size, zero_dead)
        for g, h in enumerate(hessians)
    ])
    codes = codes.to(torch.int8).reshape(w.shape).to(weight.device)
    return QuantizedWeight(codes, scale.to(weight.device), bits, axis)


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
    return _first_call_order(model, names,
                             call_sequence(model, names, batch, forward_fn))


def _first_call_order(model: nn.Module, names: Sequence[str],
                      calls: CallSequence) -> List[str]:
    targets = gptq_targets(model)
    rank: Dict[int, int] = {}
    for m in calls.order:
        rank.setdefault(m, len(rank))
    position = {n: i for i, n in enumerate(names)}
    never = len(rank)
    return sorted(names, key=lambda n: (
        rank.get(id(targets[n].module), never),
        targets[n].kind == 'mha_out', position[n]))


@dataclass
class GptqResult:
    """What :func:`gptq_apply` did.

    Attributes:
        applied (dict[str, QuantizedWeight]): Codes and scale of each
            quantized weight, in plan order, as
            :func:`~mmdet_hawq.quant.plan.quantize_weights_` returns them.
        rounding (dict[str, str]): ``'gptq'`` or ``'nearest'`` per weight.
        notes (dict[str, str]): Why a weight got nearest rounding, or that
            its ``H`` had fewer input rows than columns (dampened).
    """

    applied: Dict[str, QuantizedWeight]
    rounding: Dict[str, str]
    notes: Dict[str, str]


@torch.no_grad()
def gptq_apply(model: nn.Module,
               plan: Mapping[str, Optional[int]],
               batches: Sequence[Any],
               forward_fn: ForwardFn,
               axis: Optional[int] = None,
               damp: float = 0.01,
               act_order: bool = False,
               block_size: int = 128,
               sequential: bool = True,
               stage_size: int = 1,
               progress: Optional[Callable[[int, int], None]] = None
               ) -> GptqResult:
    """Fake-quantize a plan's weights in place with GPTQ codes.

    Weights without a GPTQ path (embeddings, ``Conv1d``/``Conv3d``) and
    those that see no input on the calibration batches get nearest rounding
    (the first before any ``H`` is collected, so later layers see them
    quantized), and so does a weight whose ``H`` is not finite or not
    positive definite even after dampening; each gets a note, and no weight
    is ever left non-finite. The others are quantized in forward order
    (:func:`forward_order`):

    * ``sequential=True``: ``stage_size`` weights at a time, each stage's
      ``H`` collected with every earlier weight already quantized — one pass
      over the calibration batches per stage, so ``ceil(n / stage_size)``
      passes for ``n`` weights (one pass per weight by default: 114 passes
      for DETR-R50); peak ``H`` memory is that of the largest stage
      (:func:`hessian_bytes`);
    * ``sequential=False``: every ``H`` from the float model in one pass;
      all of them are held at once.

    Args:
        model (nn.Module): The model (unwrapped); in eval mode while this
            runs, its mode restored after.
        plan (Mapping): Weight name → bits, or None for float.
        batches (Sequence): Calibration batches.
        forward_fn (Callable): ``(model, batch) → anything``, one forward
            pass (e.g. :func:`~mmdet_hawq.models.family.decoder_outputs`).
        axis (int, optional): 0 for per-channel scales; None for per tensor.
            Defaults to None.
        damp (float): See :func:`gptq_quantize`. Defaults to 0.01.
        act_order (bool): See :func:`gptq_quantize`. Defaults to False.
        block_size (int): See :func:`gptq_quantize`. Defaults to 128.
        sequential (bool): Collect each stage's ``H`` from the partly
            quantized model. Defaults to True.
        stage_size (int): Weights per stage when sequential. Defaults to 1.
        progress (Callable, optional): Called as ``progress(done, total)``
            after each weight GPTQ rounds. Defaults to None.

    Returns:
        GptqResult: Codes, rounding and notes per weight.

    Raises:
        HawqUserError: The plan names a weight the model does not have.
    """
    if stage_size < 1:
        raise ValueError(f'stage_size must be positive, got {stage_size}')
    with eval_mode(model):
        return _gptq_apply(model, plan, batches, forward_fn, axis, damp,
                           act_order, block_size, sequential, stage_size,
                           progress)


def _gptq_apply(model: nn.Module, plan: Mapping[str, Optional[int]],
                batches: Sequence[Any], forward_fn: ForwardFn,
                axis: Optional[int], damp: float, act_order: bool,
                block_size: int, sequential: bool, stage_size: int,
                progress: Optional[Callable[[int, int], None]]
                ) -> GptqResult:
    """:func:`gptq_apply` with the model in eval mode."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in plan if n not in params]
    if unknown:
        raise HawqUserError(
            f'the precision plan names {len(unknown)} weight(s) '
            f'{type(model).__name__} does not have, e.g. {unknown[:3]}')
    targets = gptq_targets(model)
    todo = [n for n, b in plan.items() if b is not None]
    applied: Dict[str, QuantizedWeight] = {}
    rounding: Dict[str, str] = {}
    notes: Dict[str, str] = {}

    def nearest(name: str, why: str) -> None:
        applied[name] = quantize_weight(params[name].data, plan[name], axis)
        params[name].data.copy_(applied[name].dequantize(params[name].dtype))
        rounding[name], notes[name] = 'nearest', why

    def gptq(name: str, collector: HessianCollector) -> None:
        rows = collector.count(name)
        if rows == 0:
            nearest(name, 'nearest rounding: no input on the calibration '
                    'batches')
            return
        hessians = collector.hessians(name)
        if not all(bool(torch.isfinite(h).all()) for h in hessians):
            nearest(name, 'nearest rounding: its inputs on the calibration '
                    'batches are not finite')
            return
        try:
            qw = gptq_quantize(params[name].data, hessians, plan[name], axis,
                               damp, act_order, block_size)
        except ValueError as exc:  # not positive definite, even dampened
            nearest(name, f'nearest rounding: {exc}')
            return
        applied[name], rounding[name] = qw, 'gptq'
        params[name].data.copy_(qw.dequantize(params[name].dtype))
        d = max(targets[name].dims)
        if rows < d:
            notes[name] = (f'{rows} calibration input rows for a {d} x {d} '
                           'H: singular, rounded with the dampened H; use '
                           'more calibration images')

    for name in todo:
        if name not in targets:
            nearest(name, 'nearest rounding: no GPTQ path (no inputs it '
                    'multiplies, e.g. an embedding)')
    names = [n for n in todo if n in targets]
    calls = None
    if names and batches:
        calls = call_sequence(model, names, batches[0], forward_fn)
        names = _first_call_order(model, names, calls)
    done = 0

    def step(name: str, collector: HessianCollector) -> None:
        nonlocal done
        gptq(name, collector)
        done += 1
        if progress is not None:
            progress(done, len(names))

    if not sequential:
        collector = collect_hessians(model, names, batches, forward_fn)
        for name in names:
            step(name, collector)
    else:
        for start in range(0, len(names), stage_size):
            stage = names[start:start + stage_size]
            collector = collect_hessians(model, stage, batches, forward_fn,
                                         calls)
            for name in stage:
                step(name, collector)
            del collector
    return GptqResult({n: applied[n] for n in plan if n in applied},
                      {n: rounding[n] for n in plan if n in rounding},
                      notes)


def output_error(weight: torch.Tensor, quantized: torch.Tensor,
                 hessian: Hessians) -> float:
    """The layer-output error ``||X Wᵀ − X Qᵀ||² = Σ_g tr(ΔW_g H_g ΔW_gᵀ)``.

    Args:
        weight (Tensor): (out, ...) weight.
        quantized (Tensor): Its quantized value, same shape.
        hessian (Tensor | Sequence[Tensor]): ``H`` of each row block, as in
            :func:`gptq_quantize`.

    Returns:
        float: The error summed over the calibration inputs.
    """
    hessians = [hessian] if torch.is_tensor(hessian) else list(hessian)
    delta = (weight.detach().double() - quantized.detach().double()
             ).reshape(weight.shape[0], -1)
    rows = weight.shape[0] // len(hessians)
    return float(sum(
        ((delta[g * rows:(g + 1) * rows] @ h.double()) *
         delta[g * rows:(g + 1) * rows]).sum()
        for g, h in enumerate(hessians)))


@torch.no_grad()
def gptq_error_ratios(model: nn.Module,
                      names: Sequence[str],
                      bits: Sequence[int],
                      batches: Sequence[Any],
                      forward_fn: ForwardFn,
                      axis: Optional[int] = None,
                      damp: float = 0.01,
                      act_order: bool = False,
                      block_size: int = 128) -> Dict[str, Dict[int, float]]:
    """How much GPTQ lowers each weight's layer-output error, per bit-width.

    With every ``H`` from the float model (one pass over the batches), the
    ratio of :func:`output_error` with GPTQ codes to that with nearest
    rounding, for each weight and bit-width. Multiplying nearest rounding's
    error terms ``||Q_b(W) − W||²`` by it gives error terms that reflect
    GPTQ's rounding in the ILP. Weights GPTQ cannot round (or whose ``H``
    fails) get 1.0.

    Args:
        model (nn.Module): The float model (unwrapped); in eval mode while
            this runs, its mode restored after.
        names (Sequence[str]): Weights to rate.
        bits (Sequence[int]): Candidate bit-widths.
        batches (Sequence): Calibration batches.
        forward_fn (Callable): ``(model, batch) → anything``.
        axis (int, optional): 0 for per-channel scales. Defaults to None.
        damp (float): See :func:`gptq_quantize`. Defaults to 0.01.
        act_order (bool): See :func:`gptq_quantize`. Defaults to False.
        block_size (int): See :func:`gptq_quantize`. Defaults to 128.

    Returns:
        dict[str, dict[int, float]]: Ratio per weight and bit-width, in
        ``[0, ∞)``; below 1 where GPTQ helps.
    """
    targets = gptq_targets(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    rated = [n for n in names if n in targets]
    with eval_mode(model):
        collector = collect_hessians(model, rated, batches, forward_fn)
    ratios = {n: {b: 1.0 for b in bits} for n in names}
    for name in rated:
        hessians = collector.hessians(name)
        if collector.count(name) == 0 or not all(
                bool(torch.isfinite(h).all()) for h in hessians):
            continue
        w = params[name].data
        for b in bits:
            near = output_error(w, quantize_weight(w, b, axis).dequantize(
                torch.float64), hessians)
            try:
                codes = gptq_quantize(w, hessians, b, axis, damp, act_order,
                                      block_size)
            except ValueError:
                continue
            if near > 0:
                ratios[name][b] = output_error(
                    w, codes.dequantize(torch.float64), hessians) / near
    return ratios


def hessian_bytes(model: nn.Module, names: Sequence[str],
                  sequential: bool = True, stage_size: int = 1,
                  bytes_per_element: int = 8) -> int:
    """Peak memory of the ``H`` sums :func:`gptq_apply` holds at one time.

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
        sequential (bool): As in :func:`gptq_apply`. Defaults to True.
        stage_size (int): As in :func:`gptq_apply`. Defaults to 1.
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
