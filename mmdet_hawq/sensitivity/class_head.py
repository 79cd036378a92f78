"""The class head's math, softmax and sigmoid, in one place: the distillation
KL term at temperature ``T``, its Gauss–Newton draws, and the KL restricted
to critical classes (beyond the paper). Which activation a model has is its
family adapter's answer (:func:`~mmdet_hawq.models.class_activation`).

* Softmax head (DETR; ``C = K + 1`` columns, the last one no-object): the
  paper's KL of ``softmax(z / T)``; its output Hessian at equality is
  ``(diag(p) − p pᵀ) / T²`` (:func:`softmax_fisher_draw`).
* Sigmoid head (focal heads: DINO, Deformable DETR, ...; ``C = K``): the
  per-class Bernoulli KL of ``σ(z / T)``, Hessian ``diag(p (1 − p)) / T²``
  (:func:`sigmoid_fisher_draw`).

Critical classes, after the authors' follow-up, "Fisher-aware Quantization
for DETR Detectors with Critical-category Objectives": the class term looks
only at the classes the user cares about, so the traces (and the bit plan)
favour the weights those classes depend on. ``critical`` is a sorted list of
class column indices (``0 .. K − 1`` for ``K`` object classes).

* Softmax: the non-critical object classes are folded into one "other"
  class, whose probability is the sum of theirs (``logsumexp`` of their
  logits at temperature ``T``), and the KL is taken over ``[critical...,
  other, no-object]``. The no-object column stays its own class: it decides
  whether a query is a detection at all, so a student that turns a
  no-object query into a detection, or drops one, still pays; only the
  confusion among non-critical classes is ignored. With every object class
  critical there is no "other" column and the fold is the identity.
* Sigmoid: the per-class Bernoulli KL keeps the critical columns only.

The restricted draws generalise the full ones: ``E[u uᵀ]`` is the output
Hessian of the restricted KL in the logits at equality (its Fisher matrix).
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import HawqUserError

#: The class activations a head can have.
ACTIVATIONS = ('softmax', 'sigmoid')
#: ``(logits, temperature, weight, generator) → u``
DrawFn = Callable[[torch.Tensor, float, float, torch.Generator],
                  torch.Tensor]


def softmax_fisher_draw(logits: torch.Tensor, temperature: float,
                        weight: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u`` with ``E[u uᵀ] = weight · (diag(p) − p pᵀ) / T²``, ``p =
    softmax(logits / T)``: the output Hessian of a temperature KL term.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): Softmax temperature ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the class draws, on the
            device of ``logits``.

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.softmax(logits.detach().double() / temperature, dim=-1)
    flat = p.reshape(-1, p.shape[-1])
    idx = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    onehot = torch.zeros_like(flat).scatter_(1, idx[:, None], 1.0)
    u = (onehot - flat).reshape(p.shape) * (weight**0.5 / temperature)
    return u.to(logits.dtype)


def sigmoid_fisher_draw(logits: torch.Tensor, temperature: float,
                        weight: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u`` with ``E[u uᵀ] = weight · diag(p (1 − p)) / T²``, ``p =
    σ(logits / T)``: the output Hessian of a per-class Bernoulli KL at
    temperature ``T`` at equality.

    The draw is ``u = ε · sqrt(weight · p (1 − p)) / T`` with Rademacher
    ``ε``: its second moment is exactly the diagonal (``u²`` has no
    variance), which gives lower-variance traces than ``(y − p)/T`` with
    ``y ~ Bernoulli(p)``.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): Temperature ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the signs, on the device
            of ``logits``.

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.sigmoid(logits.detach().double() / temperature)
    sign = torch.randint(0, 2, p.shape, generator=generator,
                         dtype=torch.int8, device=p.device).double() * 2 - 1
    u = sign * (weight * p * (1 - p)).sqrt() / temperature
    return u.to(logits.dtype)


def object_columns(num_columns: int, activation: str) -> int:
    """How many of a class head's columns are object classes.

    Args:
        num_columns (int): ``C``, the logits' last dimension.
        activation (str): ``'softmax'`` (last column no-object) or
            ``'sigmoid'``.

    Returns:
        int: ``K``.
    """
    return num_columns - 1 if activation == 'softmax' else num_columns


def check_columns(critical: Sequence[int], num_columns: int,
                  activation: str) -> None:
    """Stop with one line unless every critical index is an object column.

    Args:
        critical (Sequence[int]): Critical class indices.
        num_columns (int): ``C`` of the logits.
        activation (str): ``'softmax'`` or ``'sigmoid'``.

    Raises:
        HawqUserError: An index is not below ``K`` (the dataset's classes
            do not fit the head's ``num_classes``).
    """
    k = object_columns(num_columns, activation)
    bad = [int(c) for c in critical if not 0 <= int(c) < k]
    if bad:
        raise HawqUserError(
            f'sensitivity critical_classes: class index(es) {bad} are not '
            f"among the head's {k} classes: the dataset's classes do not "
            "fit the model's num_classes")


def fold_softmax_logits(logits: torch.Tensor, temperature: float,
                        critical: Sequence[int]) -> torch.Tensor:
    """Folded logits at temperature ``T``: ``softmax`` of the result is the
    folded distribution ``q`` over ``[critical..., other, no-object]``.

    Args:
        logits (Tensor): (..., K + 1) logits, the last column no-object.
        temperature (float): ``T``.
        critical (Sequence[int]): Sorted critical class indices (< K).

    Returns:
        Tensor: (..., len(critical) + 2), or (..., K + 1) when every object
        class is critical (no "other" column).
    """
    z = logits / temperature
    k = z.shape[-1] - 1
    keep = set(int(c) for c in critical)
    others = [c for c in range(k) if c not in keep]
    parts = [z[..., list(critical)]]
    if others:
        parts.append(torch.logsumexp(z[..., others], dim=-1, keepdim=True))
    parts.append(z[..., k:])
    return torch.cat(parts, dim=-1)


def column_groups(num_columns: int,
                  critical: Sequence[int],
                  device: Union[str, torch.device] = 'cpu') -> torch.Tensor:
    """Folded class of every softmax column (the 0/1 folding matrix ``J``
    as an index).

    Args:
        num_columns (int): ``C = K + 1``.
        critical (Sequence[int]): Sorted critical class indices (< K).
        device (str | torch.device): Device of the result. Defaults to
            'cpu'.

    Returns:
        Tensor: (C,) int64; critical class ``i`` of the list → ``i``, the
        other object classes → ``len(critical)``, no-object → the last
        group.
    """
    k = num_columns - 1
    groups = torch.full((num_columns, ), len(critical), dtype=torch.long,
                        device=device)
    groups[list(critical)] = torch.arange(len(critical), device=device)
    groups[k] = len(critical) + (1 if len(critical) < k else 0)
    return groups


def folded_softmax_fisher_draw(logits: torch.Tensor, temperature: float,
                               weight: float, generator: torch.Generator,
                               critical: Sequence[int]) -> torch.Tensor:
    """``u`` with ``E[u uᵀ]`` = ``weight`` × the Hessian in the logits of the
    folded KL at equality.

    With ``p = softmax(z / T)``, the folded ``q = J p`` and ``y ~
    Categorical(q)``, ``u = (r − p) / T`` where ``r_c = p_c / q_y`` for the
    columns ``c`` of class ``y`` and 0 elsewhere: ``u`` is the score
    ``∇_z log q_y``, so ``E[u uᵀ]`` is the Fisher matrix of ``q`` in ``z``,
    ``(P Jᵀ diag(1/q) J P − p pᵀ) / T²`` with ``P = diag(p)``. (Not
    ``Jᵀ (diag(q) − q qᵀ) J / T²``: a folded logit depends on its columns
    through their softmax weights ``p_c / q_y``, not through 0/1 entries.)
    For a one-column class ``r`` is its one-hot, as in
    :func:`softmax_fisher_draw`.

    Args:
        logits (Tensor): (..., K + 1) logits (detached inside).
        temperature (float): ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the class draws, on the
            device of ``logits``.
        critical (Sequence[int]): Sorted critical class indices (< K).

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    p = torch.softmax(logits.detach().double() / temperature, dim=-1)
    flat = p.reshape(-1, p.shape[-1])
    groups = column_groups(p.shape[-1], critical, flat.device)
    num_groups = len(critical) + (2 if len(critical) < p.shape[-1] - 1 else 1)
    q = flat.new_zeros(flat.shape[0], num_groups).index_add_(1, groups, flat)
    y = torch.multinomial(q, 1, generator=generator)
    drawn = groups[None, :] == y
    r = torch.where(drawn, flat / q.gather(1, y), torch.zeros_like(flat))
    u = (r - flat).reshape(p.shape) * (weight**0.5 / temperature)
    return u.to(logits.dtype)


def _critical_sigmoid_draw(logits: torch.Tensor, temperature: float,
                           weight: float, generator: torch.Generator,
                           critical: Sequence[int]) -> torch.Tensor:
    """:func:`sigmoid_fisher_draw` on the critical columns,
    0 on the others (they are not in the KL)."""
    u = torch.zeros_like(logits)
    u[..., list(critical)] = sigmoid_fisher_draw(
        logits[..., list(critical)], temperature, weight, generator)
    return u


def _softmax_log_probs(logits: torch.Tensor, temperature: float,
                       critical: Optional[Sequence[int]]) -> torch.Tensor:
    z = logits / temperature if critical is None else \
        fold_softmax_logits(logits, temperature, critical)
    return F.log_softmax(z, dim=-1)


#: Per class activation: the full-class Gauss–Newton draw and the restricted
#: one (``critical`` as the last argument).
DRAWS: Dict[str, Tuple[DrawFn, Callable[..., torch.Tensor]]] = {
    'softmax': (softmax_fisher_draw, folded_softmax_fisher_draw),
    'sigmoid': (sigmoid_fisher_draw, _critical_sigmoid_draw),
}


def fisher_draw(logits: torch.Tensor, temperature: float, weight: float,
                generator: torch.Generator, activation: str,
                critical: Optional[Sequence[int]] = None) -> torch.Tensor:
    """One Gauss–Newton draw ``u`` of the KL term of ``activation``.

    Args:
        logits (Tensor): (..., C) logits (detached inside).
        temperature (float): ``T``.
        weight (float): Factor of the Hessian (e.g. ``λ_KL / N``).
        generator (torch.Generator): Generator of the draws, on the device
            of ``logits``.
        activation (str): ``'softmax'`` or ``'sigmoid'``.
        critical (Sequence[int], optional): Sorted critical class indices.
            Defaults to None (every class, the paper's objective).

    Returns:
        Tensor: ``u``, shape of ``logits``.
    """
    full, restricted = DRAWS[activation]
    if critical is None:
        return full(logits, temperature, weight, generator)
    return restricted(logits, temperature, weight, generator, critical)


def temperature_kl(student: torch.Tensor, teacher: torch.Tensor,
                   temperature: float, activation: str,
                   critical: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``Σ KL(p_s ‖ p_t)`` at temperature ``T``, summed over all entries.

    Softmax: ``p = softmax(z / T)`` over the last axis (the paper's Eq. 5),
    or the folded distribution of :func:`fold_softmax_logits`.
    Sigmoid: ``p = σ(z / T)`` per class, and the Bernoulli KL
    ``p_s log(p_s/p_t) + (1 − p_s) log((1 − p_s)/(1 − p_t))``, summed over
    the classes (the critical ones only, when given); its Hessian in ``z_s``
    at ``z_s = z_t`` is ``p(1 − p) / T²`` (no focal modulation: that would
    vanish there).

    Args:
        student (Tensor): Student logits (..., C).
        teacher (Tensor): Teacher logits, same shape.
        temperature (float): ``T``.
        activation (str): ``'softmax'`` or ``'sigmoid'``.
        critical (Sequence[int], optional): Sorted critical class indices.
            Defaults to None (every class).

    Returns:
        Tensor: Scalar; exactly 0.0 when the logits are equal.
    """
    if activation == 'softmax':
        log_s = _softmax_log_probs(student, temperature, critical)
        log_t = _softmax_log_probs(teacher, temperature, critical)
        return (log_s.exp() * (log_s - log_t)).sum()
    if critical is not None:
        student, teacher = student[..., list(critical)], \
            teacher[..., list(critical)]
    zs, zt = student / temperature, teacher / temperature
    p = torch.sigmoid(zs)
    return (p * (F.logsigmoid(zs) - F.logsigmoid(zt)) +
            (1 - p) * (F.logsigmoid(-zs) - F.logsigmoid(-zt))).sum()
