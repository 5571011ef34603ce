"""Training-time smoothing ensembles (RAB, Mode B): spec, noise streams, train_member / train_ensemble,
bit-identity across n_jobs / backends / Dask, kill-and-resume, corrupt checkpoints, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model
from certkit.backdoor.training import train_model
from certkit.errors import CertkitError, InputError, RecordError, UnknownNameError
from certkit.runs.ensemble_train import (
    NOISE_MODES,
    EnsembleSpec,
    member_name,
    member_test_noise,
    member_train_noise,
    prepare_data,
    train_ensemble,
    train_member,
)
from certkit.runs.rundir import RunDirectory
from certkit.seeding import STREAM_MEMBER_INIT, derive_seed

REPO = Path(__file__).resolve().parents[1]
# tiny settings: digits (1257 training inputs), 2 epochs, about 0.2 s per member on one core
SMALL = dict(members=4, epochs=2, poison_rate=0.05, sigma=0.5, seed=3)


def _states(run: RunDirectory, members: int) -> list[dict[str, torch.Tensor]]:
    return [run.load_state_dict(member_name(m)) for m in range(members)]


def _shas(run: RunDirectory, members: int) -> list[str]:
    models = run.manifest["models"]
    return [models[member_name(m)]["sha256"] for m in range(members)]


def _assert_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for m, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), m
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"member {m}, tensor {k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted n_jobs=1 run of the SMALL spec."""
    spec = EnsembleSpec(**SMALL)
    run = train_ensemble(spec, tmp_path_factory.mktemp("ref") / "run", n_jobs=1, progress=False)
    return spec, run, _states(run, spec.members), _shas(run, spec.members)


# ----------------------------------------------------------------------------------------------------------
# spec


def test_spec_defaults_roundtrip_and_names():
    spec = EnsembleSpec()
    assert (spec.dataset, spec.model, spec.attack, spec.members, spec.sigma, spec.noise) == (
        "digits",
        "digits-cnn",
        "badnets",
        50,
        0.5,
        "fixed",
    )
    assert spec.poison_rate == 0.02 and spec.threads_per_member == 1 and "fixed" in NOISE_MODES
    d = spec.to_dict()
    assert EnsembleSpec.from_dict(json.loads(json.dumps(d))) == spec
    assert EnsembleSpec.from_dict({"members": 3}).members == 3  # missing keys take defaults
    assert [member_name(m) for m in (0, 7, 123)] == ["member-0000", "member-0007", "member-0123"]
    assert member_name(12345) == "member-12345"
    assert sorted(member_name(m) for m in range(20, -1, -1)) == [member_name(m) for m in range(21)]
    with pytest.raises(InputError, match="member index"):
        member_name(-1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"members": 0}, "members"),
        ({"members": 2.5}, "members"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.5}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"poison_rate": 1.0}, "poison_rate"),
        ({"poison_rate": -0.01}, "poison_rate"),
        ({"target": -1}, "target"),
        ({"target": 1.5}, "target"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"threads_per_member": 0}, "threads_per_member"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"noise": "sample-specific"}, "fixed"),  # the error lists the allowed modes
        ({"model": "resnet9000"}, "digits-cnn"),
        ({"attack": "nope"}, "badnets"),
        ({"attack_params": {"bogus": 1}}, "bogus"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(CertkitError, match=match):
        EnsembleSpec(**kwargs)


def test_unknown_noise_mode_is_an_unknown_name():
    with pytest.raises(UnknownNameError, match="noise mode 'gaussian'"):
        EnsembleSpec(noise="gaussian")


def test_from_dict_names_unknown_keys():
    with pytest.raises(InputError, match="bogus, sigmas"):
        EnsembleSpec.from_dict({"members": 2, "sigmas": [0.5], "bogus": 1})
    with pytest.raises(InputError, match="dict"):
        EnsembleSpec.from_dict([("members", 2)])


def test_target_out_of_range_fails_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="target class 10 is out of range"):
        train_ensemble(EnsembleSpec(**{**SMALL, "target": 10}), out, progress=False)
    assert not out.exists()


