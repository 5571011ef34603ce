"""``certkit compare``: empirical against certified backdoor robustness, attacks x defenses in one grid.

A :class:`CompareSpec` (a YAML/JSON file, flags, or the ``digits`` preset) names a dataset, attacks, poison
rates, defenses and smoothing settings. :func:`run_compare` runs every *cell* (one attack at one poison rate
against one defense) on this machine (joblib) or on a Dask cluster and writes one *comparison directory*::

    <out>/
      manifest.json          kind "compare", the spec and its canonical sha256 (a resume must match it)
      models/backdoored-<attack>.pt   the undefended model of each attack x rate (hashed; not retrained)
      cells/<cell_id>.json   one finished cell each (written atomically; kept on resume)
      ensembles/<cell_id>/   the ensemble run directory of a RAB or Cert-SSB cell (members kept on resume)
      table.csv, table.md    the tidy table, one row per cell, rebuilt from cells/
      plots/asr_vs_ctr.png, plots/certified_accuracy_<attack>.png

Cells (the ``defenses`` of the spec):

* ``undefended``: the backdoored model itself (the "before" of every other cell of its attack);
* a purifier name (:func:`purifiers.available`): purify with the defender's clean data (``clean_fraction``
  of the *clean* training set, fixed seed; methods that select carve their validation split off it),
  measure CA / ASR / RA / DER, and optionally the ASR after a re-activation fine-tune on a few poisoned
  samples (``reactivation``);
* every model above is then smoothed at test time: a short Gaussian-noise fine-tune on the defender's clean
  data (:func:`certkit.backdoor.training.noise_finetune`, ``noise_finetune_epochs``) and Cohen et al.'s CERTIFY at
  ``sigma`` on the clean test set: certified accuracy at ``radii``, ACR and certified trigger robustness
  (non-target points certified correct beyond the trigger's l2 norm at that point; each certificate holds at
  ``1 - alpha`` on its own, and ``asr_bound_95`` is the whole-test-set bound on the smoothed ASR that holds with
  probability >= 0.95, :func:`certkit.certify.metrics.simultaneous_asr_bound`);
* ``rab``: a training-time smoothed ensemble (RAB, Weber et al. 2023) of ``ensemble_members`` models
  trained on the poisoned data with noise ``sigma``, certified with the joint trigger norm
  ``sqrt(sum_j ||Delta_j||^2 + ||t||^2)`` (:mod:`certkit.runs.ensemble_certify`);
* ``cert-ssb``: the same with sample-specific training and test scales (Cert-SSB; certificates hold
  conditional on the data-chosen scales, radius in test-sigma units, CTR by the weighted condition);
* ``fct-st``: FCT's D-ST, a model trained from the poisoned data (:mod:`certkit.runs.compare.fct_cells`),
  then measured and smoothed like a purified model; ``fct-br`` purifier rows (and this one) carry the SD
  split's sizes and precision / recall against the true poison indices (``split``);
* ``ds-column``, ``ds-block``, ``dpa``, ``dpa-roe``, ``dpa-joint`` and the PatchCleanser columns of the
  model cells: patch and poisoning-count certificates (:mod:`certkit.runs.compare.certificate_cells`), each
  CTR in its own unit (``patch_ctr``: at the trigger's patch side; ``ctr_samples``: at the attack's number of
  poisoned samples).

A cell that cannot run (a purifier that is not registered: reason ``not available``; a BatchNorm method on a
model without BatchNorm; any other certkit error) is recorded as ``skipped`` with its reason and the rest of
the grid goes on; an unexpected exception is recorded as ``failed``. On resume, ``ok`` and ``skipped`` cells
are kept, except ``not available`` cells of a defense that has been registered since, and ``failed`` cells
are retried. Delete ``cells/<cell_id>.json`` to recompute one cell.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import purifiers
from certkit.backdoor.metrics import defense_effectiveness_rating, empirical_metrics
from certkit.backdoor.models import build_model
from certkit.backdoor.prepare import DataConfig, PreparedData, prepare_data
from certkit.backdoor.training import noise_finetune, train_model
from certkit.certify.metrics import certified_trigger_robustness, simultaneous_asr_bound
from certkit.certify.smoothing import RandomizedSmoothing
from certkit.devices import resolve_device
from certkit.errors import CertkitError, RecordError
from certkit.io import to_jsonable
from certkit.parallel import check_backend, check_n_jobs, check_scheduler, map_tasks
from certkit.runs.budget import announce, seconds_per_input
from certkit.runs.compare.certificate_cells import (
    ABLATION_CELLS,
    AGGREGATION_CELLS,
    ablation_cell,
    aggregation_cell,
    patchcleanser_columns,
)
from certkit.runs.compare.fct_cells import TRAINING_CELLS, fct_st_model
from certkit.runs.compare.plots import write_plots
from certkit.runs.compare.spec import (
    ASR_BOUND_DELTA,
    NOT_AVAILABLE,
    RUN_KIND,
    CompareSpec,
)
from certkit.runs.compare.table import write_table
from certkit.runs.ensemble_certify import EnsembleCertifyConfig, certify_ensemble_run
from certkit.runs.ensemble_train import EnsembleSpec, train_ensemble
from certkit.runs.rundir import RunDirectory
from purifiers.reactivation import reactivation_asr as _reactivation_asr


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _Data:
    """A cell's data: the prepared attack data, the defender's clean set and the certified test points."""

    prepared: PreparedData
    clean: Any
    keep: np.ndarray

    @property
    def splits(self) -> Any:
        return self.prepared.splits

    @property
    def attack(self) -> Any:
        return self.prepared.attack

    @property
    def poisoned(self) -> Any:
        return self.prepared.poisoned

    @property
    def triggered(self) -> Any:
        return self.prepared.triggered


def cell_data_config(spec: CompareSpec, cell: Mapping[str, Any]) -> DataConfig:
    """The :class:`~certkit.backdoor.prepare.DataConfig` of a cell's attack (the same data a single run, an
    ensemble or a purify run with these settings sees)."""
    return DataConfig(dataset=spec.dataset, data_root=spec.data_root, attack=cell["attack"],
                      attack_params=cell["attack_params"], poison_rate=cell["poison_rate"], target=spec.target,
                      seed=spec.seed)


def _data(spec: CompareSpec, cell: Mapping[str, Any]) -> _Data:
    """Deterministic data of a cell's attack (the prepared data is cached per process)."""
    prepared = prepare_data(cell_data_config(spec, cell))
    clean = prepared.defender_clean(spec.clean_fraction)
    n_test = len(prepared.splits.test)
    if spec.max_points is not None and spec.max_points < n_test:
        keep = np.sort(np.random.default_rng(spec.seed).permutation(n_test)[: spec.max_points])
    else:
        keep = np.arange(n_test)
    return _Data(prepared, clean, keep)


