"""Permutation symmetry of neural networks: permutation specs, activation-correlation matching and applying
channel permutations (used by TSC, :mod:`purifiers.tsc`).

A *permutation spec* is a list of :class:`PermGroup`: a set of hidden channels that must be permuted
together for the network function to stay unchanged. For a group of ``size`` channels and a permutation
``perm`` (a ``LongTensor`` with ``new channel i = old channel perm[i]``):

- every *producer* (``nn.Conv2d`` / ``nn.Linear``) has its output rows ``weight[perm]`` and ``bias[perm]``;
- every *channel-wise* module (BatchNorm) has ``weight``, ``bias``, ``running_mean``, ``running_var`` permuted;
- every *consumer* has its input columns permuted (``weight[:, perm]``); a ``Linear`` fed by a flattened
  ``[C, H, W]`` map has its columns permuted in blocks of ``H*W`` per channel;
- *probes* are the modules whose outputs hold the group's activations (used for matching).

Specs are built by structure (:func:`permutation_spec`): plain Conv/BN/Linear chains (the digits CNNs, the
RAB MNIST CNN) and pre-activation residual networks made of :class:`certkit.backdoor.models.PreActBlock` (all tensors
that write to one residual stream share a permutation). Any other architecture raises
:class:`~certkit.errors.InputError`.

Matching (:func:`match_permutations`) follows TSC's official ``permutation_utils``: per group, Pearson
correlations between the reference model's and the other model's channel activations on clean inputs
(spatial positions count as samples, ``+1e-4`` in the denominator), then a Hungarian assignment
(:func:`scipy.optimize.linear_sum_assignment`), maximising (alignment) or minimising ("un-alignment") the
total correlation; assignments are applied group by group in forward order. Because permuting one group
leaves every other group's activations unchanged (in that group's own channel order), all correlations can be
measured in one pass (the default) with the same result as re-measuring after each group (``sequential=True``,
the official loop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from certkit.backdoor.models import Normalize, PreActBlock
from certkit.errors import InputError

__all__ = [
    "PermGroup",
    "apply_permutations",
    "group_correlation",
    "match_permutations",
    "permutation_spec",
    "random_permutations",
]

_BN = nn.modules.batchnorm._BatchNorm
#: Leaf modules allowed between two weighted layers of a plain chain (element-wise or per-channel).
_PASSTHROUGH = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity, nn.Flatten)


@dataclass
class PermGroup:
    """Channels permuted together (see the module docstring). Module references are qualified names."""

    name: str
    size: int
    producers: list[str] = field(default_factory=list)
    channelwise: list[str] = field(default_factory=list)
    #: ``(module name, block)``: input columns permuted in blocks of ``block`` (1 for convolutions)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    probes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- specs
def _is_normalize(m: nn.Module) -> bool:

    return isinstance(m, Normalize)


def _trace(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Leaf modules in call order with their output shapes (one eval forward of ``example``)."""
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for name, m in model.named_modules():
        if len(list(m.children())) == 0:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.append((name, mod, tuple(out.shape)))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _chain_spec(model: nn.Module, example: torch.Tensor, head_name: str) -> list[PermGroup]:
    for name, m in model.named_modules():
        if name == "" or isinstance(m, nn.Sequential) or _is_normalize(m):
            continue
        if len(list(m.children())) > 0:
            raise InputError(f"TSC's permutation spec does not support {type(model).__name__}: nested module "
                             f"{name!r} ({type(m).__name__}) is neither a plain layer chain nor a PreActBlock "
                             "residual network")
        if not isinstance(m, (nn.Conv2d, nn.Linear, _BN, *_PASSTHROUGH)):
            raise InputError(f"TSC's permutation spec does not support layer {name!r} ({type(m).__name__}) of "
                             f"{type(model).__name__}; supported: plain Conv2d/BatchNorm/Linear chains and "
                             "PreActBlock residual networks")
    calls = _trace(model, example)
    names = [c[0] for c in calls]
    if len(set(names)) != len(names):
        raise InputError(f"TSC's permutation spec needs every layer of {type(model).__name__} to be used once")
    groups: list[PermGroup] = []
    current: PermGroup | None = None
    last_4d: tuple[int, ...] | None = None
    for name, m, shape in calls:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise InputError(f"TSC's permutation spec does not support grouped convolution {name!r}")
            if current is not None:
                if isinstance(m, nn.Conv2d):
                    if m.in_channels != current.size:
                        raise InputError(f"layer {name!r} takes {m.in_channels} channels, expected {current.size}")
                    current.consumers.append((name, 1))
                else:
                    block = 1
                    if m.in_features != current.size:
                        if last_4d is None or m.in_features != current.size * last_4d[2] * last_4d[3]:
                            raise InputError(f"cannot relate the {m.in_features} inputs of {name!r} to the "
                                             f"{current.size} channels before it")
                        block = last_4d[2] * last_4d[3]
                    current.consumers.append((name, block))
            if name == head_name:
                current = None
                continue
            size = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            current = PermGroup(name=name, size=size, producers=[name], probes=[name])
            groups.append(current)
        elif isinstance(m, _BN):
            if current is None or m.num_features != current.size:
                raise InputError(f"BatchNorm {name!r} does not follow a layer with {m.num_features} channels")
            current.channelwise.append(name)
        if len(shape) == 4:
            last_4d = shape
    if current is not None:
        raise InputError(f"the last weighted layer of {type(model).__name__} is not the classification head "
                         f"{head_name!r}")
    return groups


