"""TSBD: Two-Stage Backdoor Defense.

Lin, Liu, Wei, Li, Xiong, "Unveiling and Mitigating Backdoor Vulnerabilities based on Unlearning Weight
Changes and Backdoor Activeness", NeurIPS 2024 (arXiv 2405.20291); official code linweiii/TSBD
(``tsbd.py``, ``tsbd/config.yaml``; it plugs into BackdoorBench).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from certkit.devices import module_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches

from ._common import (
    check_device,
    check_float,
    check_positive_int,
)
from .base import Purifier, PurifierTags
from .registry import register

#: the neuron ratios the official script sweeps (``reinit_ratio`` in ``tsbd.py``).
OFFICIAL_N_CANDIDATES = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def shortcut_convs(model: nn.Module) -> list[str]:
    """Qualified names of the 1x1 projection-shortcut convolutions of residual blocks, found by structure.

    A shortcut conv is a 1x1 ``nn.Conv2d`` whose parent is a container (``nn.Sequential``/``ModuleList``/
    ``ModuleDict``) holding no other ``Conv2d``, while the grandparent is a non-container module (the residual
    block, with its own forward) holding further ``Conv2d`` layers: PreAct-ResNet18's ``PreActBlock.shortcut``
    and torchvision's ``downsample`` branches. A 1x1 conv placed directly in a block (bottleneck) or in a
    plain sequential chain is not a shortcut.
    """
    modules = dict(model.named_modules())
    out = []
    for name, m in modules.items():
        if not isinstance(m, nn.Conv2d) or tuple(m.kernel_size) != (1, 1) or "." not in name:
            continue
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        if not isinstance(parent, _CONTAINERS):
            continue
        if sum(isinstance(c, nn.Conv2d) for c in parent.modules()) != 1:
            continue
        grand = modules[parent_name.rpartition(".")[0]] if "." in parent_name else model
        if isinstance(grand, _CONTAINERS) or grand is model:
            continue
        if sum(isinstance(c, nn.Conv2d) for c in grand.modules()) > 1:
            out.append(name)
    return out


def scored_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` layers whose output channels are TSBD's neurons: every Conv2d except the 1x1
    shortcut convolutions (:func:`shortcut_convs`), in registration order. InputError if there is none."""
    skip = set(shortcut_convs(model))
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name not in skip]
    if not convs:
        raise InputError(f"{type(model).__name__} has no nn.Conv2d layer (other than 1x1 shortcut convolutions): "
                         "TSBD scores the output channels of convolutions")
    return convs