def backdoored_name(key: str) -> str:
    return f"backdoored-{key}"


def _train_backdoored(run: RunDirectory, spec: CompareSpec, cell: Mapping[str, Any], device: str,
                      log: Any) -> None:
    """Train (once) the undefended model of an attack x rate into ``models/``."""

    name = backdoored_name(cell["attack_key"])
    if run.has_model(name):
        return
    data = _data(spec, cell)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, num_classes=data.splits.num_classes, input_shape=data.splits.input_shape,
                            mean=data.splits.mean, std=data.splits.std)
    t0 = time.perf_counter()
    train_model(model, data.poisoned.dataset, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                seed=spec.seed, device=device, progress=False, desc=f"train {name}")
    run.save_model(name, model.cpu(), model.certkit_spec)
    run.record_timing(f"train/{name}", time.perf_counter() - t0)
    log(f"[compare] trained {name} ({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------- cells
def purifier_budget(spec: CompareSpec, name: str) -> dict[str, Any]:
    """The parameters a purifier cell uses: official defaults, lowered by ``budget_caps``, the spec's ``target``
    for methods that take the target class (``needs_target``, e.g. MESA), then the spec's ``purifier_params``
    (``device``/``progress`` excluded). Raises :class:`UnknownNameError` when ``name`` is not registered."""
    import inspect

    cls = type(purifiers.make(name))
    params: dict[str, Any] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "device", "progress") or p.default is inspect.Parameter.empty:
            continue
        params[p.name] = p.default
        cap = spec.budget_caps.get(p.name)
        if cap is not None and isinstance(p.default, int) and not isinstance(p.default, bool) and p.default > cap:
            params[p.name] = cap
    if cls.needs_target:
        params["target"] = spec.target
    params.update(spec.purifier_params.get(name, {}))
    return json.loads(json.dumps(params, default=str))


