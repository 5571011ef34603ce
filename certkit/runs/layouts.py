"""Member layouts of aggregation ensembles (Mode D): which training samples each member sees.

An ensemble run (:mod:`certkit.runs.ensemble_train`) has one of four layouts (``EnsembleSpec.layout``):

* ``full-noise`` (RAB): every member sees the whole (noised) training set; no function here applies.
* ``partition`` (DPA, Levine & Feizi, ICLR 2021): ``k`` members; sample ``j`` goes to partition
  ``dpa_partition(x_j, k)``, a hash of its pixels alone; each member's samples are ordered by content
  (:func:`certkit.certify.aggregation.order_within_partitions`), so a member is a function of its partition's
  *contents* only, as the certificate assumes. With ``versions = V`` (DPA*, "boosted DPA"), ``k * V`` members,
  ``V`` seeded versions per partition, averaged into one vote per partition at certification.
* ``finite-aggregation`` (FA, Wang, Levine & Feizi, ICML 2022): ``k * d`` members; the samples are hashed into
  ``k * d`` buckets and bucket ``h`` belongs to the ``d`` subsets ``(h + shift_i) mod kd``; the shifts are drawn
  with the seed ``derive_seed(run seed, STREAM_LAYOUT, 0) mod 2**32``.
* ``bootstrap`` (bagging, Jia, Cao & Gong, AAAI 2021): ``members`` draws of ``k`` sample indices with
  replacement, seeded the same way.

The hash reads the training images as the defender received them (poisoned samples included), clipped to
``[0, 1]`` (an unclipped additive trigger may leave that range; any content-only hash is sound). The
:class:`~certkit.certify.aggregation.Layout` (kind, k, d, shifts, hash rule, draws, seeds, member -> subset map)
is stored in the run as ``layout.json``; every certificate is checked against it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from certkit.backdoor.data import ArrayDataset
from certkit.certify.aggregation import (
    Layout,
    bootstrap_subsets,
    dpa_partition,
    finite_aggregation_subsets,
    order_within_partitions,
)
from certkit.errors import InputError
from certkit.seeding import STREAM_LAYOUT, derive_seed

__all__ = ["LAYOUTS", "LAYOUT_FILE", "MemberLayout", "layout_seed", "member_layout"]

#: ``EnsembleSpec.layout`` values: RAB's ``full-noise`` and the three aggregation layouts.
LAYOUTS: tuple[str, ...] = ("full-noise", "partition", "finite-aggregation", "bootstrap")
#: run-directory file holding the :class:`~certkit.certify.aggregation.Layout` record
LAYOUT_FILE = "layout.json"


def layout_seed(seed: int) -> int:
    """The 32-bit seed of a run's FA shifts or bootstrap draws.

    >>> layout_seed(0) == layout_seed(0) != layout_seed(1)
    True
    """
    return derive_seed(int(seed), STREAM_LAYOUT, 0) % 2**32


class MemberLayout:
    """A run's :class:`~certkit.certify.aggregation.Layout` and the training indices of each member.

    Attributes:
        layout: the record (stored as ``layout.json``).
        indices: ``indices[m]``, int64 indices into the training set that member ``m`` trains on (in content
            order for ``partition`` and ``finite-aggregation``; in draw order, repeats included, for
            ``bootstrap``).
    """

    def __init__(self, layout: Layout, indices: list[np.ndarray]) -> None:
        self.layout = layout
        self.indices = indices

    def record(self) -> dict[str, Any]:
        """The JSON record: the layout plus each member's sample count."""
        return {"layout": self.layout.to_dict(), "member_sizes": [int(len(i)) for i in self.indices]}


def _pixels(train: ArrayDataset) -> np.ndarray:
    return train.x.detach().cpu().clamp(0.0, 1.0).numpy()


def member_layout(kind: str, train: ArrayDataset, *, k: int, d: int | None = None, members: int | None = None,
                  seed: int = 0, versions: int | None = None) -> MemberLayout:
    """The member layout ``kind`` of ``train`` (see the module docstring).

    Args:
        kind: ``"partition"``, ``"finite-aggregation"`` or ``"bootstrap"``.
        train: the (possibly poisoned) training set the members learn from.
        k: partitions (DPA), FA's ``k`` (``k * d`` members) or bagging's bootstrap size.
        d: FA's subsets per sample. members: bagging's number of draws. seed: the run seed.
        versions: partition only: members per partition (DPA*; member ``m`` trains on partition ``m // versions``,
            its own seed gives each version its initialisation and batch order).

    Raises :class:`~certkit.errors.InputError` when ``k`` exceeds the training set or a partition/subset is
    empty (naming which and how many).

    >>> import torch
    >>> data = ArrayDataset(torch.rand(40, 1, 4, 4), torch.arange(40) % 2, num_classes=2)
    >>> lay = member_layout("partition", data, k=3)
    >>> lay.layout.kind, sorted(int(i) for m in lay.indices for i in m) == list(range(40))
    ('partition', True)
    """
    n = len(train)
    if kind not in LAYOUTS[1:]:
        raise InputError(f"unknown aggregation layout {kind!r}; choose one of {', '.join(LAYOUTS[1:])}")
    if kind in ("partition", "finite-aggregation"):
        pieces = k if kind == "partition" else k * int(d or 0)
        if pieces > n:
            raise InputError(f"the {kind} layout needs {pieces} non-empty subsets but the training set has only "
                             f"{n} samples; lower k" + (" or d" if kind == "finite-aggregation" else ""))
    pixels = _pixels(train)
    labels = train.y.numpy()
    if kind == "partition":
        part = dpa_partition(pixels, k)
        pieces = order_within_partitions(part, pixels, labels, k)
        v = 1 if versions is None else int(versions)
        subset = [m // v for m in range(k * v)]
        return MemberLayout(Layout.dpa(k, member_subset=subset, versions=v), [pieces[p] for p in subset])
    if versions not in (None, 1):
        raise InputError(f"versions apply to the partition layout (DPA*) only, not {kind!r}")
    s = layout_seed(seed)
    if kind == "finite-aggregation":
        if d is None:
            raise InputError("the finite-aggregation layout needs d (subsets per sample, >= 1)")
        buckets = dpa_partition(pixels, k * d, allow_empty=True)
        subsets = finite_aggregation_subsets(buckets, k, d, seed=s)
        return MemberLayout(Layout.fa(k, d, seed=s), order_within_partitions(subsets, pixels, labels, k * d))
    if members is None:
        raise InputError("the bootstrap layout needs the number of draws (members)")
    draws = bootstrap_subsets(n, k, members, seed=s)
    layout = Layout("bootstrap", n_train=n, bootstrap_size=k, num_draws=members, seed=s,
                    member_subset=tuple(range(members)))
    return MemberLayout(layout, [draws[m] for m in range(members)])
