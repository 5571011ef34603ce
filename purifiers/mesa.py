"""MESA: max-entropy staircase approximation of the backdoor trigger distribution (GDM).

Qiao, Yang, Li, "Defending Neural Backdoors via Generative Distribution Modeling", NeurIPS 2019
(arXiv 1910.04749); official code superrrpotato/Defending-Neural-Backdoors-via-Generative-Distribution-Modeling
(``main.py``: classes ``GM``, ``Generator``, ``Mine``, ``RT``; ``gen_51_pattern_ids``). Reference notes:
``poisoning-certificates-fct-gdm.md`` sections 2, 4 and 5 (facts 6, 7 and 17).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from certkit._validation import check_choice
from certkit.backdoor.attacks import BADNETS_LOCATIONS
from certkit.backdoor.data import ArrayDataset
from certkit.devices import module_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches
from certkit.seeding import derive_seed

from ._common import check_device, check_float, check_inputs, check_positive_int
from .base import Purifier, PurifierTags
from .registry import register

#: generator input: z ~ U[0, 1]^Z_DIM, split into Z_CHUNKS chunks, chunk j concatenated into layer j
Z_DIM = 64
Z_CHUNKS = 4
#: std of the Gaussian noise added to the generated trigger while the generator trains
TRIGGER_NOISE_STD = 0.1
#: rate of MINE's exponential moving average of E[exp T] (bias-corrected gradient)
MINE_EMA_RATE = 1e-3
#: Adam betas of the generator and of MINE
ADAM_BETAS = (0.5, 0.999)
#: LeakyReLU slope of the generator and of MINE
LEAKY_SLOPE = 0.2
#: SGD momentum of the repair (weight decay 0)
REPAIR_MOMENTUM = 0.9
#: where the trigger is pasted: anywhere (one uniform draw per batch, the official setting) or at a fixed corner
LOCATIONS = ("random", "corners", *BADNETS_LOCATIONS)
#: the largest side :func:`binary_pattern_classes` enumerates (2**(side*side) patterns)
MAX_PATTERN_SIDE = 4

# seed-stream tags of derive_seed(seed, _TAG, candidate class, beta index)
_TAG_INIT, _TAG_TRAIN, _TAG_SCORE, _TAG_REPAIR = 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------- patterns
def _symmetries(p: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations / reflections of a square array, each also colour-inverted (16 images)."""
    rots = [np.rot90(p, k) for k in range(4)]
    dihedral = rots + [np.fliplr(r) for r in rots]
    return dihedral + [1 - d for d in dihedral]


def _code(p: np.ndarray) -> int:
    return int("".join(str(int(v)) for v in p.ravel()), 2)


def canonical_pattern_id(pattern: Any) -> int:
    """The class of a square binary pattern under the 8 rotations / reflections and colour inversion: the
    smallest row-major binary code (first pixel most significant) over its 16 images (GDM's pattern
    classes, reference fact 6).

    >>> canonical_pattern_id([[1, 1, 1], [1, 1, 1], [1, 1, 1]]), canonical_pattern_id([[0, 0, 0], [0, 0, 0], [0, 0, 1]])
    (0, 1)
    """
    p = np.asarray(pattern)
    if p.ndim != 2 or p.shape[0] != p.shape[1] or p.size == 0 or not np.isin(p, (0, 1)).all():
        raise InputError(f"pattern must be a square 0/1 array, got shape {p.shape}")
    return min(_code(q) for q in _symmetries(p.astype(np.int64)))


def binary_pattern_classes(side: int = 3) -> torch.Tensor:
    """One representative (the canonical one, :func:`canonical_pattern_id`) of every class of ``side x side``
    black-and-white patterns up to the 8 rotations / reflections and colour inversion, in increasing code
    order: float32 ``[n_classes, side, side]`` with values 0 / 1. For ``side = 3`` there are 51 classes, the
    official repository's "51 black and white patterns" (reference fact 6).

    >>> binary_pattern_classes(3).shape
    torch.Size([51, 3, 3])
    """
    side = check_positive_int(side, "side")
    if side > MAX_PATTERN_SIDE:
        raise InputError(f"side must be <= {MAX_PATTERN_SIDE} (2**(side*side) patterns are enumerated), got {side}")
    n = side * side
    ids = sorted({canonical_pattern_id(np.array(bits).reshape(side, side))
                  for bits in itertools.product((0, 1), repeat=n)})
    bits = [[(i >> (n - 1 - b)) & 1 for b in range(n)] for i in ids]
    return torch.tensor(bits, dtype=torch.float32).reshape(len(ids), side, side)