def reactivation_asr(model: torch.nn.Module, poisoned: Any, triggered: Any, *, samples: int, epochs: int,
                     lr: float, seed: int, device: str) -> float:
    """ASR of ``model`` after a retuning attack (:func:`purifiers.reactivation.reactivation_asr`: SGD,
    momentum 0.9, on ``samples`` poisoned training samples in one batch for ``epochs``; Min et al., NeurIPS
    2024: 5 samples, 5 epochs)."""

    return float(_reactivation_asr(model, poisoned, triggered, n_samples=samples, epochs=epochs, lr=lr,
                                   batch_size=samples, seed=seed, device=device))


def _curve(res: Any) -> dict[str, Any]:
    radii = np.sort(res.radius[res.correct]).tolist()
    return {"n_points": len(res), "correct_radii": [round(float(r), 6) for r in radii]}


def _smoothed(spec: CompareSpec, model: torch.nn.Module, data: _Data, device: str) -> dict[str, Any]:
    """Noise fine-tune ``model`` on the defender's clean data, certify the clean test set at ``sigma``."""

    t0 = time.perf_counter()
    tuned = noise_finetune(model, data.clean, sigma=spec.sigma, epochs=spec.noise_finetune_epochs,
                           lr=spec.noise_finetune_lr, seed=spec.seed, device=device, progress=False)
    test, keep = data.splits.test, data.keep
    norms = data.attack.trigger_norms(test.x[keep])
    res = RandomizedSmoothing(tuned, data.splits.num_classes, spec.sigma, batch_size=spec.certify_batch_size,
                              device=device, seed=spec.seed, progress=False).certify(
        test.x[keep], test.y[keep], n0=spec.n0, n=spec.n, alpha=spec.alpha, ids=torch.as_tensor(keep),
        trigger_norm=norms)
    ctr = certified_trigger_robustness(res, target=spec.target)
    nt = test.y[keep].numpy() != spec.target
    bound = simultaneous_asr_bound(ctr, int(nt.sum()), spec.alpha, ASR_BOUND_DELTA) if nt.any() else None
    return {
        "smoothed_ca": res.accuracy(),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(spec.radii, np.atleast_1d(res.certified_accuracy(list(spec.radii))))},
        "acr": res.acr(), "abstain_rate": res.abstain_rate(), "ctr": ctr,
        "asr_bound_95": None if bound is None else bound.bound,
        "trigger_norm": float(np.median(norms.numpy()[nt])) if nt.any() else None,
        "certify_s": time.perf_counter() - t0, "curve": _curve(res),
    }


def _before(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, data: _Data, device: str
            ) -> tuple[torch.nn.Module, Any]:

    model = run.load_model(backdoored_name(cell["attack_key"]), device="cpu")
    return model, empirical_metrics(model, data.splits.test.x, data.splits.test.y, data.triggered, device=device)


def _purifier_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, device: str) -> dict[str, Any]:

    name = cell["defense"]
    data = _data(spec, cell)
    model, before = _before(spec, cell, run, data, device)
    row: dict[str, Any] = {"kind": "undefended" if name == "undefended" else "purifier",
                           "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate}
    if name == "undefended":
        purified, after, row["budget"] = model, before, {}
    elif name in TRAINING_CELLS:  # fct-st: a model trained from the poisoned data, measured like a purified one
        purified, row["budget"], extra = fct_st_model(spec, cell, run, data, device,
                                                      sd_params=purifier_budget(spec, "fct-br"))
        row.update(kind="training", **extra)
        after = empirical_metrics(purified, data.splits.test.x, data.splits.test.y, data.triggered, device=device)
    else:
        if name not in purifiers.available():
            return {**row, "status": "skipped", "reason": NOT_AVAILABLE}
        params = purifier_budget(spec, name)
        row["budget"] = params
        method = purifiers.make(name, **params, device=device, progress=False)
        t0 = time.perf_counter()
        train = {"train_data": data.poisoned.dataset} if type(method).tags.needs_training_set else {}
        purified = method.purify(model, data.clean, seed=spec.seed, **train)
        row["purify_s"] = time.perf_counter() - t0
        if getattr(method, "split_", None) is not None:  # FCT: split sizes and precision / recall (diagnostic)
            row["split"] = method.split_.record(data.poisoned.poison_indices)
        after = empirical_metrics(purified, data.splits.test.x, data.splits.test.y, data.triggered, device=device)
    row.update(ca=after.clean_accuracy, asr=after.attack_success_rate, ra=after.robust_accuracy,
               der=defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate,
                                                after.clean_accuracy, after.attack_success_rate))
    if spec.reactivation:
        row["reactivation_asr"] = reactivation_asr(purified, data.poisoned, data.triggered,
                                                   samples=spec.reactivation_samples,
                                                   epochs=spec.reactivation_epochs, lr=spec.reactivation_lr,
                                                   seed=spec.seed, device=device)
    row.update(_smoothed(spec, purified, data, device))
    if spec.patchcleanser:
        row.update(patchcleanser_columns(spec, purified, data, device))
    return {**row, "status": "ok", "reason": ""}