def _preact_spec(model: nn.Module, head_name: str) -> list[PermGroup]:

    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, PreActBlock)]
    inside = {n for bn, _ in blocks for n, _ in model.named_modules() if n == bn or n.startswith(bn + ".")}
    outside = [(n, m) for n, m in model.named_modules()
               if n not in inside and n != "" and len(list(m.children())) == 0]
    stems = [(n, m) for n, m in outside if isinstance(m, nn.Conv2d)]
    extra = [n for n, m in outside if isinstance(m, (nn.Conv2d, nn.Linear, _BN)) and n != head_name
             and (n, m) not in stems[:1]]
    if len(stems) != 1 or extra:
        raise InputError(f"TSC's residual permutation spec needs one stem Conv2d, PreActBlocks and a linear head; "
                         f"{type(model).__name__} has stem convolutions {[n for n, _ in stems]} and other "
                         f"weighted layers {extra}")
    stem_name, stem = stems[0]
    head = dict(model.named_modules())[head_name]
    stream = PermGroup(name=f"stream:{stem_name}", size=stem.out_channels, producers=[stem_name], probes=[stem_name])
    groups = [stream]
    for bname, b in blocks:
        if b.bn1.num_features != stream.size:
            raise InputError(f"block {bname!r} takes {b.bn1.num_features} channels, the stream has {stream.size}")
        stream.channelwise.append(f"{bname}.bn1")
        stream.consumers.append((f"{bname}.conv1", 1))
        sc_convs, sc_bns = [], []
        if b.shortcut is not None:
            for n, m in b.shortcut.named_modules():
                if isinstance(m, nn.Conv2d):
                    sc_convs.append(f"{bname}.shortcut.{n}")
                elif isinstance(m, _BN):
                    sc_bns.append(f"{bname}.shortcut.{n}")
            if len(sc_convs) != 1:
                raise InputError(f"the shortcut of block {bname!r} must hold one Conv2d, found {len(sc_convs)}")
            stream.consumers.append((sc_convs[0], 1))
        inner = PermGroup(name=f"{bname}.conv1", size=b.conv1.out_channels, producers=[f"{bname}.conv1"],
                          channelwise=[f"{bname}.bn2"], consumers=[(f"{bname}.conv2", 1)],
                          probes=[f"{bname}.conv1"])
        groups.append(inner)
        if b.shortcut is not None:
            stream = PermGroup(name=f"stream:{bname}", size=b.conv2.out_channels,
                               producers=[sc_convs[0], f"{bname}.conv2"], channelwise=sc_bns, probes=[bname])
            groups.append(stream)
        else:
            stream.producers.append(f"{bname}.conv2")
            stream.probes.append(bname)
    if head.in_features != stream.size:
        raise InputError(f"the head {head_name!r} takes {head.in_features} features, the last stream has "
                         f"{stream.size} channels")
    stream.consumers.append((head_name, 1))
    return groups