# ---------------------------------------------------------------------------------------------- networks
class TriggerGenerator(nn.Module):
    """G: z ~ U[0, 1]^64 -> a ``channels x side x side`` trigger in (0, 1): a 4-layer MLP (Linear, BatchNorm,
    LeakyReLU 0.2) whose layer j also receives chunk j of z (16 values: the official skip connections), and a
    sigmoid output."""

    def __init__(self, channels: int, side: int, hidden: int) -> None:
        super().__init__()
        chunk = Z_DIM // Z_CHUNKS
        self.shape = (channels, side, side)
        widths = [0] + [hidden] * (Z_CHUNKS - 1)
        self.hidden = nn.ModuleList(
            nn.Sequential(nn.Linear(w + chunk, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(LEAKY_SLOPE))
            for w in widths[:-1])
        self.out = nn.Linear(hidden + chunk, channels * side * side)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        chunks = z.chunk(Z_CHUNKS, dim=1)
        h = self.hidden[0](chunks[0])
        for layer, c in zip(self.hidden[1:], chunks[1:-1]):
            h = layer(torch.cat([h, c], dim=1))
        return torch.sigmoid(self.out(torch.cat([h, chunks[-1]], dim=1))).view(-1, *self.shape)


class MineStatistics(nn.Module):
    """MINE's statistics network T(z, t) = MLP(W_z z + W_t t + b) with two further LeakyReLU(0.2) layers
    (Belghazi et al., ICML 2018)."""

    def __init__(self, trigger_dim: int, hidden: int) -> None:
        super().__init__()
        self.fz = nn.Linear(Z_DIM, hidden)
        self.ft = nn.Linear(trigger_dim, hidden, bias=False)
        self.rest = nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE),
                                  nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.rest(self.fz(z) + self.ft(t.flatten(1))).squeeze(1)