def _certificate_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, device: str) -> dict[str, Any]:
    data = _data(spec, cell)
    _, before = _before(spec, cell, run, data, device)
    if cell["defense"] in ABLATION_CELLS:
        return ablation_cell(spec, cell, run, data, before, device)
    return aggregation_cell(spec, cell, run, data, before, device)


def _ensemble_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, device: str) -> dict[str, Any]:

    ssb = cell["defense"] == "cert-ssb"
    data = _data(spec, cell)
    _, before = _before(spec, cell, run, data, device)
    espec = EnsembleSpec(dataset=spec.dataset, data_root=spec.data_root, model=spec.model, attack=cell["attack"],
                         attack_params=cell["attack_params"], poison_rate=cell["poison_rate"], target=spec.target,
                         members=spec.ensemble_members, sigma=spec.sigma, epochs=spec.ensemble_epochs,
                         seed=spec.seed,
                         **({"noise": "sample-specific", "sigma_steps": spec.ssb_sigma_steps,
                             "sigma_lr": spec.ssb_sigma_lr} if ssb else {}))
    sub = train_ensemble(espec, run.path / "ensembles" / cell["id"], n_jobs=1, device=device, progress=False,
                         log=lambda *_: None)
    summary = certify_ensemble_run(sub, EnsembleCertifyConfig(alpha=spec.alpha, max_points=spec.max_points,
                                                              seed=spec.seed, radii=tuple(spec.radii)),
                                   device=device, progress=False, log=lambda *_: None)
    ens = summary["ensemble"]
    frame = sub.read_frame("points.csv")
    clean = frame[frame["set"] == "clean"]
    radii = np.sort(clean["radius"].to_numpy()[clean["correct"].to_numpy().astype(bool)])
    ctr = ens["certified_trigger_robustness"]
    ca, asr = ens["ensemble_clean_accuracy"], ens["ensemble_asr"]
    return {
        "kind": cell["defense"], "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate,
        "budget": {"members": spec.ensemble_members, "epochs": spec.ensemble_epochs,
                   **({"sigma_steps": spec.ssb_sigma_steps, "sigma_lr": spec.ssb_sigma_lr} if ssb else {})},
        "ca": ca, "asr": asr, "ra": None,
        "der": defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate, ca, asr),
        "smoothed_ca": ens["certified_accuracy"].get("0", float(np.mean(clean["correct"]))),
        "certified_accuracy": ens["certified_accuracy"], "acr": ens["acr"], "abstain_rate": ens["abstain_rate"],
        "ctr": ctr, "ctr_conditional": ens.get("certified_trigger_robustness_conditional_on_scales"),
        "asr_bound_95": (ens.get("asr_bound") or {}).get("bound"),
        "trigger_norm": ens.get("joint_trigger_norm_median"),
        "curve": {"n_points": int(len(clean)), "correct_radii": [round(float(r), 6) for r in radii]},
        "note": ("joint trigger norm; radius in test-sigma units; no CTR holds whatever training scales the data "
                 "induce, so ctr is empty and ctr_conditional holds only for the data-chosen scales as fixed"
                 if ssb else "joint trigger norm sqrt(sum ||Delta_j||^2 + ||t||^2)"),
        "status": "ok", "reason": "",
    }


