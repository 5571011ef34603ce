"""``certkit report``: the tables of a run directory (single-model runs with their purified models, ensembles),
rebuilt from its records (plots redrawn on request)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from certkit.errors import RecordError
from certkit.runs.aggregation import aggregation_table
from certkit.runs.ensemble_certify import ensemble_report_table
from certkit.runs.fct import split_line
from certkit.runs.patch import patch_table
from certkit.runs.plots import plot_certified_rows
from certkit.runs.rundir import RunDirectory

__all__ = ["SMOKE_MARK", "certify_settings_lines", "purified_table", "report", "report_table"]

#: the mark of results made with ``certkit purify --fast`` (the method's tiny smoke-test budgets)
SMOKE_MARK = "(smoke test: --fast budgets)"


def purified_table(summary: dict[str, Any]) -> str:
    """Text table of the ``"purified"`` section of a run's summary (empty string when there is none)."""
    rows = summary.get("purified", {})
    if not rows:
        return ""
    lines = [f"{'purified model':<26}{'noise':>7}{'CA':>13}{'ASR':>13}{'RA':>13}{'DER':>7}{'time':>8}"]
    for name, r in rows.items():
        ns = r.get("noise_sigma")
        lines.append(f"{name:<26}{(f'{ns:g}' if ns else '-'):>7}"
                     f"{r['ca_before']:>6.3f}->{r['ca_after']:.3f}{r['asr_before']:>6.3f}->{r['asr_after']:.3f}"
                     f"{r['ra_before']:>6.3f}->{r['ra_after']:.3f}{r['der']:>7.3f}"
                     f"{(r.get('runtime_s') or float('nan')):>7.1f}s"
                     + (f"  {SMOKE_MARK}" if r.get("smoke_test") else ""))
    lines.append("before -> after purification (before = the undefended backdoored model); noise: sigma of the "
                 "Gaussian noise fine-tune; time: purification (or fine-tune) seconds"
                 + (f"; {SMOKE_MARK}: tiny budgets for smoke runs, not the method's results" if
                    any(r.get("smoke_test") for r in rows.values()) else "") + ".")
    return "\n".join(lines)


def report_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the run's empirical and certified metrics."""
    lines: list[str] = []
    att = summary.get("attack", {})
    if att:
        tn = att.get("trigger_norm_mean")
        lines.append(f"attack {att.get('name')} -> target {att.get('target')}, poison rate {att.get('poison_rate')}, "
                     f"{att.get('n_poisoned')} poisoned; mean trigger l2 norm "
                     f"{tn:.3f}" if tn is not None else "")
    emp = summary.get("empirical", {})
    if emp:
        lines.append("")
        lines.append(f"{'model':<16}{'train sigma':>12}{'CA':>8}{'ASR':>8}{'RA':>8}")
        for name, m in emp.items():
            lines.append(f"{name:<16}{m['noise_sigma']:>12g}{m['clean_accuracy']:>8.3f}"
                         f"{m['attack_success_rate']:>8.3f}{m['robust_accuracy']:>8.3f}")
        for name, m in emp.items():
            if m.get("defense") == "fct-st":
                lines.append(f"{name}: trained by FCT's D-ST from the poisoned data (Chen, Wu, Wang, NeurIPS 2022); "
                             + split_line("SD", m["split"]))
    cert = summary.get("certified", [])
    if cert:
        radii = list(cert[0]["certified_accuracy"].keys())
        lines.append("")
        w = max([16] + [len(r["model"]) + 2 for r in cert])
        head = f"{'model':<{w}}{'sigma':>7}" + "".join(f"{'CA@' + r:>9}" for r in radii)
        head += f"{'ACR':>8}{'abstain':>9}{'CTR':>7}{'ASR<=95%':>10}{'sm.ASR':>8}"
        lines.append(head)
        for row in cert:
            name = row["model"] + ("*" if row.get("sigma_mode", "fixed") != "fixed" else "")
            line = f"{name:<{w}}{row['sigma']:>7g}"
            line += "".join(f"{row['certified_accuracy'][r]:>9.3f}" for r in radii)
            bound = (row.get("asr_bound") or {}).get("bound")  # absent in runs made before it existed
            line += (f"{row['acr']:>8.3f}{row['abstain_rate']:>9.3f}{row['certified_trigger_robustness']:>7.3f}"
                     + (f"{bound:>10.3f}" if bound is not None else f"{'n/a':>10}") + f"{row['smoothed_asr']:>8.3f}")
            lines.append(line)
        lines.append("CA@r: certified accuracy at radius r (clean test set; each point's certificate holds with "
                     "probability >= 1 - alpha on its own); CTR: certified trigger robustness (non-target points "
                     "certified beyond the trigger's norm); ASR<=95%: a bound on the smoothed classifier's ASR over "
                     "the whole test set that holds with probability >= 0.95 (1 - CTR + q/N, q the 95% quantile "
                     "of the number of failed certificates); sm.ASR: measured ASR of the smoothed classifier.")
        lines.extend(certify_settings_lines(summary))
        purified = summary.get("purified", {})
        smoke = sorted({r["model"] for r in cert if (purified.get(r["model"]) or {}).get("smoke_test")})
        if smoke:
            lines.append(f"{SMOKE_MARK}: {', '.join(smoke)} (purified with tiny budgets; not the method's "
                         "results)")
        ssb = [r for r in cert if r.get("sigma_mode", "fixed") != "fixed"]
        if ssb:
            lines.append("*: sample-specific sigma (Cert-SSB SGA from the base sigma, each input's own) + "
                         "storage-update certification, transductive and order-dependent: CTR there counts "
                         "triggered queries certified to get their true label, processed before (without) their "
                         "clean twins; " + "; ".join(_storage_note(r) for r in ssb))
    if summary.get("patch"):
        lines.extend(["", patch_table(summary)])
    if summary.get("purified"):

        lines.extend(["", purified_table(summary)])
    return "\n".join(lines)


