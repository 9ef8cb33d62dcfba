"""Checks a job's options against what the upload's validation recorded about the model.

The server process never loads a client's model; the validating worker stored the model's
module names, the modules with prunable output channels and how far pruning can go at most
(:func:`metaprune.serving.worker.pruning_facts`). A target out of reach or a policy or
`exclude` naming a module the model lacks is refused at submit, before a job is queued, with
the same words the library would use later.

Example::

    check_options({"speedup": 1000.0}, upload.info)   # RequestError INVALID_ARGUMENT
"""

from __future__ import annotations

from .job_request import RequestError

_MARGIN = 1.02  # the library's tolerance on a target (DESIGN §5: within 2 %)


def check_options(options: dict, facts: dict) -> None:
    """Raise RequestError (INVALID_ARGUMENT) when `options` cannot apply to the model."""
    max_speedup, min_ratio = facts.get("max_speedup"), facts.get("min_params_ratio")
    speedup, ratio = options.get("speedup"), options.get("params_ratio")
    if speedup is not None and max_speedup and speedup > max_speedup * _MARGIN:
        raise RequestError("INVALID_ARGUMENT",
                           f"speedup {speedup:g} is out of reach for this model: with one channel "
                           f"left in every prunable group it reaches {max_speedup:.3g}")
    if ratio is not None and min_ratio and ratio < min_ratio / _MARGIN:
        raise RequestError("INVALID_ARGUMENT",
                           f"params_ratio {ratio:g} is out of reach for this model: with one channel "
                           f"left in every prunable group it keeps {min_ratio:.3g} of its parameters")
    prunable = facts.get("prunable_modules")
    for name in (options.get("policy") or {}) if prunable is not None else ():
        if name not in prunable:
            raise RequestError("INVALID_ARGUMENT",
                               f"policy names module {name[:80]!r}, which has no prunable output "
                               f"channels in this model (prunable modules include: "
                               f"{', '.join(prunable[:8])})")
    names = facts.get("module_names")
    for name in options.get("exclude") or () if names is not None else ():
        if name not in names:
            raise RequestError("INVALID_ARGUMENT",
                               f"exclude names module {name[:80]!r}, which the model does not have")