def run_cell(spec_dict: Mapping[str, Any], cell: Mapping[str, Any], out: str, device: str = "cpu") -> dict[str, Any]:
    """Run one cell and return its row (never raises: failures become ``skipped``/``failed`` rows).

    Pure and idempotent given the comparison directory (module level, so joblib and Dask pickle it by
    reference); it reads the backdoored model from ``out`` and writes only ``out/ensembles/<cell_id>``.
    """
    spec = CompareSpec.from_dict(spec_dict)
    base = {"cell_id": cell["id"], "attack": cell["attack"], "attack_params": cell["attack_params"],
            "poison_rate": cell["poison_rate"], "defense": cell["defense"], "spec_sha256": spec.sha256()}
    t0 = time.perf_counter()
    try:
        run = RunDirectory.open(out)
        if cell["defense"] in ("rab", "cert-ssb"):
            row = _ensemble_cell(spec, cell, run, device)
        elif cell["defense"] in ABLATION_CELLS or cell["defense"] in AGGREGATION_CELLS:
            row = _certificate_cell(spec, cell, run, device)
        else:
            row = _purifier_cell(spec, cell, run, device)
    except CertkitError as exc:
        row = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a bug in one method must not abort the grid
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        row = {"status": "failed", "reason": tb}

    return to_jsonable({**base, **row, "wall_s": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- grid
def _open_dir(out: str | os.PathLike, spec: CompareSpec) -> RunDirectory:
    root = Path(out)
    sha = spec.sha256()
    if (root / "manifest.json").exists():
        run = RunDirectory.open(root)
        stored = run.config.get("spec_sha256") if run.kind == RUN_KIND else None
        if stored != sha:
            what = f"a {run.kind!r} run" if run.kind != RUN_KIND else f"another spec (sha256 {str(stored)[:12]})"
            raise RecordError(f"comparison directory {root} holds {what}, not this spec (sha256 {sha[:12]}); "
                              "refusing to mix results: use a new --out directory")
        return run
    return RunDirectory.create(root, {"compare": spec.to_dict(), "spec_sha256": sha}, kind=RUN_KIND)


def _finished(run: RunDirectory, cid: str, sha: str, registered: Sequence[str]) -> dict[str, Any] | None:
    rel = f"cells/{cid}.json"
    if rel not in run.manifest["files"]:
        return None
    try:
        row = run.read_json(rel)
    except (RecordError, OSError, ValueError):
        return None
    if row.get("spec_sha256") != sha or row.get("status") not in ("ok", "skipped"):
        return None
    if row.get("status") == "skipped" and row.get("reason") == NOT_AVAILABLE and row.get("defense") in registered:
        return None
    return row


def cell_line(row: Mapping[str, Any]) -> str:
    """The log line of a finished cell: its status, CA, ASR, each CTR it has and its seconds."""
    head = f"[compare] {row['cell_id']}: {row['status']}"
    tail = f" ({row.get('wall_s') or 0.0:.1f} s)"
    if row["status"] != "ok":
        return f"{head}: {row.get('reason', '')}{tail}"
    parts = [f"{label} {row[key]:.3f}" for key, label in (
        ("ca", "CA"), ("asr", "ASR"), ("ctr", "CTR"), ("ctr_conditional", "CTR(conditional)"),
        ("patch_ctr", "patch CTR"), ("ctr_samples", "CTR(samples)"))
        if isinstance(row.get(key), (int, float)) and not np.isnan(row[key])]
    return f"{head}  " + "  ".join(parts) + tail


def _announce_cells(run: RunDirectory, spec: CompareSpec, todo: Sequence[Mapping[str, Any]], reused: int,
                    device: str | None, workers: int, log: Any) -> None:
    """The budget line of :func:`run_compare`: the cells to run and the forward passes of the test-time
    smoothing cells' certification, timed on the first backdoored model (no estimate on a Dask cluster,
    ``device`` None)."""
    other = ("rab", "cert-ssb", *ABLATION_CELLS, *AGGREGATION_CELLS)
    smoothed = [c for c in todo if c["defense"] not in other]
    data = _data(spec, todo[0])
    draws, per = spec.n0 + spec.n, None
    if device is not None:
        model = run.load_model(backdoored_name(todo[0]["attack_key"]), device="cpu")
        per = seconds_per_input(model, data.splits.input_shape, batch=min(spec.certify_batch_size, draws),
                                device=device)
    announce(log, "compare", len(smoothed) * len(data.keep) * draws, "forward passes",
             detail=f"{len(todo)} cell(s) ({reused} kept); certification of {len(smoothed)} smoothed cell(s) x "
             f"{len(data.keep)} points x (n0 {spec.n0} + n {spec.n}) draws", seconds_per_unit=per,
             device=device, workers=min(workers, len(todo)),
             note="purification, noise fine-tunes, patch certificates and ensemble training come on top")


@dataclass
class CompareResult:
    """What :func:`run_compare` returns: the directory, the table and how many cells ran this time."""

    path: Path
    table: pd.DataFrame
    computed: int
    reused: int

    def __repr__(self) -> str:
        return f"CompareResult({self.path}, {len(self.table)} cells, computed {self.computed}, reused {self.reused})"


def run_compare(spec: CompareSpec | Mapping[str, Any], out: str | os.PathLike, *, n_jobs: int = 1,
                backend: str = "loky", scheduler: Any = None, device: str = "cpu", progress: bool = True,
                plots: bool = True, log: Any = print) -> CompareResult:
    """Run every unfinished cell of ``spec`` into the comparison directory ``out`` and rebuild its table
    (``table.csv``, ``table.md``) and plots.

    Args:
        spec: a :class:`CompareSpec` or its mapping.
        out: comparison directory, created or resumed (a directory made from another spec is refused).
        n_jobs, backend: joblib map over the cells (``n_jobs=1``: in this process).
        scheduler: ``None`` (joblib), ``"local-cluster"`` (a Dask LocalCluster of ``n_jobs`` workers), a
            Dask scheduler address ``tcp://host:port`` or a :class:`distributed.Client`. Workers must see
            ``out`` at the same path.
        device: ``cpu`` | ``cuda`` | ``auto`` for training, purification and certification.
    """


    spec = spec if isinstance(spec, CompareSpec) else CompareSpec.from_dict(spec)
    n_jobs = check_n_jobs(n_jobs)
    backend = check_backend(backend)
    scheduler = check_scheduler(scheduler)
    dev = str(resolve_device(device)) if scheduler is None else device
    run = _open_dir(out, spec)
    sha = spec.sha256()
    cells = spec.cells()
    t0 = time.perf_counter()
    seen: set[str] = set()
    for c in cells:  # the undefended models first, in this process (each is reused by every cell of its row)
        if c["attack_key"] not in seen:
            seen.add(c["attack_key"])
            _train_backdoored(run, spec, c, str(resolve_device(device)), log)
    run.reload()
    registered = list(purifiers.available())
    todo = [c for c in cells if _finished(run, c["id"], sha, registered) is None]
    reused = len(cells) - len(todo)
    if reused:
        log(f"[compare] {reused} finished cell(s) kept, {len(todo)} to run")
    if todo:
        _announce_cells(run, spec, todo, reused, dev if scheduler is None else None, n_jobs, log)
    tasks = [(spec.to_dict(), c, str(Path(run.path).resolve()), dev) for c in todo]
    bar = tqdm(total=len(cells), initial=reused, desc="cells", unit="cell", disable=not progress,
               dynamic_ncols=True)
    try:
        for row in map_tasks(run_cell, tasks, n_jobs=n_jobs, backend=backend, scheduler=scheduler,
                             names=[f"cell-{t[1]['id']}" for t in tasks]):
            run.write_json(f"cells/{row['cell_id']}.json", row)
            bar.update(1)
            bar.set_postfix(last=row["cell_id"], status=row["status"])
            log(cell_line(row))
    finally:
        bar.close()
    run.record_timing("compare", time.perf_counter() - t0)
    table = write_table(run, spec)
    if plots:

        write_plots(run, table)
    return CompareResult(Path(run.path), table, len(todo), reused)


# ---------------------------------------------------------------------------------------------- table


def report(path: str | os.PathLike, *, replot: bool = True) -> str:
    """Rebuild the table (and plots) of a comparison directory from its cell files; return the Markdown."""
    run = RunDirectory.open(path)
    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} holds a {run.kind!r} run, not a comparison directory")
    spec = CompareSpec.from_dict(run.config["compare"])
    table = write_table(run, spec)
    if replot and len(table):

        write_plots(run, table)
    return run.read_text("table.md")