def test_bad_call_arguments(tmp_path):
    spec = EnsembleSpec(**SMALL)
    with pytest.raises(InputError, match="n_jobs"):
        train_ensemble(spec, tmp_path / "a", n_jobs=0, progress=False)
    with pytest.raises(UnknownNameError, match="loky"):
        train_ensemble(spec, tmp_path / "b", backend="nope", progress=False)
    with pytest.raises(InputError, match="scheduler must be"):
        train_ensemble(spec, tmp_path / "c", scheduler=42, progress=False)
    with pytest.raises(InputError, match="device"):
        train_ensemble(spec, tmp_path / "e", device="tpu", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            train_ensemble(spec, tmp_path / "f", device="cuda", progress=False)
    with pytest.raises(InputError, match="member index 4 is out of range"):
        train_member(spec, 4, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcdef")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_fails_fast_naming_the_address(tmp_path):
    pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot connect to the Dask scheduler") as info:
        # the default timeout is 10 s; 3 s keeps the test short (same code path)
        train_ensemble(
            EnsembleSpec(**SMALL), tmp_path / "run", scheduler=address, progress=False, scheduler_timeout=3
        )
    assert time.perf_counter() - t0 < 15
    assert address in str(info.value) and "within 3 s" in str(info.value)
    with pytest.raises(InputError, match="scheduler_timeout"):
        train_ensemble(EnsembleSpec(**SMALL), tmp_path / "run", scheduler=address, scheduler_timeout=0)


def test_run_directory_of_another_config_is_refused(reference, tmp_path):
    spec, run, _, _ = reference
    other = EnsembleSpec(**{**SMALL, "sigma": 0.25})
    with pytest.raises(RecordError, match="different config"):
        train_ensemble(other, run.path, progress=False)
    with pytest.raises(RecordError, match="different config"):
        train_member(other, 0, run.path)
    single = RunDirectory.create(tmp_path / "single", {"ensemble": spec.to_dict()}, kind="single")
    with pytest.raises(RecordError, match="'single' run"):
        train_ensemble(spec, single.path, progress=False)


# ----------------------------------------------------------------------------------------------------------
# data and noise


def test_fixed_noise_streams():
    spec = EnsembleSpec(**SMALL)
    shape = (1257, 1, 8, 8)
    n0 = member_train_noise(spec, 0, shape)
    assert n0.shape == shape and n0.dtype == torch.float32 and n0.device.type == "cpu"
    assert torch.equal(n0, member_train_noise(spec, 0, torch.Size(shape)))  # reproducible
    assert not torch.equal(n0, member_train_noise(spec, 1, shape))  # one draw per member
    assert abs(float(n0.std()) - spec.sigma) < 0.01 and abs(float(n0.mean())) < 0.01
    # sigma * N(0, I) with the same underlying draw; unclipped
    unit = member_train_noise(EnsembleSpec(**{**SMALL, "sigma": 1.0}), 0, shape)
    assert torch.equal(unit * 0.5, n0) and float(n0.abs().max()) > 1.0
    assert not torch.equal(n0, member_train_noise(EnsembleSpec(**{**SMALL, "seed": 4}), 0, shape))

    t0 = member_test_noise(spec, 0, (1, 8, 8))
    assert t0.shape == (1, 8, 8) and torch.equal(t0, member_test_noise(spec.to_dict(), 0, [1, 8, 8]))
    assert not torch.equal(t0, member_test_noise(spec, 1, (1, 8, 8)))
    assert not torch.equal(t0, member_train_noise(spec, 0, (1, 1, 8, 8))[0])  # separate streams
    with pytest.raises(InputError, match="input_shape"):
        member_test_noise(spec, 0, (8, 8))


class _Recorder(nn.Module):
    """A linear classifier that records every input batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(x.flatten(1))


def _rows_sorted(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).double()
    return flat[torch.argsort(flat.sum(dim=1))]


def test_train_model_adds_the_same_fixed_noise_every_epoch():
    data = load_digits().train.subset(range(100))
    noise = 0.5 * torch.randn(data.x.shape, generator=torch.Generator().manual_seed(0))
    rec = _Recorder()
    train_model(rec, data, epochs=3, batch_size=100, fixed_noise=noise, progress=False, device="cpu")
    expected = _rows_sorted(data.x + noise)
    assert len(rec.seen) == 3
    for epoch_inputs in rec.seen:  # a different order each epoch, the same noisy inputs
        assert torch.equal(_rows_sorted(epoch_inputs), expected)
    assert not torch.equal(rec.seen[0], rec.seen[1])


def test_train_model_fixed_noise_zero_is_no_noise_and_validation():
    data = load_digits().train.subset(range(200))
    kw = dict(epochs=1, batch_size=64, progress=False, device="cpu", seed=5)
    torch.manual_seed(0)
    a = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    b = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    b.load_state_dict(a.state_dict())
    train_model(a, data, **kw)
    train_model(b, data, fixed_noise=torch.zeros_like(data.x), **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    for bad, match in [
        (torch.zeros(3, 1, 8, 8), "shape"),
        (torch.full(data.x.shape, float("nan")), "NaN"),
        (torch.zeros(data.x.shape, dtype=torch.int64), "floating"),
        ([0.0], "Tensor"),
    ]:
        with pytest.raises(InputError, match=match):
            train_model(a, data, fixed_noise=bad, **kw)


# ----------------------------------------------------------------------------------------------------------
# training


def test_train_member_is_what_the_spec_says_and_idempotent(reference):
    spec, run, states, shas = reference
    data = prepare_data(spec)
    seed = derive_seed(spec.seed, STREAM_MEMBER_INIT, 1)
    torch.manual_seed(seed)
    model = build_model(
        "digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=data.splits.mean, std=data.splits.std
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_model(
            model,
            data.train,
            epochs=spec.epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            fixed_noise=member_train_noise(spec, 1, data.train.x.shape),
            seed=seed,
            device="cpu",
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    _assert_identical([model.state_dict()], [states[1]])

    path = run.file(f"models/{member_name(1)}.pt")
    mtime = path.stat().st_mtime_ns
    rec = train_member(spec, 1, run)
    assert rec["trained"] is False and rec["sha256"] == shas[1] and rec["member"] == 1
    assert rec["seed"] == seed and rec["final_loss"] is not None and rec["seconds"] > 0
    assert path.stat().st_mtime_ns == mtime
    m = run.manifest
    assert m["kind"] == "ensemble" and m["config"] == {"ensemble": spec.to_dict()}
    assert set(m["data_hashes"]) == {"train", "test", "poisoned_train"} and m["seeds"]["ensemble"] == 3
    assert all(m["steps"][f"train/{member_name(i)}"]["done"] for i in range(spec.members))
    assert run.verify() == []
    member = run.load_model(member_name(0))
    assert isinstance(member, nn.Module) and not member.training


def test_bit_identical_across_n_jobs_and_dask(reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    spec, _, states, shas = reference
    run2 = train_ensemble(spec, tmp_path / "jobs2", n_jobs=2, progress=False)
    _assert_identical(_states(run2, spec.members), states)
    assert _shas(run2, spec.members) == shas
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        run3 = train_ensemble(spec, tmp_path / "dask", scheduler=client, progress=False)
        pids = set(client.run(os.getpid).values())
    assert os.getpid() not in pids and len(pids) == 2
    _assert_identical(_states(run3, spec.members), states)
    assert _shas(run3, spec.members) == shas


def test_local_cluster_members_are_bit_identical_to_joblib(reference, tmp_path):
    pytest.importorskip("distributed")
    spec, _, states, shas = reference
    run = train_ensemble(spec, tmp_path / "local", scheduler="local-cluster", n_jobs=2, progress=False)
    _assert_identical(_states(run, spec.members), states)
    assert _shas(run, spec.members) == shas


def test_member_does_not_depend_on_ensemble_size(reference, tmp_path):
    spec, _, states, _ = reference
    bigger = EnsembleSpec(**{**SMALL, "members": 5})
    run = train_ensemble(bigger, tmp_path / "five", n_jobs=1, backend="threading", progress=False)
    _assert_identical(_states(run, 4), states)


_CHILD = """
import json, sys
from certkit.runs.ensemble_train import EnsembleSpec, train_ensemble
train_ensemble(EnsembleSpec(**json.loads(sys.argv[1])), sys.argv[2], n_jobs=1, progress=False)
"""


def test_kill_and_resume(reference, tmp_path):
    _, _, ref_states, _ = reference
    spec = EnsembleSpec(**{**SMALL, "members": 8})
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec.to_dict()), str(out)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if RunDirectory.open(out).models():
                    break
            except RecordError:
                pass
            time.sleep(0.01)
        assert proc.poll() is None, "the child finished (or failed) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = RunDirectory.open(out)
    finished = [n for n in killed.models() if killed.has_model(n)]
    assert 1 <= len(finished) < spec.members
    before = {
        n: (killed.file(f"models/{n}.pt").stat().st_mtime_ns, killed.manifest["models"][n]["sha256"])
        for n in finished
    }

    run = train_ensemble(spec, out, n_jobs=1, progress=False)
    for n, (mtime, sha) in before.items():  # not retrained
        assert run.file(f"models/{n}.pt").stat().st_mtime_ns == mtime
        assert run.manifest["models"][n]["sha256"] == sha
    assert run.models() == [member_name(m) for m in range(spec.members)] and run.verify() == []
    resumed = _states(run, spec.members)
    uninterrupted = train_ensemble(spec, tmp_path / "whole", n_jobs=1, progress=False)
    _assert_identical(resumed, _states(uninterrupted, spec.members))
    _assert_identical(resumed[:4], ref_states)


def test_corrupt_members_are_retrained_or_refused(reference, tmp_path):
    spec, run, states, shas = reference
    out = tmp_path / "copy"
    shutil.copytree(run.path, out)
    models = out / "models"
    p1, p2, p3 = (models / f"{member_name(m)}.pt" for m in (1, 2, 3))
    p1.write_bytes(p1.read_bytes()[: p1.stat().st_size // 2])  # truncated
    raw = bytearray(p2.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    p2.write_bytes(bytes(raw))
    p3.unlink()  # recorded but gone
    mtime0 = (models / f"{member_name(0)}.pt").stat().st_mtime_ns

    with pytest.raises(RecordError, match="member-0001") as info:
        train_ensemble(spec, out, retrain_corrupt=False, progress=False)
    assert "member-0002" in str(info.value) and "member-0003" in str(info.value)
    assert "member-0000" not in str(info.value)

    with pytest.warns(RuntimeWarning, match="retraining 3 corrupt"):
        fixed = train_ensemble(spec, out, progress=False)
    assert (models / f"{member_name(0)}.pt").stat().st_mtime_ns == mtime0
    _assert_identical(_states(fixed, spec.members), states)
    assert _shas(fixed, spec.members) == shas and fixed.verify() == []


def test_resume_refuses_changed_data(reference, tmp_path):
    spec, run, _, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(run.path, out)
    copy = RunDirectory.open(out)
    copy.record_data_hash("poisoned_train", "0" * 64)
    with pytest.raises(RecordError, match="poisoned_train"):
        train_ensemble(spec, out, progress=False)


def test_a_member_saved_without_its_step_gets_the_step_recorded_on_resume(tmp_path):
    spec = EnsembleSpec(**{**SMALL, "members": 1})
    run = train_ensemble(spec, tmp_path / "r", progress=False)
    name = member_name(0)

    def forget(m: dict) -> None:  # the state an older certkit left after kill -9 between save and mark
        del m["steps"][f"train/{name}"]
        del m["timings"][f"train/{name}"]

    run._update(forget)
    rec = train_member(spec, 0, run.path, progress=False)
    assert rec["trained"] is False
    step = RunDirectory.open(run.path).manifest["steps"][f"train/{name}"]
    assert step["done"] is True and step["recovered"] is True and step["sha256"] == rec["sha256"]
