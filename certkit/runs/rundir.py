"""Run directories: one directory per run, with a manifest, results, models and plots.

Layout of a run directory::

    <run>/
      manifest.json   schema version, certkit/torch/python versions, creation time (ISO UTC), run kind,
                      the full config, seeds, data hashes, timings, finished steps, models (file, sha256,
                      spec, bytes) and every other recorded file (relative path -> sha256, bytes)
      points.csv      one row per test point (written with :meth:`RunDirectory.write_frame`)
      summary.json    aggregate metrics (:meth:`RunDirectory.write_json`)
      models/         ``<name>.pt``: a ``state_dict`` written with ``torch.save``; loaded only with
                      ``torch.load(..., map_location="cpu", weights_only=True)`` after its sha256 matched
      store.npz       the storage (memory) certifier's store of certified balls
      plots/*.png     figures

Decisions (the details behind docs/design.md section 7):

* **Atomic writes.** Every file is written to a temporary file in the same directory, flushed, fsync'ed
  and moved into place with :func:`os.replace`; on any failure the temporary file is removed and the
  previous content of the target is left untouched. JSON is serialised completely *before* any file is
  opened, so an object that cannot be serialised never touches the disk.
* **JSON.** ``indent=2``, key order preserved (``sort_keys=False``). numpy scalars and arrays, torch
  tensors, :class:`pathlib.Path`, tuples and sets are converted (arrays/tensors to nested lists, paths to
  strings, sets to sorted lists). Non-finite floats (NaN, +inf, -inf) are written as ``null`` so that the
  file stays valid JSON for every reader (Python's ``NaN`` token is not JSON). Non-string dict keys are
  converted with ``str``. Anything else raises :class:`TypeError` naming the type.
* **Checkpoints are untrusted.** A model file may come from an attacker. It is never unpickled: the
  bytes are read once, their sha256 compared with the manifest, and only those same bytes are handed to
  ``torch.load(weights_only=True, map_location="cpu")``, whose restricted unpickler refuses any global
  that is not a tensor/storage/plain container. Failures raise :class:`~certkit.errors.RecordError`.
* **Resume.** :meth:`RunDirectory.create` on an existing run directory reopens it when the stored config
  equals the given one (compared after JSON normalisation, so tuples equal lists and NaN equals None)
  and the kind matches; otherwise it refuses, naming the differing top-level config keys. Steps record
  completion with :meth:`~RunDirectory.mark_done`; a resumed run asks :meth:`~RunDirectory.is_done` /
  :meth:`~RunDirectory.has_model` and redoes only what is missing. A non-empty directory without a
  manifest is never used (no user file is clobbered).
* **Manifest updates** re-read the manifest from disk and apply the change under an advisory lock
  (``.manifest.lock``, POSIX ``flock`` where available) before writing it back atomically, so several
  processes recording into the same run do not lose each other's entries.
* **Hashes on load.** :meth:`~RunDirectory.read_json` / :meth:`~RunDirectory.read_frame` check the
  recorded sha256 of a file (``verify=False`` skips it); :meth:`~RunDirectory.verify` lists every
  missing or modified recorded file and model.
* **Schema.** ``SCHEMA_VERSION = 1``. A manifest with a newer version is refused (upgrade certkit); an
  older one is refused too, since no migration exists yet.
* **CSV.** :meth:`~RunDirectory.write_frame` writes without the index by default (``index=False``);
  :meth:`~RunDirectory.read_frame` reads floats so that float64 values round-trip exactly
  (``float_precision="round_trip"`` on pandas < 3, the default on pandas 3).
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import json
import os
import pickle
import platform
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from certkit.backdoor.models import model_from_spec
from certkit.devices import resolve_device
from certkit.errors import InputError, RecordError
from certkit.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    file_lock,
    sha256_bytes,
    sha256_file,
)
from certkit.version import certkit_version

__all__ = ["MANIFEST", "SCHEMA_VERSION", "RunDirectory"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_LOCK = ".manifest.lock"
_SECTIONS = ("seeds", "data_hashes", "timings", "steps", "models", "files")
_REQUIRED = ("schema_version", "kind", "certkit_version", "created", "config", *_SECTIONS)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _normalise(obj: Any) -> Any:
    """JSON round trip, as the value will look after being stored and read back."""
    return json.loads(dumps_json(obj))


def _check_name(name: Any, what: str = "model name") -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise InputError(
            f"{what} {name!r} is not a safe identifier: use only letters, digits, '_', '.', '-' "
            "(no path separators)"
        )
    return name


# ----------------------------------------------------------------------------------------------------------
# manifest reading / validation


def _state_dict_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """One line naming what differs between a model's state dict and a checkpoint's ("" when they fit)."""
    parts = []
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [f"{k} (checkpoint {list(got[k].shape)}, model {list(v.shape)})"
              for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    for what, items in (("size mismatch for", shapes), ("missing keys", missing), ("unexpected keys", extra)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{what} {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def _read_manifest(root: Path) -> dict:
    mpath = root / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RecordError(f"{root} is not a certkit run directory: {MANIFEST} is missing") from exc
    except OSError as exc:
        raise RecordError(f"cannot read {mpath}: {exc}") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{mpath} is not valid JSON ({exc}); the manifest is corrupt") from exc
    if not isinstance(manifest, dict):
        raise RecordError(f"{mpath} must hold a JSON object, got {type(manifest).__name__}")
    if "schema_version" not in manifest:
        raise RecordError(f"{mpath} has no schema_version; it is not a certkit manifest or is corrupt")
    sv = manifest["schema_version"]
    if isinstance(sv, bool) or not isinstance(sv, int):
        raise RecordError(f"{mpath}: schema_version must be an integer, got {sv!r}")
    if sv > SCHEMA_VERSION:
        raise RecordError(
            f"{mpath} has schema_version {sv}, newer than the {SCHEMA_VERSION} this certkit "
            f"({certkit_version()}) understands; upgrade certkit to read this run"
        )
    if sv < SCHEMA_VERSION:
        raise RecordError(
            f"{mpath} has schema_version {sv}, older than the current {SCHEMA_VERSION}; no migration is "
            "available: rerun into a new --out directory"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise RecordError(f"{mpath} lacks required keys: {', '.join(missing)}; the manifest is corrupt")
    bad = [k for k in _SECTIONS if not isinstance(manifest[k], dict)]
    if not isinstance(manifest["config"], dict):
        bad.insert(0, "config")
    if bad:
        raise RecordError(f"{mpath}: {', '.join(bad)} must be JSON objects; the manifest is corrupt")
    return manifest


# ----------------------------------------------------------------------------------------------------------


_MISSING = object()


def _shown(value: Any) -> str:
    return "not set" if value is _MISSING else json.dumps(value, default=str)


def config_differences(stored: Any, given: Any, *, limit: int = 4) -> str:
    """The settings that differ between two configs, by dotted path with both values (at most ``limit``).

    >>> config_differences({"train": {"epochs": 30, "seed": 0}}, {"train": {"epochs": 8, "seed": 0}})
    'train.epochs is 30 in the run, 8 now'
    >>> config_differences({"a": 1}, {"b": 2})
    'a is 1 in the run, not set now; b is not set in the run, 2 now'
    """
    found: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else str(key))
        elif a != b:
            found.append(f"{path} is {_shown(a)} in the run, {_shown(b)} now")

    walk(stored, given, "")
    more = f" (and {len(found) - limit} more)" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


class RunDirectory:
    """A run directory on disk; build one with :meth:`create` or :meth:`open`."""

    def __init__(self, path: str | os.PathLike, manifest: dict, *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("use RunDirectory.create(...) or RunDirectory.open(...)")
        self._path = Path(path)
        self._manifest = manifest

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, kind: str, resume: bool = True) -> RunDirectory:
        """Create a new run directory, or reopen an existing one with the same config and kind.

        Raises :class:`RecordError` when ``path`` is a file, a non-empty directory without a manifest,
        or a run created with another config or kind (or ``resume=False``).
        """
        if not isinstance(config, Mapping):
            raise InputError(f"config must be a dict, got {type(config).__name__}")
        if not isinstance(kind, str) or not kind:
            raise InputError(f"kind must be a non-empty string, got {kind!r}")
        try:
            norm_config = _normalise(dict(config))
        except TypeError as exc:
            raise InputError(f"config is not JSON serialisable: {exc}") from exc
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise RecordError(f"run directory {root} exists and is not a directory")
        if (root / MANIFEST).exists():
            run = cls.open(root)
            if not resume:
                raise RecordError(
                    f"run directory {root} already exists and resume is off; use a new --out directory"
                )
            if run.kind != kind:
                raise RecordError(
                    f"run directory {root} holds a {run.kind!r} run, not {kind!r}; use a new --out directory"
                )
            stored = run._manifest["config"]
            if stored != norm_config:
                raise RecordError(
                    f"run directory {root} was created with a different config: "
                    f"{config_differences(stored, norm_config)}; use a new --out directory (or the same settings)"
                )
            return run
        if root.is_dir() and any(p.name != _LOCK for p in root.iterdir()):
            raise RecordError(
                f"{root} is a non-empty directory without {MANIFEST}; refusing to write a run into it "
                "(its files would be clobbered); use a new --out directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": kind,
            "certkit_version": certkit_version(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "created": _utc_now(),
            "config": norm_config,
            "seeds": {},
            "data_hashes": {},
            "timings": {},
            "steps": {},
            "models": {},
            "files": {},
        }
        with file_lock(root / _LOCK):
            if (root / MANIFEST).exists():  # another process won the race: defer to its manifest
                return cls.create(root, config, kind=kind, resume=resume)
            atomic_write_json(root / MANIFEST, manifest)
        return cls(root, _normalise(manifest), _token=_CONSTRUCT)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDirectory:
        """Open an existing run directory, validating its manifest (see module docstring)."""
        root = Path(path)
        if not root.exists():
            raise RecordError(f"run directory {root} does not exist")
        if not root.is_dir():
            raise RecordError(f"run directory {root} is not a directory")
        manifest = _read_manifest(root)
        current = certkit_version()
        stored = manifest.get("certkit_version")
        if stored != current:
            warnings.warn(
                f"run directory {root} was written by certkit {stored}, this is certkit {current}",
                RuntimeWarning,
                stacklevel=2,
            )
        return cls(root, manifest, _token=_CONSTRUCT)

    # -- properties --------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> dict:
        """A deep copy of the manifest as last read or written by this object."""
        return copy.deepcopy(self._manifest)

    @property
    def config(self) -> dict:
        return copy.deepcopy(self._manifest["config"])

    @property
    def kind(self) -> str:
        return self._manifest["kind"]

    def __repr__(self) -> str:
        return f"RunDirectory({str(self._path)!r}, kind={self.kind!r})"

    # -- manifest updates --------------------------------------------------------------------------------

    def reload(self) -> dict:
        """Re-read the manifest from disk (e.g. after another process recorded into it); returns a copy."""
        self._manifest = _read_manifest(self._path)
        return self.manifest

    def _update(self, mutate: Callable[[dict], None]) -> None:
        with file_lock(self._path / _LOCK):
            manifest = _read_manifest(self._path)
            mutate(manifest)
            text = dumps_json(manifest)
            atomic_write_text(self._path / MANIFEST, text)
            self._manifest = json.loads(text)

    def update_manifest(self, **fields: Any) -> None:
        """Merge top-level fields into the manifest. The protected keys (schema, kind, config, versions,
        created and the per-section dicts) cannot be replaced here; use the ``record_*`` methods."""
        protected = {
            "schema_version",
            "kind",
            "config",
            "certkit_version",
            "torch_version",
            "python_version",
            "created",
            *_SECTIONS,
        }
        bad = sorted(set(fields) & protected)
        if bad:
            raise InputError(
                f"update_manifest cannot replace {', '.join(bad)}; use record_seed/record_data_hash/"
                "record_timing/mark_done/save_model/write_* for the sections"
            )
        try:
            norm = _normalise(fields)
        except TypeError as exc:
            raise InputError(f"manifest fields are not JSON serialisable: {exc}") from exc
        self._update(lambda m: m.update(norm))

    def _set(self, section: str, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise InputError(f"{section} key must be a non-empty string, got {key!r}")
        try:
            norm = _normalise(value)
        except TypeError as exc:
            raise InputError(f"{section}[{key!r}] is not JSON serialisable: {exc}") from exc

        def mutate(m: dict) -> None:
            m[section][key] = norm

        self._update(mutate)

    def record_seed(self, name: str, value: Any) -> None:
        """Record a seed (any JSON value) under ``seeds[name]``."""
        self._set("seeds", name, value)

    def record_data_hash(self, name: str, sha: str) -> None:
        """Record the hash of a data set under ``data_hashes[name]``."""
        if not isinstance(sha, str):
            raise InputError(f"data hash for {name!r} must be a string, got {type(sha).__name__}")
        self._set("data_hashes", name, sha)

    def record_timing(self, step: str, seconds: float) -> None:
        """Record the wall-clock seconds of ``step`` under ``timings[step]``."""
        try:
            s = float(seconds)
        except (TypeError, ValueError) as exc:
            raise InputError(f"timing for {step!r} must be a number of seconds, got {seconds!r}") from exc
        self._set("timings", step, s)

    def mark_done(self, step: str, **info: Any) -> None:
        """Mark ``step`` finished: ``steps[step] = {"done": true, "finished": <ISO UTC>, **info}``."""
        self._set("steps", step, {"done": True, "finished": _utc_now(), **info})

    def is_done(self, step: str) -> bool:
        """Whether ``step`` was marked done (as last read or written by this object)."""
        entry = self._manifest["steps"].get(step)
        return isinstance(entry, dict) and entry.get("done") is True

    # -- paths and files ---------------------------------------------------------------------------------

    def _relpath(self, relpath: str | os.PathLike) -> str:
        try:
            raw = os.fspath(relpath)
        except TypeError as exc:
            raise InputError(f"relative path must be a str or path, got {type(relpath).__name__}") from exc
        if not isinstance(raw, str) or not raw.strip():
            raise InputError(f"relative path must be a non-empty string, got {relpath!r}")
        if "\x00" in raw:
            raise InputError(f"path {raw!r} contains a NUL byte")
        win = PureWindowsPath(raw)
        posix = PurePosixPath(raw.replace("\\", "/"))
        if posix.is_absolute() or win.is_absolute() or win.drive or Path(raw).is_absolute():
            raise InputError(f"path {raw!r} must be relative to the run directory, not absolute")
        parts = [p for p in posix.parts if p not in ("", ".")]
        if ".." in parts:
            raise InputError(f"path {raw!r} escapes the run directory ('..' is not allowed)")
        if not parts:
            raise InputError(f"path {raw!r} does not name a file inside the run directory")
        return "/".join(parts)

    def file(self, relpath: str | os.PathLike) -> Path:
        """Absolute path of ``relpath`` inside the run directory; rejects absolute paths, ``..`` and
        symlinks leading outside the run directory."""
        rel = self._relpath(relpath)
        target = self._path / rel
        root = self._path.resolve()
        try:
            target.resolve().relative_to(root)
        except ValueError as exc:
            raise InputError(f"path {rel!r} resolves outside the run directory {self._path}") from exc
        return target

    def _record_file(self, rel: str, sha: str, nbytes: int) -> None:
        def mutate(m: dict) -> None:
            m["files"][rel] = {"sha256": sha, "bytes": int(nbytes)}

        self._update(mutate)

    def _write(self, relpath: str | os.PathLike, data: bytes) -> Path:
        rel = self._relpath(relpath)
        if rel == MANIFEST or rel == _LOCK:
            raise InputError(f"{rel} is managed by RunDirectory and cannot be written directly")
        target = self.file(rel)
        atomic_write_bytes(target, data)
        self._record_file(rel, sha256_bytes(data), len(data))
        return target

    def write_bytes(self, relpath: str | os.PathLike, data: bytes) -> Path:
        """Write ``data`` atomically to ``relpath`` and record its sha256."""
        return self._write(relpath, bytes(data))

    def write_text(self, relpath: str | os.PathLike, text: str) -> Path:
        """Write UTF-8 ``text`` atomically to ``relpath`` and record its sha256."""
        if not isinstance(text, str):
            raise TypeError(f"write_text needs str, got {type(text).__name__}")
        return self._write(relpath, text.encode("utf-8"))

    def write_json(self, relpath: str | os.PathLike, obj: Any) -> Path:
        """Write ``obj`` as JSON (see module docstring) atomically and record its sha256.

        Raises :class:`TypeError` (before touching the disk) if ``obj`` cannot be serialised.
        """
        return self._write(relpath, dumps_json(obj).encode("utf-8"))

    def write_frame(self, relpath: str | os.PathLike, df: Any, *, index: bool = False) -> Path:
        """Write a :class:`pandas.DataFrame` as CSV atomically (no index by default); record its sha256."""
        import pandas as pd

        if not isinstance(df, pd.DataFrame):
            raise InputError(f"write_frame needs a pandas.DataFrame, got {type(df).__name__}")
        return self._write(relpath, df.to_csv(index=index, lineterminator="\n").encode("utf-8"))

    def record_file(self, relpath: str | os.PathLike) -> str:
        """Record the sha256 of a file written by other code (e.g. ``store.npz``, ``plots/*.png``)."""
        rel = self._relpath(relpath)
        target = self.file(rel)
        if not target.is_file():
            raise RecordError(f"cannot record {rel!r}: no such file in {self._path}")
        data = target.read_bytes()
        sha = sha256_bytes(data)
        self._record_file(rel, sha, len(data))
        return sha

    def _read_checked(self, relpath: str | os.PathLike, verify: bool) -> bytes:
        rel = self._relpath(relpath)
        target = self.file(rel)
        try:
            data = target.read_bytes()
        except FileNotFoundError as exc:
            raise RecordError(f"{rel!r} is missing from run directory {self._path}") from exc
        except OSError as exc:
            raise RecordError(f"cannot read {target}: {exc}") from exc
        entry = self._manifest["files"].get(rel)
        if verify and isinstance(entry, dict) and "sha256" in entry:
            got = sha256_bytes(data)
            if got != entry["sha256"]:
                raise RecordError(
                    f"checksum mismatch for file {rel!r}: expected {entry['sha256']}, got {got}; "
                    "the file was modified or is corrupt"
                )
        return data

    def has_file(self, relpath: str | os.PathLike) -> bool:
        """Whether ``relpath`` is recorded in the manifest and its file exists with the recorded sha256."""
        entry = self._manifest["files"].get(self._relpath(relpath))
        if not isinstance(entry, dict):
            return False
        try:
            return sha256_file(self.file(relpath)) == entry.get("sha256")
        except (InputError, OSError):
            return False

    def read_bytes(self, relpath: str | os.PathLike, *, verify: bool = True) -> bytes:
        """Bytes of ``relpath``; checks the recorded sha256 unless ``verify=False``."""
        return self._read_checked(relpath, verify)

    def read_text(self, relpath: str | os.PathLike, *, verify: bool = True) -> str:
        """UTF-8 text of ``relpath``; checks the recorded sha256 unless ``verify=False``."""
        return self._read_checked(relpath, verify).decode("utf-8")

    def read_json(self, relpath: str | os.PathLike, *, verify: bool = True) -> Any:
        """Parse the JSON file ``relpath`` (RecordError if missing, modified or invalid)."""
        data = self._read_checked(relpath, verify)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"{relpath!s} in {self._path} is not valid JSON: {exc}") from exc

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` (hash-checked), or ``{}`` when the run has none yet."""
        if "summary.json" not in self.manifest["files"]:
            return {}
        return self.read_json("summary.json")

    def read_frame(self, relpath: str | os.PathLike, *, verify: bool = True) -> Any:
        """Read the CSV ``relpath`` into a :class:`pandas.DataFrame` (floats round-trip exactly)."""
        import pandas as pd

        data = self._read_checked(relpath, verify)
        try:
            # pandas < 3 needs float_precision="round_trip" for exact float64; pandas 3 round-trips by
            # default and deprecates the argument.
            kwargs = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}
            return pd.read_csv(io.BytesIO(data), **kwargs)
        except Exception as exc:
            raise RecordError(f"{relpath!s} in {self._path} is not a readable CSV: {exc}") from exc

    # -- models ------------------------------------------------------------------------------------------

    def save_model(self, name: str, model: torch.nn.Module, spec: dict, *, step: str | None = None,
                   seconds: float | None = None, **info: Any) -> Path:
        """Save ``model.state_dict()`` (moved to CPU) atomically to ``models/<name>.pt`` and record
        ``{"file", "sha256", "spec", "bytes"}`` in ``manifest["models"][name]``.

        With ``step``, the same manifest update also marks ``step`` done (with ``info`` and the model's
        sha256) and records ``seconds`` under ``timings[step]``: a run killed at any moment has either the
        model with its step and timing, or neither."""
        _check_name(name)
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(spec, Mapping):
            raise InputError(f"spec must be a dict, got {type(spec).__name__}")
        try:
            norm_spec = _normalise(dict(spec))
        except TypeError as exc:
            raise InputError(f"spec of model {name!r} is not JSON serialisable: {exc}") from exc
        state = {
            k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in model.state_dict().items()
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        rel = f"models/{name}.pt"
        target = self.file(rel)
        atomic_write_bytes(target, data)
        entry = {"file": rel, "sha256": sha256_bytes(data), "spec": norm_spec, "bytes": len(data)}
        done = None
        if step is not None:
            try:
                done = _normalise({"done": True, "finished": _utc_now(), **info, "sha256": entry["sha256"],
                                   **({} if seconds is None else {"seconds": float(seconds)})})
            except TypeError as exc:
                raise InputError(f"step info of {step!r} is not JSON serialisable: {exc}") from exc

        def mutate(m: dict) -> None:
            m["models"][name] = entry
            if done is not None:
                m["steps"][step] = done
                if seconds is not None:
                    m["timings"][step] = float(seconds)

        self._update(mutate)
        return target

    def _model_entry(self, name: str) -> dict:
        models = self._manifest["models"]
        if not isinstance(name, str) or name not in models:
            avail = ", ".join(repr(k) for k in sorted(models)) or "none"
            raise RecordError(f"no model {name!r} in run directory {self._path}; available: {avail}")
        entry = models[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "sha256" not in entry:
            raise RecordError(f"manifest entry of model {name!r} is corrupt")
        return entry

    def load_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Load the state dict of model ``name`` after checking its sha256; never unpickles arbitrary
        objects (``torch.load(weights_only=True)`` on the verified bytes)."""
        entry = self._model_entry(name)
        try:
            target = self.file(entry["file"])
        except InputError as exc:
            raise RecordError(f"manifest entry of model {name!r} points outside the run: {exc}") from exc
        try:
            data = target.read_bytes()
        except FileNotFoundError as exc:
            raise RecordError(f"checkpoint of model {name!r} is missing: {target}") from exc
        except OSError as exc:
            raise RecordError(f"cannot read checkpoint of model {name!r} ({target}): {exc}") from exc
        got = sha256_bytes(data)
        if got != entry["sha256"]:
            raise RecordError(
                f"checksum mismatch for model {name!r}: expected {entry['sha256']}, got {got}; "
                "the file was modified or is corrupt"
            )
        try:
            with warnings.catch_warnings():  # torch warns about odd pickle protocols in hostile files
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # the restricted unpickler met a global it does not allow
            raise RecordError(
                f"checkpoint of model {name!r} ({target}) is refused: it is not a plain tensor state dict (it "
                "refers to other Python objects, which certkit never unpickles)"
            ) from exc
        except Exception as exc:
            raise RecordError(
                f"checkpoint of model {name!r} ({target}) is corrupt: torch cannot read it as a state dict "
                f"({type(exc).__name__})"
            ) from exc
        if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise RecordError(f"checkpoint of model {name!r} ({target}) is not a state dict of tensors")
        return dict(state)

    def model_spec(self, name: str) -> dict:
        """The recorded spec of model ``name`` (a copy)."""
        return copy.deepcopy(self._model_entry(name).get("spec") or {})

    def load_model(
        self,
        name: str,
        *,
        builder: Callable[[dict], torch.nn.Module] | None = None,
        device: str | torch.device = "cpu",
    ) -> torch.nn.Module:
        """Build ``builder(spec)`` (default :func:`certkit.backdoor.models.model_from_spec`), load the verified
        state dict strictly, move it to ``device`` and put it in eval mode."""
        state = self.load_state_dict(name)
        spec = self.model_spec(name)
        if builder is None:

            builder = model_from_spec
        model = builder(spec)
        if not isinstance(model, torch.nn.Module):
            raise RecordError(f"builder for model {name!r} returned {type(model).__name__}, not an nn.Module")
        problem = _state_dict_mismatch(model.state_dict(), state)
        if problem:
            raise RecordError(f"checkpoint of model {name!r} does not fit the model built from its spec: {problem}")
        model.load_state_dict(state, strict=True)
        return model.to(resolve_device(device)).eval()

    def has_model(self, name: str) -> bool:
        """Whether model ``name`` is recorded and its file exists with the recorded sha256."""
        entry = self._manifest["models"].get(name) if isinstance(name, str) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            return False
        try:
            target = self.file(entry["file"])
            return target.is_file() and sha256_file(target) == entry.get("sha256")
        except (InputError, OSError):
            return False

    def models(self) -> list[str]:
        """Names of the recorded models."""
        return sorted(self._manifest["models"])

    # -- verification ------------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Check every recorded file and model against its sha256; return the problems (empty if none)."""
        problems: list[str] = []
        try:
            manifest = _read_manifest(self._path)
        except RecordError as exc:
            return [str(exc)]
        self._manifest = manifest
        checks = [(f"file {rel!r}", rel, e) for rel, e in manifest["files"].items()]
        checks += [(f"model {n!r}", (e or {}).get("file"), e) for n, e in manifest["models"].items()]
        for label, rel, entry in checks:
            if not isinstance(entry, dict) or not isinstance(rel, str) or "sha256" not in entry:
                problems.append(f"{label}: manifest entry is corrupt")
                continue
            try:
                target = self.file(rel)
            except InputError as exc:
                problems.append(f"{label}: {exc}")
                continue
            if not target.is_file():
                problems.append(f"{label} is missing ({rel})")
                continue
            got = sha256_file(target)
            if got != entry["sha256"]:
                problems.append(f"{label} was modified ({rel}): expected sha256 {entry['sha256']}, got {got}")
        return problems


_CONSTRUCT = object()