def permutation_spec(model: nn.Module, example: torch.Tensor, head_name: str) -> list[PermGroup]:
    """The permutation groups of ``model`` (found by structure; ``example`` is one input batch used to trace
    the layer order and the flatten sizes; ``head_name`` the classifier head, never permuted at its output).

    The spec is checked: a random permutation of every group must leave the logits on ``example`` unchanged,
    else :class:`InputError` (the architecture does something the spec cannot see).
    """

    if any(isinstance(m, PreActBlock) for m in model.modules()):
        groups = _preact_spec(model, head_name)
    else:
        groups = _chain_spec(model, example, head_name)
    if not groups:
        raise InputError(f"{type(model).__name__} has no hidden layer to permute")
    trial = copy.deepcopy(model).eval()
    apply_permutations(trial, groups, random_permutations(groups, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ref, out = model.eval()(example), trial(example)
    if not torch.allclose(ref, out, atol=1e-4, rtol=1e-4):
        raise InputError(f"TSC's permutation spec does not support {type(model).__name__}: permuting its "
                         "channels changes the network function (unsupported wiring)")
    return groups


def random_permutations(groups: list[PermGroup], generator: torch.Generator) -> list[torch.Tensor]:
    """One uniformly random permutation per group."""
    return [torch.randperm(g.size, generator=generator) for g in groups]


# ---------------------------------------------------------------------------------------------- apply
@torch.no_grad()
def apply_permutations(model: nn.Module, groups: list[PermGroup], perms: list[torch.Tensor]) -> nn.Module:
    """In place: permute every group's channels (``new channel i = old channel perms[k][i]``); returns model."""
    if len(perms) != len(groups):
        raise InputError(f"expected {len(groups)} permutations, got {len(perms)}")
    mods = dict(model.named_modules())
    for g, perm in zip(groups, perms):
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (g.size,) or not torch.equal(torch.sort(perm).values, torch.arange(g.size)):
            raise InputError(f"permutation for group {g.name!r} is not a permutation of {g.size} channels")
        for name in g.producers + g.channelwise:
            m = mods[name]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(t[perm.to(t.device)])
        for name, block in g.consumers:
            w = mods[name].weight
            p = perm.to(w.device)
            if block == 1:
                w.copy_(w[:, p])
            else:
                out = w.shape[0]
                w.copy_(w.view(out, g.size, block)[:, p, :].reshape(out, g.size * block))
    return model


# ---------------------------------------------------------------------------------------------- matching
def _activations(model: nn.Module, probes: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the probe modules on ``x`` as ``[samples, channels]`` (spatial positions are samples), in
    the order of ``probes`` (not the order in which the hooks fire)."""
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            got[name] = out.detach()
        return fn

    handles = [mods[p].register_forward_hook(hook(p)) for p in dict.fromkeys(probes)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    acts = [got[p] for p in probes]
    return [a.transpose(0, 1).reshape(a.shape[1], -1).T if a.dim() > 2 else a for a in acts]


class _Moments:
    """Running sums for the Pearson correlation of two sets of ``c`` channels."""

    def __init__(self, c: int, device: torch.device | str) -> None:
        self.s_a = torch.zeros(c, dtype=torch.float64, device=device)
        self.s_b = torch.zeros_like(self.s_a)
        self.s_aa = torch.zeros_like(self.s_a)
        self.s_bb = torch.zeros_like(self.s_a)
        self.s_ab = torch.zeros(c, c, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.s_a += a.sum(0)
        self.s_b += b.sum(0)
        self.s_aa += (a * a).sum(0)
        self.s_bb += (b * b).sum(0)
        self.s_ab += a.T @ b
        self.n += a.shape[0]

    def correlation(self, eps: float) -> torch.Tensor:
        n = self.n
        mean_a, mean_b = self.s_a / n, self.s_b / n
        std_a = (self.s_aa / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.s_bb / n - mean_b**2).clamp_min(0).sqrt()
        cov = self.s_ab / n - torch.outer(mean_a, mean_b)
        return (cov / (torch.outer(std_a, std_b) + eps)).cpu()


@torch.no_grad()
def _correlations(reference: nn.Module, model: nn.Module, groups: list[PermGroup], x: torch.Tensor, *,
                  batch_size: int, device: torch.device | str, eps: float) -> list[torch.Tensor]:
    probes = [p for g in groups for p in g.probes]
    moments = [_Moments(g.size, device) for g in groups]
    owner = [k for k, g in enumerate(groups) for _ in g.probes]
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        for k, a, b in zip(owner, _activations(reference, probes, xb), _activations(model, probes, xb)):
            moments[k].add(a, b)
    return [m.correlation(eps) for m in moments]


def group_correlation(reference: nn.Module, model: nn.Module, group: PermGroup, x: torch.Tensor, *,
                      batch_size: int = 256, device: torch.device | str = "cpu", eps: float = 1e-4) -> torch.Tensor:
    """Pearson correlation ``[size, size]`` (float64, CPU) between ``reference``'s channels (rows) and
    ``model``'s channels (columns) of ``group`` over the inputs ``x`` (eval mode; all probe outputs and all
    spatial positions pooled as samples); ``eps`` is added to the product of standard deviations."""
    return _correlations(reference, model, [group], x, batch_size=batch_size, device=device, eps=eps)[0]


def _assign(corr: torch.Tensor, maximize: bool, name: str) -> torch.Tensor:
    c = corr.numpy()
    if not np.isfinite(c).all():
        raise InputError(f"non-finite activation correlations in group {name!r}")
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def match_permutations(reference: nn.Module, model: nn.Module, groups: list[PermGroup], x: torch.Tensor, *,
                       maximize: bool, batch_size: int = 256, device: torch.device | str = "cpu",
                       sequential: bool = False) -> list[torch.Tensor]:
    """Permute ``model`` in place, group by group, to the maximum- (``maximize=True``: alignment to
    ``reference``) or minimum-correlation (``maximize=False``) channel matching; returns the permutations
    applied. Both models run in eval mode on ``device``; ``reference`` is not modified.

    ``sequential=True`` re-measures the correlations after each group's permutation is applied (one pair of
    passes over ``x`` per group, as the official code). The default measures all groups in one pair of passes
    and then applies the assignments in order: the result is the same, because a permutation of one group
    leaves the network function, hence every other group's activations (in that group's own channel order),
    unchanged; only floating-point summation order differs (checked in the tests).
    """
    reference.eval()
    model.eval()
    perms: list[torch.Tensor] = []
    if sequential:
        for g in groups:
            corr = _correlations(reference, model, [g], x, batch_size=batch_size, device=device, eps=1e-4)[0]
            perm = _assign(corr, maximize, g.name)
            apply_permutations(model, [g], [perm])
            perms.append(perm)
        return perms
    corrs = _correlations(reference, model, groups, x, batch_size=batch_size, device=device, eps=1e-4)
    for g, corr in zip(groups, corrs):
        perm = _assign(corr, maximize, g.name)
        apply_permutations(model, [g], [perm])
        perms.append(perm)
    return perms
