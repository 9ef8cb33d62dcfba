"""The pruning report: the keys of `schema.REPORT_FIELDS`, JSON-serialisable."""

import json
import math
import os
from pathlib import Path

from metaprune.report.schema import DEPRECATED_ALIASES, REPORT_FIELDS, REPORT_FORMAT


def _plain(value):
    """Python scalars/lists/dicts only (tensors and numpy numbers become floats or ints)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def build_report(**values) -> dict:
    """The report dict: every key of `REPORT_FIELDS`, in order (null when not given).

    `speedup` is derived (MACs before / after) and `report_format` filled in; the deprecated
    `flops_*` aliases repeat `macs_*`. A key outside the schema, or a missing required one,
    is a TypeError: the schema is the one place a report key is defined.

    Example::

        report = build_report(version="0.1.0", macs_before=2_000, macs_after=1_000,
                              params_before=50, params_after=30, kept={"conv1": [8, 16]},
                              method="l2", criterion="l2", allocation="global", seconds={})
        report["speedup"], report["flops_after"]   # (2.0, 1000)
    """
    names = {f.name for f in REPORT_FIELDS}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"build_report got keys outside the report schema: {unknown}")
    missing = [f.name for f in REPORT_FIELDS if f.required and f.name not in values]
    if missing:
        raise TypeError(f"build_report is missing required keys: {missing}")
    values["report_format"] = REPORT_FORMAT
    macs_before, macs_after = int(values["macs_before"]), int(values["macs_after"])
    values["speedup"] = macs_before / macs_after if macs_after else None
    values["kept"] = {name: [int(k), int(t)] for name, (k, t) in values["kept"].items()}
    values["seconds"] = {phase: round(float(s), 4) for phase, s in values["seconds"].items()}
    report = {f.name: values.get(f.name) for f in REPORT_FIELDS}
    for alias, key in DEPRECATED_ALIASES.items():
        report[alias] = report[key]
    return _plain(report)


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Writes the report as indented JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(_plain(report), indent=2, sort_keys=False) + "\n")
    partial.replace(path)
    return path


def format_summary(report: dict) -> str:
    """A few human-readable lines: MACs, params, latency and accuracy before → after."""
    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [
        f"MACs     {report['macs_before']:,} -> {report['macs_after']:,} "
        f"(speed-up {report['speedup']:.3f}x)",
        f"params   {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.3f} of dense)",
        _latency_line(report),
        f"accuracy {percent(report['accuracy_before'])} -> {percent(report['accuracy_after'])}",
        f"method {report['method']}, criterion {report['criterion']}, "
        f"allocation {report['allocation']}",
    ]
    if report.get("perplexity_before") is not None:
        lines.insert(4, f"perplexity {report['perplexity_before']:.2f} -> "
                        f"{report['perplexity_after']:.2f} ({report['perplexity_objective']})")
    if report.get("input_adaptation"):
        lines.append(f"input    {report['input_adaptation']}")
    if report.get("finetune_skipped_reason"):
        lines.append(f"not fine-tuned: {report['finetune_skipped_reason']}")
    return "\n".join(lines)


def _latency_line(report: dict) -> str:
    if report.get("latency_ms_before") is None:
        return "latency  not measured (latency=False)"
    line = (f"latency  {report['latency_ms_before']:.2f} ms -> {report['latency_ms_after']:.2f} "
            f"ms (batch {report.get('latency_batch') or 64}, CPU)")
    if report.get("latency_speedup"):
        line += f", measured speed-up {report['latency_speedup']:.2f}x (paired, interleaved)"
    target = report.get("target")
    if target and not target.get("reached"):
        line += f"\ntarget   {target['kind']} {target['value']:g} not reached: {target.get('why')}"
    return line