def mine_lower_bound(t_joint: torch.Tensor, t_marginal: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan bound of I(z; G(z)): ``mean T(z, G(z)) - log mean exp T(z', G(z))``."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, dim=0) - math.log(t_marginal.numel()))


# ---------------------------------------------------------------------------------------------- stamping
def stamp(x: torch.Tensor, triggers: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """A copy of ``x`` [N, C, H, W] with trigger i ([N, C, k, k], or one [C, k, k] for all) pasted over the
    pixels ``[row : row + k, col : col + k]`` of image i."""
    k = triggers.shape[-1]
    out = x.clone()
    out[:, :, row : row + k, col : col + k] = triggers.expand(len(x), -1, -1, -1)
    return out


def _location(h: int, w: int, k: int, gen: torch.Generator, where: str = "random") -> tuple[int, int]:
    """The top-left pixel of a k x k trigger in an h x w image: uniform over the positions where it fits
    (``where="random"``, drawn from ``gen``) or the named corner."""
    if where == "random":
        return (int(torch.randint(0, h - k + 1, (1,), generator=gen)),
                int(torch.randint(0, w - k + 1, (1,), generator=gen)))
    if where == "corners":
        where = BADNETS_LOCATIONS[int(torch.randint(0, len(BADNETS_LOCATIONS), (1,), generator=gen))]
    return (h - k if where.startswith("bottom") else 0, w - k if where.endswith("right") else 0)


def _uniform_z(n: int, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    return torch.rand(n, Z_DIM, generator=gen).to(dev)


def _check_betas(betas: Any) -> tuple[float, ...]:
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) == 0:
        raise InputError(f"betas must be a non-empty list of thresholds in (0, 1), got {betas!r}")
    out = tuple(check_float(b, "betas", strict=True, maximum=1.0) for b in betas)
    if any(b >= 1.0 for b in out):
        raise InputError(f"betas must lie in (0, 1), got {betas!r}")
    return out


# ---------------------------------------------------------------------------------------------- purifier
@register
class Mesa(Purifier):
    """MESA / GDM (Qiao, Yang, Li, NeurIPS 2019): model the *distribution* of triggers that fire the backdoor
    with generators, then retrain the model on sampled triggers stamped on clean images with their true labels.

    For the target class ``c``, the testing function ``F(t)`` is the model's softmax probability of ``c`` on the
    defender's clean non-``c`` images with the ``trigger_size x trigger_size`` trigger ``t`` pasted at one
    location per batch: uniformly random by default (``location="random"``, the official setting and the
    reference's digits experiment: the position is not assumed known). The unknown trigger density is
    approximated by a staircase: one generator ``G_i`` per threshold ``beta_i`` models the uniform
    (maximum-entropy) distribution on ``{t : F(t) > beta_i}``, trained with Adam on

        ``-mean(min(F(G_i(z) + eps), beta_i)) - alpha * I(z; G_i(z))``,

    ``z ~ U[0, 1]^64``, ``eps ~ N(0, 0.1^2)``, the mutual information (the entropy surrogate) estimated by MINE
    (Donsker-Varadhan bound, :func:`mine_lower_bound`; its statistics network takes one Adam step after each
    generator step, with the bias-corrected gradient of an EMA of ``E[exp T]``). Repair: ``repair_epochs``
    passes of SGD (momentum 0.9, no weight decay) over the defender's data; epoch ``e`` draws its triggers from
    ``G_(e mod len(betas))`` (the official ensemble mode, so the staircase weights are the shares of epochs),
    one trigger per image, pasted with probability ``stamp_ratio`` at one location per batch; labels stay the
    true ones. Fitted: ``target_``, ``trigger_asr_`` (per beta, the hard ASR of sampled triggers on the
    defender's non-target images), ``detection_scores_`` (per class, with ``detect``; else None),
    ``generators_``.

    MESA needs the target class: pass ``target``, or ``detect=True`` to run the trigger search for every class
    and keep the one whose generators reach the highest ASR (the paper's detection step; ``len(betas)`` times
    the number of classes generators). ``needs_target`` tells the comparison grid to pass its target. It is a
    patch-trigger method: the trigger size is assumed known (default 3, the paper's 3x3; a trigger at least as
    large as the attack's patch) and blended, warping or sample-specific triggers are out of its model.

    Location: MESA's random placement suits backdoors trained at random positions (the paper's attack).
    certkit's BadNets patch sits at one fixed corner, which a uniform position on 8x8 images hits in 1/36 of
    the batches; ``location="corners"`` (a random corner per batch: the defender knows only that the patch is
    in some corner) or a named corner are offered for that case (extensions, not in the paper).

    Stamp ratio: the official repair stamps 1% of the images (``stamp_ratio=0.01``, the default here). On
    digits the reference measured that this dose is too small (ASR 0.84 -> 0.42-0.44, no better than plain
    fine-tuning), while 0.2 brings ASR to 0.06-0.09 at unchanged clean accuracy (section 4, fact 17); the
    ``digits`` comparison preset therefore uses 0.2, at the official placement anywhere (certkit's own
    measurements of both settings and of the corners: ``benchmarks/preset_choices.py``).

    Defaults follow the official CIFAR-10 code (reference fact 7): alpha 0.1, betas (0.9, 0.8, 0.5), hidden 512
    (2048 for CIFAR-100), Adam 2e-4 with betas (0.5, 0.999), 10 epochs, batch 128, MINE EMA rate 0.001;
    repair 10 epochs of SGD lr 1e-3, momentum 0.9, stamp ratio 0.01; the defender holds 8,000 images (16% of
    CIFAR-10's training-set size; the official code takes them from the test set).

    Differences from the official code:
        - the trigger has the data's channel count (official: 3 colour channels) and any ``trigger_size``;
          ``location`` can also be ``"corners"`` or a named corner (official: anywhere);
        - ``F`` is evaluated on the defender's images of the other classes only (official: every defender
          image; target images, already at confidence ~1, only add zero-gradient terms to the hinge);
        - the defender's data is whatever is passed in (official: 80% of the test set); the generator skips a
          final batch of one image (BatchNorm) and the repair keeps the final partial batch (official:
          ``drop_last``), so on small data no image is left out;
        - the MINE moving average starts at 1; the noisy trigger ``G(z) + eps`` is not clipped, as in the
          official code, and repair triggers are noise-free and in (0, 1);
        - every random draw (weights, z, eps, locations, stamp masks, batch order) is seeded from ``seed``
          (the repository seeds none); with ``detect``, the target is the class with the highest mean hard ASR
          of sampled triggers, one per image of the other classes (the README states the criterion only as
          "ASR ~90% for the attacked class, very low for the others"); ties go to the smaller class.

    Args:
        target: the backdoor's target class, or None (then ``detect`` must be True).
        detect: when ``target`` is None, search every class and keep the one with the highest trigger ASR.
        trigger_size: side of the square trigger in pixels (must fit the images).
        betas: the staircase thresholds, one generator each (in (0, 1)).
        alpha: weight of the MINE entropy term (>= 0; the paper's sweep: 0, 0.1, 10).
        epochs: generator passes over the defender's non-target images. lr: Adam rate of generator and MINE.
        hidden: width of the generator and MINE layers.
        batch_size: mini-batch of generator training and repair (>= 1).
        stamp_ratio: probability that a repair image gets a sampled trigger (in (0, 1]).
        repair_epochs, repair_lr: the repair's SGD budget.
        location: ``"random" | "corners" | "bottom-right" | "bottom-left" | "top-right" | "top-left"``.
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bars.
    """

    name = "mesa"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.16, changes="weights")
    #: tiny budget: no target is guessed, so a smoke run searches every class (one generator each)
    fast_params = dict(detect=True, betas=[0.9], epochs=1, hidden=32, batch_size=64, repair_epochs=1)
    needs_target = True

    def __init__(self, target: int | None = None, detect: bool = False, trigger_size: int = 3,
                 betas: Sequence[float] = (0.9, 0.8, 0.5), alpha: float = 0.1, epochs: int = 10, lr: float = 2e-4,
                 hidden: int = 512, batch_size: int = 128, stamp_ratio: float = 0.01, repair_epochs: int = 10,
                 repair_lr: float = 1e-3, location: str = "random", device: str = "auto",
                 progress: bool = False) -> None:
        self.target = target
        self.detect = detect
        self.trigger_size = trigger_size
        self.betas = betas
        self.alpha = alpha
        self.epochs = epochs
        self.lr = lr
        self.hidden = hidden
        self.batch_size = batch_size
        self.stamp_ratio = stamp_ratio
        self.repair_epochs = repair_epochs
        self.repair_lr = repair_lr
        self.location = location
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """One generator per beta, ``epochs`` passes each over the non-target images (through the model), per
        candidate target when detecting, then the repair epochs."""
        targets = num_classes if self.detect else 1
        gens = len(tuple(self.betas))
        share = (num_classes - 1) / num_classes
        return targets * gens * self.epochs * share + self.repair_epochs, (
            f"{targets} target(s) x {gens} generators x {self.epochs} epochs + {self.repair_epochs} repair epochs")

    def _validate(self) -> dict[str, Any]:
        target = self.target
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))
                                   or target < 0):
            raise InputError(f"target must be a non-negative class index or None, got {target!r}")
        if not isinstance(self.detect, (bool, np.bool_)):
            raise InputError(f"detect must be true or false, got {self.detect!r}")
        return {
            "target": None if target is None else int(target),
            "detect": bool(self.detect),
            "trigger_size": check_positive_int(self.trigger_size, "trigger_size"),
            "betas": _check_betas(self.betas),
            "alpha": check_float(self.alpha, "alpha"),
            "epochs": check_positive_int(self.epochs, "epochs"),
            "lr": check_float(self.lr, "lr", strict=True),
            "hidden": check_positive_int(self.hidden, "hidden"),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "stamp_ratio": check_float(self.stamp_ratio, "stamp_ratio", strict=True, maximum=1.0),
            "repair_epochs": check_positive_int(self.repair_epochs, "repair_epochs"),
            "repair_lr": check_float(self.repair_lr, "repair_lr", strict=True),
            "location": check_choice(self.location, LOCATIONS, "location"),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    # ------------------------------------------------------------------------------------------ search
    def _train_generator(self, victim: nn.Module, x: torch.Tensor, target: int, beta: float, index: int,
                         p: dict[str, Any], seed: int, dev: torch.device) -> TriggerGenerator:
        """One staircase step: G_i for threshold ``beta`` on the non-target images ``x``."""
        c, h, w = x.shape[1:]
        k = p["trigger_size"]
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(derive_seed(seed, _TAG_INIT, target, index))
            gen_net = TriggerGenerator(c, k, p["hidden"]).to(dev)
            mine = MineStatistics(c * k * k, p["hidden"]).to(dev)
        opt_g = torch.optim.Adam(gen_net.parameters(), lr=p["lr"], betas=ADAM_BETAS)
        opt_t = torch.optim.Adam(mine.parameters(), lr=p["lr"], betas=ADAM_BETAS)
        rng = torch.Generator().manual_seed(derive_seed(seed, _TAG_TRAIN, target, index))
        ema = torch.tensor(1.0, device=dev)
        n, bs = len(x), p["batch_size"]
        gen_net.train()
        mine.train()
        for epoch in range(p["epochs"]):
            perm = torch.randperm(n, generator=rng)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb = x[idx].to(dev)
                row, col = _location(h, w, k, rng, p["location"])
                z, z_marg = _uniform_z(len(idx), rng, dev), _uniform_z(len(idx), rng, dev)
                eps = (TRIGGER_NOISE_STD * torch.randn(len(idx), c, k, k, generator=rng)).to(dev)
                trig = gen_net(z)
                prob = F.softmax(victim(stamp(xb, trig + eps, row, col)), dim=1)[:, target]
                mi = mine_lower_bound(mine(z, trig), mine(z_marg, trig))
                loss_g = -prob.clamp(max=beta).mean() - p["alpha"] * mi
                if not bool(torch.isfinite(loss_g)):
                    raise InputError(f"mesa generator diverged at epoch {epoch + 1} (lr={p['lr']:g}); try a smaller lr")
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                # MINE: ascend the DV bound with the bias-corrected gradient (EMA of E[exp T] in the denominator)
                t_fixed = trig.detach()
                t_joint, t_marg = mine(z, t_fixed), mine(z_marg, t_fixed)
                mean_exp = t_marg.exp().mean()
                ema = (1.0 - MINE_EMA_RATE) * ema + MINE_EMA_RATE * mean_exp.detach()
                loss_t = -(t_joint.mean() - mean_exp / ema)
                opt_t.zero_grad(set_to_none=True)
                loss_t.backward()
                opt_t.step()
        return gen_net.eval()

    @torch.no_grad()
    def _trigger_asr(self, victim: nn.Module, generator: TriggerGenerator, x: torch.Tensor, target: int,
                     p: dict[str, Any], rng: torch.Generator, dev: torch.device) -> float:
        """Hard ASR of sampled triggers: the fraction of the non-target images ``x``, each with its own sampled
        trigger at a random location per batch, that the model classifies as ``target``."""
        k, bs = p["trigger_size"], p["batch_size"]
        hits = 0
        for start in range(0, len(x), bs):
            xb = x[start : start + bs].to(dev)
            row, col = _location(x.shape[2], x.shape[3], k, rng, p["location"])
            trig = generator(_uniform_z(len(xb), rng, dev))
            hits += int((victim(stamp(xb, trig, row, col)).argmax(1) == target).sum())
        return hits / len(x)

    def _search(self, victim: nn.Module, data: ArrayDataset, target: int, p: dict[str, Any], seed: int,
                dev: torch.device) -> tuple[list[TriggerGenerator], list[float]]:
        """The staircase generators for ``target`` and the hard ASR of each one's sampled triggers."""
        x = data.x[data.y != target]
        if len(x) < 2:
            raise InputError(f"mesa needs at least 2 clean images outside class {target}, got {len(x)}")
        gens, asrs = [], []
        for i, beta in enumerate(p["betas"]):
            g = self._train_generator(victim, x, target, beta, i, p, seed, dev)
            rng = torch.Generator().manual_seed(derive_seed(seed, _TAG_SCORE, target, i))
            gens.append(g)
            asrs.append(self._trigger_asr(victim, g, x, target, p, rng, dev))
        return gens, asrs

    # ------------------------------------------------------------------------------------------ repair
    def _repair(self, model: nn.Module, data: ArrayDataset, generators: list[TriggerGenerator], p: dict[str, Any],
                seed: int, dev: torch.device) -> None:
        """SGD on the defender's data with sampled triggers stamped on a ``stamp_ratio`` share of the images,
        true labels kept; epoch e uses generator e mod len(generators)."""
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise InputError("model has no trainable parameters")
        opt = torch.optim.SGD(params, lr=p["repair_lr"], momentum=REPAIR_MOMENTUM, weight_decay=0.0)
        rng = torch.Generator().manual_seed(derive_seed(seed, _TAG_REPAIR, self.target_, 0))
        n, bs, k = len(data), p["batch_size"], p["trigger_size"]
        h, w = data.x.shape[2:]
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(derive_seed(seed, _TAG_REPAIR, self.target_, 1))  # dropout, if the model has any
            with progress_bar(p["repair_epochs"] * batches(n, bs), "mesa repair", enabled=p["progress"]) as bar:
                for epoch in range(p["repair_epochs"]):
                    generator = generators[epoch % len(generators)]
                    perm = torch.randperm(n, generator=rng)
                    for start in range(0, n, bs):
                        idx = perm[start : start + bs]
                        xb, yb = data.x[idx].to(dev), data.y[idx].to(dev)
                        row, col = _location(h, w, k, rng, p["location"])
                        with torch.no_grad():
                            trig = generator(_uniform_z(len(idx), rng, dev))
                        chosen = (torch.rand(len(idx), generator=rng) < p["stamp_ratio"]).to(dev)
                        xb = torch.where(chosen[:, None, None, None], stamp(xb, trig, row, col), xb)
                        model.train()
                        loss = F.cross_entropy(model(xb), yb)
                        if not bool(torch.isfinite(loss)):
                            raise InputError(f"mesa repair diverged at epoch {epoch + 1} "
                                             f"(repair_lr={p['repair_lr']:g}); try a smaller repair_lr")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        bar.update(1)

    # ------------------------------------------------------------------------------------------ the method
    def purify(self, model: nn.Module, clean_data: Any = None, *, validation: Any = None, seed: int | None = None,
               train_data: Any = None) -> nn.Module:
        """As :meth:`Purifier.purify`; first (before any warning or work) the target class or ``detect`` and
        a trigger that fits the images are required."""
        check_inputs(model, clean_data)
        p = self._validate()
        h, w = clean_data.x.shape[2:]
        if p["trigger_size"] > min(h, w):
            raise InputError(f"mesa trigger_size {p['trigger_size']} does not fit {h}x{w} images")
        if p["target"] is None and not p["detect"]:
            raise InputError("mesa needs the target class: pass target=C (CLI: --param target=C) or detect=true "
                             "to search every class")
        if p["target"] is not None and p["target"] >= clean_data.num_classes:
            raise InputError(f"target {p['target']} is not a class of the data "
                             f"(num_classes={clean_data.num_classes})")
        return super().purify(model, clean_data, validation=validation, seed=seed, train_data=train_data)

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        num_classes = clean_data.num_classes
        dev, home = p["device"], module_device(model)
        victim = copy.deepcopy(model).to(dev).eval()
        for q in victim.parameters():
            q.requires_grad_(False)
        candidates = [p["target"]] if p["target"] is not None else list(range(num_classes))
        found: dict[int, tuple[list[TriggerGenerator], list[float]]] = {}
        bar = tqdm(candidates, desc="mesa search", disable=not p["progress"], leave=False, dynamic_ncols=True)
        for c in bar:
            found[c] = self._search(victim, clean_data, c, p, seed, dev)
        scores = {c: float(np.mean(asrs)) for c, (_, asrs) in found.items()}
        self.detection_scores_ = scores if p["target"] is None else None
        self.target_ = max(scores, key=lambda c: (scores[c], -c))
        self.generators_, asrs = found[self.target_]
        self.trigger_asr_ = dict(zip(p["betas"], asrs))
        try:
            model.to(dev)
            self._repair(model, clean_data, self.generators_, p, seed, dev)
        finally:
            model.eval()
            model.to(home)
        return model


__all__ = ["Mesa", "MineStatistics", "TriggerGenerator", "binary_pattern_classes", "canonical_pattern_id",
           "mine_lower_bound", "stamp"]