def neuron_weight_changes(original: nn.Module, unlearned: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Per scored conv (name, ``|W_unlearned - W_orig|`` of shape ``[out_channels, fan_in]``): the neuron weight
    change of output channel ``k`` is the sum of row ``k``. Both models must share the architecture."""
    un = dict(unlearned.named_modules())
    out = []
    for name, conv in scored_convs(original):
        dw = (un[name].weight.detach().to(conv.weight.device) - conv.weight.detach()).abs()
        out.append((name, dw.reshape(dw.shape[0], -1).cpu()))
    return out


def zero_top_weights_(model: nn.Module, changes: list[tuple[str, torch.Tensor]], n: float, m: float) -> tuple[int, int]:
    """In place on ``model`` (the original weights): take the top fraction ``n`` of neurons network-wide by
    neuron weight change (``max(1, floor(n * total))``, ties broken by registration order), pool their
    per-weight changes and zero the ``max(1, floor(m * pool))`` weights with the largest change (one global
    threshold over the pool; ties by position). Returns ``(neurons selected, weights zeroed)``."""
    nwc = torch.cat([dw.sum(1) for _, dw in changes])
    owner = [(name, k) for name, dw in changes for k in range(dw.shape[0])]
    top = max(1, int(math.floor(n * len(owner) + 1e-9)))
    neurons = torch.argsort(nwc, descending=True, stable=True)[:top].tolist()
    rows = {name: dw for name, dw in changes}
    pool = torch.cat([rows[owner[i][0]][owner[i][1]] for i in neurons])
    k = max(1, int(math.floor(m * pool.numel() + 1e-9)))
    chosen = torch.zeros(pool.numel(), dtype=torch.bool)
    chosen[torch.argsort(pool, descending=True, stable=True)[:k]] = True
    modules = dict(model.named_modules())
    start = 0
    with torch.no_grad():
        for i in neurons:
            name, ch = owner[i]
            w = modules[name].weight
            width = rows[name].shape[1]
            mask = chosen[start : start + width].view(w.shape[1:]).to(w.device)
            w[ch][mask] = 0.0
            start += width
    return top, k


def _predictions(model: nn.Module, data: Any, dev: torch.device, batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            out.append(model(data.x[s : s + batch_size].to(dev)).argmax(1).cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _accuracy(model: nn.Module, data: Any, dev: torch.device, batch_size: int) -> float:
    pred = _predictions(model, data, dev, batch_size)
    return float((pred == data.y.cpu()).sum()) / max(1, len(data))


def unlearning_done(pred: torch.Tensor, y: torch.Tensor, unlearn_acc: float) -> str | None:
    """Why the unlearning stops after an epoch with predictions ``pred`` on labels ``y``: ``"accuracy"`` when the
    accuracy is <= ``unlearn_acc`` (the official rule), ``"collapsed"`` when every prediction is one class (a
    model that answers one class has unlearned everything gradient ascent can reach: its accuracy is that
    class's share of the data, which on a small or unbalanced set can stay above ``unlearn_acc`` forever while
    the loss diverges), else None.

    >>> y = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])
    >>> unlearning_done(torch.zeros(8, dtype=torch.long), y, 0.1), unlearning_done(y, y, 0.1)
    ('collapsed', None)
    >>> unlearning_done(torch.full((8,), 7), y, 0.1)
    'accuracy'
    """
    if len(y) == 0:
        return "accuracy"
    if float((pred == y).float().mean()) <= unlearn_acc:
        return "accuracy"
    if bool((pred == pred[0]).all()):
        return "collapsed"
    return None


def _logits(model: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = model(x)
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise InputError(f"model must return logits [batch, {num_classes}], got {tuple(out.shape)}")
    return out


def regulated_step(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                   opt: torch.optim.Optimizer, r: float, alpha: float, num_classes: int) -> float:
    """One activeness-aware fine-tuning step (two passes, no model copy): ``g1 = grad L(theta)``;
    ``theta' = theta + r * g1 / ||g1||`` per parameter tensor (tensors with a zero gradient stay put);
    ``g2 = grad L(theta')``; ``theta`` and the BatchNorm buffers are restored exactly and the optimiser
    steps with ``(1 - alpha) g1 + alpha g2``. Returns ``L(theta)`` (InputError if it is not finite)."""
    loss1 = F.cross_entropy(_logits(model, x, num_classes), y)
    if not math.isfinite(float(loss1.detach())):
        raise InputError("TSBD fine-tuning diverged (non-finite loss); try a smaller lr")
    g1 = torch.autograd.grad(loss1, params, allow_unused=True)
    g1 = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g1)]
    saved = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad():
        for p, g in zip(params, g1):
            norm = g.norm()
            if float(norm) > 0:
                p.add_(g, alpha=r / float(norm))
    loss2 = F.cross_entropy(_logits(model, x, num_classes), y)
    if not math.isfinite(float(loss2.detach())):
        raise InputError("TSBD fine-tuning diverged (non-finite loss at the perturbed weights); try a smaller r")
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
        for b, s in zip(model.buffers(), buffers):
            b.copy_(s)
    for p, a, b in zip(params, g1, g2):
        p.grad = (1.0 - alpha) * a + (alpha * b if b is not None else 0.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss1.detach())


@register
class TwoStageBackdoorDefense(Purifier):
    """Two-Stage Backdoor Defense, TSBD (Lin, Liu, Wei, Li, Xiong, NeurIPS 2024, arXiv 2405.20291).

    Stage 1, *neuron weight change (NWC) based backdoor reinitialisation*:

    1. a copy of the model is *unlearned* on the clean data: gradient ascent on the cross-entropy (SGD with
       momentum 0.9, learning rate ``lr_unlearn``, no weight decay, batches in data order, BN in train mode),
       epoch by epoch until its accuracy on that data (eval mode) is <= ``unlearn_acc`` or it predicts one
       class for every sample (:func:`unlearning_done`);
    2. ``NWC_k = sum |W_unlearned[k] - W_orig[k]|`` over the weights of output channel ``k`` of every
       ``nn.Conv2d`` except the 1x1 projection shortcuts of residual blocks (:func:`shortcut_convs`, found by
       structure); the paper observes that high-NWC neurons under clean unlearning are the backdoor neurons;
    3. on the *original* weights the top fraction ``n`` of neurons network-wide by NWC is taken, their
       per-weight ``|dW|`` are pooled and the fraction ``m`` of that pool with the largest change is zeroed
       (one global threshold, :func:`zero_top_weights_`).

    Stage 2, *activeness-aware fine-tuning* on the same clean data: cross-entropy with gradient-norm
    regulation as a two-pass (SAM-like) update per batch, ``g1 = grad L(theta)``,
    ``theta' = theta + r g1/||g1||`` (per parameter tensor, as official), ``g2 = grad L(theta')``, then SGD
    (momentum 0.9, no weight decay, no schedule) with ``(1 - alpha) g1 + alpha g2``, which is to first order
    the gradient of ``L + alpha r ||grad L||`` (:func:`regulated_step`).

    Choosing ``n``: the official script sweeps ``n`` over :data:`OFFICIAL_N_CANDIDATES` and never selects.
    certkit selects on the validation split only (``tags.uses_validation``): for each candidate, from the
    largest down, stage 1 zeroing + stage 2 are run and the first (hence the largest) ``n`` whose validation
    accuracy is at least the unpurified model's validation accuracy minus ``max_val_drop`` (absolute, default
    0.05) is kept. If none qualifies, the candidate with the highest validation accuracy is kept (ties: the
    smaller ``n``) and a warning is issued. A float ``n`` skips the sweep (the validation split is still carved
    off by the base class and only reported).

    After :meth:`purify` the purifier (not the returned model) records: ``selected_n_``,
    ``base_val_acc_`` (validation accuracy of the input model), ``unlearn_epochs_``, ``unlearn_stop_``
    (``"accuracy"`` or ``"collapsed"``) and ``selection_log_``, a
    list of dicts ``{"n", "neurons", "zeroed", "val_acc", "accepted"}`` in evaluation order.

    Differences from the official code:
        - ``n`` is selected on the validation split (above) instead of being swept and reported on the test
          set; every candidate's stage 2 uses the same seed, so ``n=selected_n_`` reproduces the result;
        - the unlearning cap: the official loop stops silently after ``epochs`` (1000) and goes on with a
          model that may not be unlearned; here reaching ``max_unlearn_epochs`` without the accuracy target
          raises InputError (suggesting a larger ``lr_unlearn``), since the NWC ranking would be meaningless;
        - the unlearning also stops once the model predicts a single class for every clean sample: its
          accuracy is then that class's share, which the official 10% target presumes (a balanced CIFAR-10
          set); on 201 digits images the collapsed class held 11.4% (seed 2), accuracy never reached 0.10
          and the ascent diverged to NaN at every ``lr_unlearn`` from 1e-2 down to 1e-3 (BadNets seeds 1 and
          2 of ``benchmarks/bench_purifiers.py``);
        - stage 2 runs ``ft_epochs`` epochs (the official loop runs ``ft_epoch + 1``) and does the two passes
          on the model itself (saving and restoring weights and BN buffers) instead of a deep copy per batch;
          tensors with a zero gradient are not perturbed (the official division gives NaN);
        - the NWC ranking uses the exact values (the official code rounds them to 4 decimals in a text file
          before sorting) and exactly ``max(1, floor(m * pool))`` weights are zeroed (the official ``>=``
          threshold also zeroes ties); at least one neuron is selected (official ``int(n * total)`` may be 0);
        - the defender's data is passed in, without the training augmentation of the official loader;
          stage-2 batches are shuffled with ``seed`` (official: unshuffled); shortcuts are recognised by
          structure instead of by the name ``shortcut``.

    Defaults follow ``tsbd/config.yaml``: ``lr_unlearn`` 1e-4, unlearning cap 1000 epochs, target accuracy
    0.10, ``m`` 0.7, ``r`` 0.05, ``alpha`` 0.7, ``lr`` 0.01, momentum 0.9, 20 epochs, batch 256, 5% clean data.
    Unlearning at 1e-4 can take hundreds of epochs on a small set (881 on the digits toy, purifier-notes.md
    section 14): on a CPU pass a larger ``lr_unlearn`` (e.g. 1e-2) and fewer candidates.

    Args:
        n: fixed neuron ratio in (0, 1], or None to select it from ``n_candidates`` on validation data.
        n_candidates: candidate ratios (each in (0, 1]). max_val_drop: allowed absolute drop in validation
            accuracy (in [0, 1]). m: fraction of the pooled weights to zero (in (0, 1]).
        lr_unlearn: unlearning learning rate (> 0). max_unlearn_epochs: unlearning cap (>= 1).
        unlearn_acc: unlearning stops once the accuracy on the clean data is <= this (in [0, 1]).
        lr, momentum, ft_epochs, batch_size: stage-2 SGD settings (also the unlearning momentum and batch).
        r: perturbation radius (>= 0). alpha: weight of the perturbed gradient (in [0, 1]).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bars.
    """

    name = "tsbd"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights", uses_validation=True)
    fast_params = dict(n_candidates=(0.1, 0.5), lr_unlearn=0.01, max_unlearn_epochs=50, ft_epochs=1,
                       batch_size=64)

    def __init__(self, n: float | None = None, n_candidates: Sequence[float] = OFFICIAL_N_CANDIDATES,
                 max_val_drop: float = 0.05, m: float = 0.7, lr_unlearn: float = 1e-4,
                 max_unlearn_epochs: int = 1000, unlearn_acc: float = 0.10, lr: float = 0.01,
                 momentum: float = 0.9, ft_epochs: int = 20, r: float = 0.05, alpha: float = 0.7,
                 batch_size: int = 256, device: str = "auto", progress: bool = False) -> None:
        self.n = n
        self.n_candidates = n_candidates
        self.max_val_drop = max_val_drop
        self.m = m
        self.lr_unlearn = lr_unlearn
        self.max_unlearn_epochs = max_unlearn_epochs
        self.unlearn_acc = unlearn_acc
        self.lr = lr
        self.momentum = momentum
        self.ft_epochs = ft_epochs
        self.r = r
        self.alpha = alpha
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Stage 2 for every candidate ``n`` (two passes per epoch: the regulated step); the unlearning runs until
        the accuracy target and is not counted (1 to ``max_unlearn_epochs`` epochs: ~7 on digits at lr 1e-2,
        hundreds at the official 1e-4)."""
        cands = 1 if self.n is not None else len(tuple(self.n_candidates))
        return float(cands * self.ft_epochs * 2), (f"{cands} candidate(s) x {self.ft_epochs} fine-tune epochs x 2, "
                                                   "plus the unlearning (until the accuracy target; not counted)")

    def _validate(self) -> dict[str, Any]:
        cands = self.n_candidates
        if isinstance(cands, (str, bytes)) or not isinstance(cands, (Sequence, np.ndarray)) or len(cands) == 0:
            raise InputError(f"n_candidates must be a non-empty sequence of ratios in (0, 1], got {cands!r}")
        cands = sorted({check_float(c, "n_candidates", strict=True, maximum=1.0) for c in cands})
        return {
            "n": None if self.n is None else check_float(self.n, "n", strict=True, maximum=1.0),
            "n_candidates": cands,
            "max_val_drop": check_float(self.max_val_drop, "max_val_drop", maximum=1.0),
            "m": check_float(self.m, "m", strict=True, maximum=1.0),
            "lr_unlearn": check_float(self.lr_unlearn, "lr_unlearn", strict=True),
            "max_unlearn_epochs": check_positive_int(self.max_unlearn_epochs, "max_unlearn_epochs"),
            "unlearn_acc": check_float(self.unlearn_acc, "unlearn_acc", maximum=1.0),
            "lr": check_float(self.lr, "lr", strict=True),
            "momentum": check_float(self.momentum, "momentum", maximum=1.0 - 1e-12),
            "ft_epochs": check_positive_int(self.ft_epochs, "ft_epochs"),
            "r": check_float(self.r, "r"),
            "alpha": check_float(self.alpha, "alpha", maximum=1.0),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    # ------------------------------------------------------------------------------------------ stage 1
    def _unlearn(self, model: nn.Module, data: Any, p: dict[str, Any], dev: torch.device) -> tuple[nn.Module, int]:
        unlearned = copy.deepcopy(model)
        params = [q for q in unlearned.parameters() if q.requires_grad]
        if not params:
            raise InputError("model has no trainable parameters")
        opt = torch.optim.SGD(params, lr=p["lr_unlearn"], momentum=p["momentum"], weight_decay=0.0)
        bs, k = p["batch_size"], data.num_classes
        bar = tqdm(range(p["max_unlearn_epochs"]), desc="tsbd unlearn", disable=not p["progress"], leave=False,
                   dynamic_ncols=True)
        for epoch in bar:
            unlearned.train()
            for s in range(0, len(data), bs):
                x, y = data.x[s : s + bs].to(dev), data.y[s : s + bs].to(dev)
                loss = F.cross_entropy(_logits(unlearned, x, k), y)
                if not math.isfinite(float(loss.detach())):
                    raise InputError(f"TSBD unlearning diverged at epoch {epoch + 1} "
                                     f"(lr_unlearn={p['lr_unlearn']:g}); try a smaller lr_unlearn")
                opt.zero_grad(set_to_none=True)
                (-loss).backward()
                opt.step()
            if not all(bool(torch.isfinite(q).all()) for q in params):  # NaN logits would look "collapsed"
                raise InputError(f"TSBD unlearning diverged at epoch {epoch + 1} (non-finite weights; "
                                 f"lr_unlearn={p['lr_unlearn']:g}); try a smaller lr_unlearn")
            pred = _predictions(unlearned, data, dev, bs)
            acc = float((pred == data.y.cpu()).float().mean())
            bar.set_postfix(acc=f"{acc:.3f}")
            self.unlearn_stop_ = unlearning_done(pred, data.y.cpu(), p["unlearn_acc"])
            if self.unlearn_stop_ is not None:
                unlearned.eval()
                return unlearned, epoch + 1
        raise InputError(f"TSBD unlearning did not bring the clean accuracy to <= {p['unlearn_acc']:g} within "
                         f"max_unlearn_epochs={p['max_unlearn_epochs']} (last accuracy {acc:.3f}); use a larger "
                         f"lr_unlearn (now {p['lr_unlearn']:g}) or a larger max_unlearn_epochs")

    # ------------------------------------------------------------------------------------------ stage 2
    def _finetune(self, model: nn.Module, data: Any, p: dict[str, Any], dev: torch.device, seed: int,
                  desc: str) -> None:
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.SGD(params, lr=p["lr"], momentum=p["momentum"], weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        bs, n = p["batch_size"], len(data)
        model.train()
        with progress_bar(p["ft_epochs"] * batches(n, bs), desc, enabled=p["progress"]) as bar:
            for epoch in range(p["ft_epochs"]):
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for s in range(0, n, bs):
                    idx = perm[s : s + bs]
                    x, y = data.x[idx].to(dev), data.y[idx].to(dev)
                    total += regulated_step(model, params, x, y, opt, p["r"], p["alpha"], data.num_classes) * len(idx)
                    bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{p['ft_epochs']}", loss=f"{total / n:.4f}")
        model.eval()

    # ------------------------------------------------------------------------------------------ purify
    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        self.selected_n_: float | None = None
        self.base_val_acc_: float | None = None
        self.unlearn_epochs_: int | None = None
        self.unlearn_stop_: str | None = None
        self.selection_log_: list[dict[str, Any]] = []
        scored_convs(model)  # InputError early when there is nothing to score
        if not any(q.requires_grad for q in model.parameters()):
            raise InputError("model has no trainable parameters")
        dev, home = p["device"], module_device(model)
        rng_devices = [dev] if dev.type == "cuda" else []
        model.to(dev).eval()
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                has_val = validation is not None and len(validation) > 0
                if has_val:
                    self.base_val_acc_ = _accuracy(model, validation, dev, p["batch_size"])
                unlearned, self.unlearn_epochs_ = self._unlearn(model, clean_data, p, dev)
                changes = neuron_weight_changes(model, unlearned)
                del unlearned
                candidates = [p["n"]] if p["n"] is not None else sorted(p["n_candidates"], reverse=True)
                if p["n"] is None and not has_val:
                    raise InputError("TSBD selects n on validation data, but the validation split is empty; "
                                     "pass validation=... or a fixed n")
                best: tuple[float, float, dict[str, torch.Tensor]] | None = None
                chosen: nn.Module | None = None
                bar = tqdm(candidates, desc="tsbd n", disable=not p["progress"] or len(candidates) == 1,
                           leave=False, dynamic_ncols=True)
                for n in bar:
                    cand = copy.deepcopy(model)
                    neurons, zeroed = zero_top_weights_(cand, changes, n, p["m"])
                    self._finetune(cand, clean_data, p, dev, seed, desc=f"tsbd ft n={n:g}")
                    val_acc = _accuracy(cand, validation, dev, p["batch_size"]) if has_val else None
                    ok = p["n"] is not None or val_acc >= self.base_val_acc_ - p["max_val_drop"] - 1e-12
                    self.selection_log_.append({"n": n, "neurons": neurons, "zeroed": zeroed, "val_acc": val_acc,
                                                "accepted": bool(ok)})
                    if ok:
                        chosen, self.selected_n_ = cand, n
                        break
                    if best is None or val_acc >= best[1]:  # descending n: ties go to the smaller n
                        best = (n, val_acc, {kk: v.detach().clone() for kk, v in cand.state_dict().items()})
                if chosen is None:
                    n, val_acc, state = best
                    warnings.warn(f"TSBD: no candidate n kept the validation accuracy within max_val_drop="
                                  f"{p['max_val_drop']:g} of {self.base_val_acc_:.3f}; using n={n:g} "
                                  f"(highest validation accuracy {val_acc:.3f})", stacklevel=3)
                    model.load_state_dict(state)
                    chosen, self.selected_n_ = model, n
        finally:
            model.eval()
            model.to(home)
        chosen.eval()
        return chosen.to(home)


__all__ = ["OFFICIAL_N_CANDIDATES", "TwoStageBackdoorDefense", "neuron_weight_changes", "regulated_step",
           "scored_convs", "shortcut_convs", "zero_top_weights_"]
