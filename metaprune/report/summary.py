"""The pruning report: exactly the keys DESIGN §5 lists, JSON-serialisable."""

import json
import math
import os
from pathlib import Path

REPORT_KEYS = (
    "flops_before", "flops_after", "params_before", "params_after", "speedup", "kept",
    "accuracy_before", "accuracy_after", "latency_ms_before", "latency_ms_after", "finetune",
    "finetune_skipped_reason", "method", "criterion", "allocation", "seconds",
)


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


def build_report(*, flops_before: int, flops_after: int, params_before: int, params_after: int,
                 kept: dict, accuracy_before: float | None, accuracy_after: float | None,
                 latency_ms_before: float, latency_ms_after: float, finetune: dict | None,
                 finetune_skipped_reason: str | None, method: str, criterion: str,
                 allocation: str, seconds: dict) -> dict:
    """The report dict; `speedup` is derived (MACs before / after).

    Example::

        report = build_report(flops_before=2_000, flops_after=1_000, params_before=50,
                              params_after=30, kept={"conv1": [8, 16]}, accuracy_before=None,
                              accuracy_after=None, latency_ms_before=1.0, latency_ms_after=0.6,
                              finetune=None, finetune_skipped_reason="no data",
                              method="l2", criterion="l2", allocation="global", seconds={})
        report["speedup"]   # 2.0
    """
    report = {
        "flops_before": int(flops_before),
        "flops_after": int(flops_after),
        "params_before": int(params_before),
        "params_after": int(params_after),
        "speedup": flops_before / flops_after if flops_after else None,
        "kept": {name: [int(k), int(t)] for name, (k, t) in kept.items()},
        "accuracy_before": None if accuracy_before is None else float(accuracy_before),
        "accuracy_after": None if accuracy_after is None else float(accuracy_after),
        "latency_ms_before": None if latency_ms_before is None else float(latency_ms_before),
        "latency_ms_after": None if latency_ms_after is None else float(latency_ms_after),
        "finetune": finetune,
        "finetune_skipped_reason": finetune_skipped_reason,
        "method": method,
        "criterion": criterion,
        "allocation": allocation,
        "seconds": {phase: round(float(s), 4) for phase, s in seconds.items()},
    }
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
        f"MACs     {report['flops_before']:,} -> {report['flops_after']:,} "
        f"(speed-up {report['speedup']:.3f}x)",
        f"params   {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['params_after'] / report['params_before']:.3f} of dense)",
        f"latency  {report['latency_ms_before']:.2f} ms -> {report['latency_ms_after']:.2f} ms "
        "(batch 64, CPU)",
        f"accuracy {percent(report['accuracy_before'])} -> {percent(report['accuracy_after'])}",
        f"method {report['method']}, criterion {report['criterion']}, "
        f"allocation {report['allocation']}",
    ]
    if report.get("finetune_skipped_reason"):
        lines.append(f"not fine-tuned: {report['finetune_skipped_reason']}")
    return "\n".join(lines)
