"""Which weights of a DETR-family model are quantized.

Weights are found by module type, not by name: convolutions, linear layers
(attention output projections included), ``nn.MultiheadAttention``'s
``in_proj_weight`` (torch reads it directly, so it is rewritten as a
parameter) and embeddings (DETR's query embedding). Biases and normalisation
parameters are never candidates. The weights the detection head owns — the
final class and box FFNs, whose quantization the paper found catastrophic —
stay in float, found by parameter identity from the model's family adapter
(:func:`~mmdet_hawq.models.float_weights`), not by name; names
matching a user's ``exclude`` pattern stay in float too.
"""
import fnmatch
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from ..errors import HawqUserError, short_list
from ..models.family import float_weights

#: No user pattern by default: the head's final FFNs are kept float by
#: structure (see the module docstring).
DEFAULT_EXCLUDE: Tuple[str, ...] = ()

_WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


@dataclass
class WeightInfo:
    """One candidate weight.

    Attributes:
        name (str): Parameter name, e.g. ``'backbone.conv1.weight'``.
        module_type (str): Class name of the owning module.
        shape (tuple): Weight shape.
        numel (int): Number of elements.
        included (bool): Whether it is quantized.
        reason (str): Why it is excluded ('' when included).
    """

    name: str
    module_type: str
    shape: tuple
    numel: int
    included: bool
    reason: str = ''

    def to_dict(self) -> Dict:
        """JSON-friendly dict."""
        d = asdict(self)
        d['shape'] = list(self.shape)
        return d


def _matches(name: str, patterns: Sequence[str]) -> Optional[str]:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or name.startswith(
                pattern.rstrip('*').rstrip('.') + '.'):
            return pattern
    return None


def list_weights(model: nn.Module,
                 include: Optional[Sequence[str]] = None,
                 exclude: Sequence[str] = DEFAULT_EXCLUDE) -> List[WeightInfo]:
    """All candidate weights in model order, each marked included or not.

    Args:
        model (nn.Module): The detector (unwrapped).
        include (Sequence[str], optional): If given, only names matching one
            of these glob patterns are quantized. Defaults to None (all).
        exclude (Sequence[str]): Glob patterns of names kept in float, on
            top of the head's final FFNs. Defaults to :data:`DEFAULT_EXCLUDE`.

    Returns:
        list[WeightInfo]: One entry per candidate weight.

    Raises:
        HawqUserError: An ``include`` or ``exclude`` pattern matches no
            candidate weight (a typo would silently change the plan).
    """
    infos: List[WeightInfo] = []
    seen = set()
    held = float_weights(model)
    for mod_name, module in model.named_modules():
        params = []
        if isinstance(module, _WEIGHT_TYPES):
            params.append('weight')
        elif isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                params.append('in_proj_weight')
            else:  # separate q/k/v projections
                params += ['q_proj_weight', 'k_proj_weight', 'v_proj_weight']
        for pname in params:
            param = getattr(module, pname, None)
            if not isinstance(param, nn.Parameter) or id(param) in seen:
                continue
            seen.add(id(param))
            name = f'{mod_name}.{pname}' if mod_name else pname
            reason = ''
            hit = _matches(name, exclude)
            if id(param) in held:
                reason = held[id(param)]
            elif hit is not None:
                reason = f'excluded by pattern {hit!r}'
            elif include is not None and _matches(name, include) is None:
                reason = 'not matched by include patterns'
            infos.append(
                WeightInfo(name, type(module).__name__, tuple(param.shape),
                           param.numel(), not reason, reason))
    unused = [p for p in list(include or ()) + list(exclude)
              if not any(_matches(i.name, [p]) for i in infos)]
    if unused:
        raise HawqUserError(
            f'weight pattern(s) {short_list([repr(p) for p in unused])} '
            f'match no quantizable weight of {type(model).__name__}: check '
            'the include/exclude patterns against `tools/ptq.py CONFIG '
            '--list-layers`')
    return infos


def quantizable_weights(model: nn.Module,
                        include: Optional[Sequence[str]] = None,
                        exclude: Sequence[str] = DEFAULT_EXCLUDE,
                        infos: Optional[Sequence[WeightInfo]] = None
                        ) -> Dict[str, nn.Parameter]:
    """Name → parameter of every weight that is quantized, in model order.

    Args:
        model (nn.Module): The detector (unwrapped).
        include (Sequence[str], optional): See :func:`list_weights`.
            Defaults to None.
        exclude (Sequence[str]): See :func:`list_weights`. Defaults to
            :data:`DEFAULT_EXCLUDE`.
        infos (Sequence[WeightInfo], optional): What :func:`list_weights`
            returned for these patterns, when the caller has it (not listed
            again). Defaults to None.

    Returns:
        dict[str, nn.Parameter]: The selected weights.

    Raises:
        HawqUserError: No weight is selected.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    selected = {
        info.name: params[info.name]
        for info in (list_weights(model, include, exclude)
                     if infos is None else infos) if info.included
    }
    if not selected:
        raise HawqUserError(
            f'{type(model).__name__} has no quantizable weights with '
            f'include={include} exclude={list(exclude)}: the model needs '
            'conv/linear/attention/embedding weights, and the patterns must '
            'leave some of them in')
    return selected


def weight_group(name: str) -> str:
    """Coarse group of a weight for reports: backbone/neck/encoder/... ."""
    head = name.split('.')[0]
    if head in ('backbone', 'neck', 'encoder', 'decoder'):
        return head
    if 'query' in name:
        return 'decoder'
    return head


def bit_floors(names: Sequence[str],
               min_bits: Mapping[str, int]) -> Dict[str, int]:
    """The fewest bits each weight may get, from ``{pattern: bits}``.

    Args:
        names (Sequence[str]): The planned weights' names.
        min_bits (Mapping[str, int]): Glob pattern (matched like ``include``)
            → lowest bit-width of the weights it matches; a weight matched by
            several patterns takes the highest floor.

    Returns:
        dict[str, int]: Name → floor, for the matched weights only.

    Raises:
        HawqUserError: A pattern matches none of ``names``.
    """
    floors: Dict[str, int] = {}
    for pattern, bits in min_bits.items():
        hits = [n for n in names if _matches(n, [pattern]) is not None]
        if not hits:
            raise HawqUserError(
                f'min_bits pattern {pattern!r} matches none of the planned '
                'weights: check it against `tools/ptq.py CONFIG '
                '--list-layers`')
        for n in hits:
            floors[n] = max(floors.get(n, bits), bits)
    return floors