def certify_settings_lines(summary: dict[str, Any]) -> list[str]:
    """One line per distinct CERTIFY setting of the certified rows: n0, n, alpha, points, seed and batch size
    (runs made before rows recorded seed and batch size fall back to ``certify_settings``, else ``n/a``)."""
    fallback = summary.get("certify_settings", {})
    groups: dict[str, list[str]] = {}
    for row in summary.get("certified", []):
        def get(key: str, row: dict[str, Any] = row) -> Any:
            value = row.get(key, fallback.get(key))
            return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else value

        max_points = row.get("max_points", fallback.get("max_points"))
        subsample = (f"max_points {max_points}" if max_points
                     else f"{row['n_ids']} given ids" if row.get("n_ids") else "all")
        text = (f"n0 {get('n0')}, n {get('n')}, alpha {get('alpha')}, {row['n_clean']} clean + "
                f"{row['n_triggered']} triggered points ({subsample}), seed {get('seed')}, "
                f"batch size {get('batch_size')}")
        mark = "*" if row.get("sigma_mode", "fixed") != "fixed" else ""
        groups.setdefault(text, []).append(f"{row['model']}{mark}@{row['sigma']:g}")
    if len(groups) == 1:
        return [f"certify settings: {next(iter(groups))}"]
    return [f"certify settings of {', '.join(names)}: {text}" for text, names in groups.items()]


def report(run_dir: str | Path, *, replot: bool = True) -> str:
    """Read a run directory, verify it, optionally redraw its plots, and return the text table."""
    run = RunDirectory.open(run_dir)
    problems = run.verify()
    if problems:
        raise RecordError(f"run directory {run.path} failed verification: " + "; ".join(problems))
    summary = run.read_summary()
    if run.kind == "ensemble":

        if not summary:
            raise RecordError(f"ensemble run {run.path} has no summary.json yet: run `certkit ensemble certify` first")
        if summary.get("aggregation"):
            lay = summary.get("layout", {})
            att = summary.get("attack", {})
            return (f"attack {att.get('name')} -> target {att.get('target')}, poison rate {att.get('poison_rate')}, "
                    f"{att.get('n_poisoned')} poisoned samples; layout {lay.get('kind')} (k={lay.get('k')}, "
                    f"d={lay.get('d')}" + (f", {lay['versions']} versions per partition (DPA*)" if lay.get("versions")
                                           else "") + ")\n" + _undefended_line(summary) + aggregation_table(summary))
        return ensemble_report_table(summary)
    if not summary:
        raise RecordError(f"run directory {run.path} has no summary.json yet: run `certkit train` first")
    if replot and summary.get("certified"):
        plot_certified_rows(run, summary["certified"], run.read_frame("points.csv"))
    return report_table(summary)


def _undefended_line(summary: dict[str, Any]) -> str:
    emp = summary.get("undefended")
    if not emp:
        return ""
    return (f"undefended model (trained on all the poisoned data): CA {emp['clean_accuracy']:.3f}  "
            f"ASR {emp['attack_success_rate']:.3f}\n")


def summary_json(run_dir: str | Path) -> str:
    """``certkit report --json``: the run's ``summary.json`` (hash-checked) as indented JSON text."""
    return json.dumps(RunDirectory.open(run_dir).read_summary(), indent=2)


def _storage_note(row: dict[str, Any]) -> str:
    storage = row.get("storage") or {}
    counts = storage.get("counts", storage)  # runs made before the storage record had counts at the top
    text = f"{row['model']}@{row['sigma']:g}: mean sigma {row['sigma_mean']:.3f}, " + ", ".join(
        f"{k[2:]} {v}" for k, v in counts.items() if isinstance(v, int))
    diag = storage.get("ctr_clean_first_diagnostic")
    return text + (f" (diagnostic, clean-first CTR {diag:.3f}: not a certificate)" if diag is not None else "")
