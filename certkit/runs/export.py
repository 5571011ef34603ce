"""Export a model of a run directory for use without certkit: a TorchScript file or a plain state dict, each
with a JSON description of the architecture, the input, the output and where the model came from.

The model is read like every checkpoint of a run (sha256 checked, ``torch.load(weights_only=True)``; purified
architectures rebuilt by :func:`certkit.runs.models.load_run_model`). Both files are written atomically
(:func:`certkit.io.atomic_write_bytes`); the description goes to ``<file>.json``.

Decisions:

* **TorchScript by tracing.** The model is traced (:func:`torch.jit.trace`, eval mode, CPU) on two seeded
  random inputs of its input shape: certkit's architectures have no data-dependent control flow, so the
  trace is the model, and BatchNorm layers keep their running statistics. The first layer,
  :class:`~certkit.backdoor.models.Normalize`, is part of the trace with its mean and std buffers, so the
  exported model takes float32 NCHW images in ``[0, 1]`` (pixel units, as every certkit sigma) and returns
  logits. Before anything is written, the saved bytes are loaded back and must give the certkit model's
  logits (``rtol = atol = 1e-5``) on a seeded batch of 16 other inputs (or the ``check_inputs`` given);
  otherwise :class:`~certkit.errors.RecordError`. Recent torch versions deprecate TorchScript (a
  ``FutureWarning`` on ``torch.jit.load``) but still load it, as does C++ libtorch; the state dict below is
  the format that outlives it.
* **State dict.** ``torch.save`` of the verified tensors (``{key: tensor}``, nothing else), so
  ``torch.load(FILE, weights_only=True)`` reads it; the keys are those of the certkit architecture named in
  the description (``architecture``: the spec :func:`certkit.backdoor.models.model_from_spec` rebuilds,
  ``state_dict``: every key with its shape, ``modules``: the module tree). Without certkit, rebuild the
  listed modules and ``load_state_dict(strict=True)``; with it, ``model_from_spec(architecture)``.
* De-randomized smoothing base models (``--ablation``) are refused: their input is the ablated
  ``(x, 1 - x)`` encoding (:mod:`certkit.certify.patch`), not an image.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from certkit._validation import check_choice, check_input_shape
from certkit.errors import InputError, RecordError
from certkit.io import atomic_write_bytes, atomic_write_json, sha256_bytes
from certkit.runs.models import load_run_model
from certkit.runs.rundir import RunDirectory
from certkit.version import certkit_version

__all__ = ["EXPORT_FORMATS", "ExportedModel", "export_model"]

#: what :func:`export_model` writes
EXPORT_FORMATS: tuple[str, ...] = ("torchscript", "state-dict")
#: inputs of the TorchScript check (a batch size other than the trace's two)
_CHECK_INPUTS = 16


@dataclass(frozen=True)
class ExportedModel:
    """What :func:`export_model` wrote.

    Attributes:
        path: the model file; ``description``: its JSON description (``<path>.json``).
        format: ``"torchscript"`` or ``"state-dict"``; ``model``: the model's name in the run.
        input_shape: ``(C, H, W)`` of one input; ``num_classes``: logits per input.
        max_abs_diff: largest ``|exported - certkit|`` logit difference of the TorchScript check (``None`` for
            a state dict, which holds the very tensors of the checkpoint).
    """

    path: Path
    description: Path
    format: str
    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    max_abs_diff: float | None

    def __str__(self) -> str:
        check = "" if self.max_abs_diff is None else f"; logits match the run's model (max |diff| {self.max_abs_diff:.2e})"
        how = (f"torch.jit.load({str(self.path)!r})" if self.format == "torchscript"
               else f"torch.load({str(self.path)!r}, weights_only=True)")
        return (f"exported {self.model!r} ({self.format}, input [N, {', '.join(map(str, self.input_shape))}] float32 in "
                f"[0, 1], {self.num_classes} logits) to {self.path}{check}\nload it with {how}; description: "
                f"{self.description}")


def _shape_and_classes(spec: dict[str, Any], name: str) -> tuple[tuple[int, int, int], int]:
    if "ablation" in spec:
        raise InputError(f"model {name!r} is a de-randomized smoothing base model (its input is the ablated "
                         "(x, 1 - x) encoding, not an image): export a plain model of the run")
    kwargs = spec.get("kwargs") if isinstance(spec.get("kwargs"), dict) else {}
    try:
        shape = check_input_shape(kwargs.get("input_shape"), f"input_shape of model {name!r}")
    except InputError as exc:
        raise RecordError(f"the spec of model {name!r} records no valid input shape: {exc}") from exc
    classes = kwargs.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise RecordError(f"the spec of model {name!r} records no valid num_classes: {classes!r}")
    return shape, classes


def _trace(model: torch.nn.Module, shape: tuple[int, int, int], check: torch.Tensor) -> tuple[bytes, float]:
    """TorchScript bytes of ``model`` and the largest logit difference of the reloaded file on ``check``."""
    example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # recent torch deprecates TorchScript; it still works
        traced = torch.jit.trace(model, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        data = buf.getvalue()
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        want, got = model(check), loaded(check)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        diff = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        raise RecordError(f"the traced model does not reproduce the run's model (max |logit diff| {diff:.3g}); "
                          "nothing was written: export it as --format state-dict")
    return data, float((got - want).abs().max()) if len(check) else 0.0


def export_model(run_dir: str | os.PathLike | RunDirectory, name: str, out: str | os.PathLike, *,
                 format: str = "torchscript", check_inputs: torch.Tensor | None = None) -> ExportedModel:
    """Write model ``name`` of a run as a TorchScript file (``format="torchscript"``) or a plain state dict
    (``"state-dict"``) at ``out``, and its description at ``<out>.json`` (see the module's decisions).

    Args:
        run_dir: a run directory of any kind; ``name``: one of its models (an unknown name lists them).
        check_inputs: inputs ``[N, C, H, W]`` in ``[0, 1]`` on which the TorchScript file must give the run
            model's logits (default: 16 seeded random images).

    >>> import tempfile
    >>> from certkit.backdoor.models import build_model
    >>> d = Path(tempfile.mkdtemp())
    >>> run = RunDirectory.create(d / "run", {"note": "doctest"}, kind="single")
    >>> net = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
    >>> _ = run.save_model("net", net, net.certkit_spec)
    >>> exported = export_model(run, "net", d / "net.pt")
    >>> torch.jit.load(str(exported.path))(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """
    check_choice(format, EXPORT_FORMATS, "format")
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    out = Path(out).expanduser()
    if out.is_dir():
        raise InputError(f"out {str(out)!r} is a directory: give the file to write, e.g. {str(out / (name + '.pt'))!r}")
    spec = run.model_spec(name)  # RecordError naming the available models when there is none
    shape, classes = _shape_and_classes(spec, name)
    model = load_run_model(run, name, device="cpu")
    state = run.load_state_dict(name)
    description: dict[str, Any] = {
        "format": format,
        "file": out.name,
        "input": {"shape": ["N", *shape], "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0],
                  "meaning": "images in pixel units; the normalisation (mean, std below) is the model's first layer"},
        "output": {"shape": ["N", classes], "meaning": "logits; argmax is the predicted class"},
        "num_classes": classes,
        "normalisation": {"mean": spec["kwargs"].get("mean"), "std": spec["kwargs"].get("std")},
        "architecture": spec,
        "modules": repr(model),
        "state_dict": {k: list(v.shape) for k, v in state.items()},
        "source": {"run": str(run.path), "run_kind": run.kind, "model": name,
                   "model_sha256": run.manifest["models"][name]["sha256"]},
        "certkit_version": certkit_version(),
        "torch_version": torch.__version__,
    }
    if format == "torchscript":
        if check_inputs is None:
            check_inputs = torch.rand((_CHECK_INPUTS, *shape), generator=torch.Generator().manual_seed(1))
        elif not isinstance(check_inputs, torch.Tensor) or tuple(check_inputs.shape[1:]) != shape:
            raise InputError(f"check_inputs must be a tensor [N, {', '.join(map(str, shape))}], got "
                             f"{tuple(getattr(check_inputs, 'shape', ())) or type(check_inputs).__name__}")
        data, diff = _trace(model, shape, check_inputs.detach().to("cpu", torch.float32))
        description["load"] = f"model = torch.jit.load({out.name!r}); logits = model(x)"
        description["check"] = {"inputs": int(len(check_inputs)), "max_abs_logit_diff": diff}
    else:
        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in state.items()}, buf)
        data, diff = buf.getvalue(), None
        description["load"] = f"state = torch.load({out.name!r}, weights_only=True); model.load_state_dict(state)"
    description["sha256"] = sha256_bytes(data)
    json.dumps(description)  # serialisable before anything is written
    atomic_write_bytes(out, data)
    desc_path = atomic_write_json(out.with_name(out.name + ".json"), description)
    return ExportedModel(out, desc_path, format, name, shape, classes, diff)
