"""File I/O shared by every layer: sha256 hashes, atomic writes, JSON conversion and file locks.

Decisions:

* **Atomic writes.** Every file is written to a temporary file in the same directory, flushed, fsync'ed
  and moved into place with :func:`os.replace`; on any failure the temporary file is removed and the
  previous content of the target is left untouched. JSON is serialised completely *before* any file is
  opened, so an object that cannot be serialised never touches the disk.
* **JSON.** ``indent=2``, key order preserved. numpy scalars and arrays, torch tensors, paths, tuples and
  sets are converted; non-finite floats are written as ``null`` so that the file stays valid JSON.
* **Locks.** :func:`file_lock` is an advisory POSIX ``flock`` (a no-op where unavailable), used by run
  directories (manifest updates) and by ensemble training (one writer of the training scales).

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> p = atomic_write_json(d / "a.json", {"x": float("nan"), "y": (1, 2)})
>>> p.read_text().split()
['{', '"x":', 'null,', '"y":', '[', '1,', '2', ']', '}']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch

from certkit.errors import InputError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "dumps_json",
    "file_lock",
    "read_indices",
    "sha256_bytes",
    "sha256_file",
    "to_jsonable",
]




def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_tensor(x: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's raw bytes (CPU, contiguous): identifies the exact inputs a saved result is for.

    >>> sha256_tensor(torch.zeros(2)) == sha256_tensor(torch.zeros(2)) != sha256_tensor(torch.ones(2))
    True
    """
    return sha256_bytes(x.detach().cpu().contiguous().numpy().tobytes())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Best effort: persist the rename in the directory entry (not supported on Windows)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, :func:`os.replace`.

    The parent directory is created if needed. On failure the temp file is removed and an existing
    ``path`` keeps its previous content. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types (see the module docstring); raises :class:`TypeError`."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):  # includes bool (handled above) and IntEnum
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (PurePosixPath, PureWindowsPath)):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any) -> str:
    """``obj`` as the JSON text certkit writes (indent 2, NaN/inf -> null, trailing newline)."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` to JSON (indent 2, NaN/inf -> null) and write it atomically.

    Serialisation happens before the file is touched: if it fails, ``path`` is unchanged.
    """
    return atomic_write_text(path, dumps_json(obj))




@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock on the file ``path`` (POSIX ``flock``; a no-op where unavailable).

    The parent directory is created if needed; the lock file itself is left in place."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_indices(path: str | os.PathLike) -> np.ndarray:
    """The integers of an index file as an int64 array, in file order (duplicates and range are the caller's
    check, :func:`certkit._validation.check_indices`): a ``.npy`` 1-D integer array (read with
    ``allow_pickle=False``), or text / CSV with integers separated by commas, spaces or newlines (lines
    starting with ``#`` are comments).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ids.txt"
    >>> _ = p.write_text("# test points\\n3, 1\\n7\\n")
    >>> read_indices(p).tolist()
    [3, 1, 7]
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"ids file {str(path)!r} does not exist")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"could not read ids file {str(path)!r} as a .npy array: {' '.join(str(exc).split())}"
                             ) from exc
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            raise InputError(f"ids file {str(path)!r} must hold a 1-D array, got shape {getattr(arr, 'shape', None)}")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"ids file {str(path)!r} must hold integers, got dtype {arr.dtype}")
        return arr.astype(np.int64)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"could not read ids file {str(path)!r} as text: {exc}") from exc
    values: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        for token in line.replace(",", " ").split():
            try:
                values.append(int(token))
            except ValueError:
                raise InputError(f"ids file {str(path)!r}, line {number}: {token!r} is not an integer (write one "
                                 "integer per index, e.g. numpy.savetxt(path, ids, fmt='%d'))") from None
    return np.asarray(values, dtype=np.int64)
