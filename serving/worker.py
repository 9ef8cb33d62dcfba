"""What runs inside a worker process: model/data validation and pruning jobs.

The server process never loads a model: every byte a client sent is parsed here, in a process
with an address-space limit, no core dumps, and a parent-death signal, so a hostile or huge
file can at worst kill this process, never the server. Both back-ends (the local process pool
and Ray) call :func:`run_task`; they differ only in how events travel back.

A task is a plain dict (it crosses process boundaries)::

    {"kind": "validate_model", "model_path": ".../model.pt2", "max_parameters": 100_000_000}
    {"kind": "validate_model", "model_path": ".../model.hf", "archive": ".../model.tar",
     "max_parameters": ..., "max_bytes": ...}   (a HuggingFace folder, unpacked here)
    {"kind": "validate_data", "data_path": ".../data.npz"}
    {"kind": "prune", "model_path": ..., "out_dir": ..., "output_format": "pt2",
     "options": {"method": "l2", "speedup": 2.0, ...}, "data": "digits" | ".../data.npz" | None}
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import traceback
from collections.abc import Callable
from pathlib import Path

from .fate import die_with_parent

Emit = Callable[[dict], None]


class TaskFailure(Exception):
    """A task ended with a gRPC status code name and a message meant for the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def apply_process_limits(memory_bytes: int, threads: int, *, parent_pid: int | None = None) -> None:
    """Confine the current (worker) process: memory, core dumps, threads, parent death.

    `parent_pid`: the parent this process must have (the fork server); if it already died, the
    process exits at once instead of running on as an orphan.
    """
    # die with our parent (the fork server, which dies with the server): no orphan job
    die_with_parent(parent_pid)
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    import torch

    torch.set_num_threads(threads)


# How running out of the address-space limit shows when it is not a MemoryError: a failed
# allocation inside a C extension, or the dynamic loader unable to map a library that a lazy
# import loads only now (seen on the Ray back-end under --worker-memory-mb 256).
_OUT_OF_MEMORY_SIGNS = ("can't allocate memory", "Cannot allocate memory", "failed to map segment")


def failure_code(error: BaseException) -> str:
    """The gRPC status name a library error maps to (DESIGN.md §5)."""
    from metaprune.errors import DatasetUnavailableError, MetaPruneError

    if isinstance(error, TaskFailure):
        return error.code
    if isinstance(error, MemoryError) or any(sign in str(error) for sign in _OUT_OF_MEMORY_SIGNS):
        return "RESOURCE_EXHAUSTED"
    if isinstance(error, DatasetUnavailableError):
        return "FAILED_PRECONDITION"
    if isinstance(error, MetaPruneError):
        return "INVALID_ARGUMENT"
    return "INTERNAL"


def failure_message(error: BaseException) -> str:
    if failure_code(error) == "RESOURCE_EXHAUSTED" and not isinstance(error, TaskFailure):
        return f"the worker ran out of its memory limit: {str(error)[:300]}"
    if failure_code(error) == "INTERNAL":
        return f"internal error in the worker: {type(error).__name__}: {str(error)[:500]}"
    return str(error)[:2000]


def _first_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first_tensor(list(value.values()))
    return None


def _check_finite(module) -> None:
    import torch
    from metaprune.errors import ModelFormatError

    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"the model holds NaN or infinite values in {name!r}")


def validate_model(task: dict, emit: Emit) -> dict:
    """Load an uploaded model strictly, check its size and values, run it once."""
    import torch
    from metaprune.formats import load_model
    from metaprune.errors import ModelFormatError
    from metaprune.measure import count_macs, count_params

    emit({"kind": "phase", "phase": "validating"})
    limit = task["max_parameters"]
    if task.get("archive"):  # a HuggingFace folder's tar: checked entry by entry, unpacked
        from metaprune.formats.hf_archive import extract_hf_archive

        try:
            extract_hf_archive(task["archive"], task["model_path"], max_bytes=task["max_bytes"])
        finally:
            Path(task["archive"]).unlink(missing_ok=True)
    try:  # the intake counts parameters from the file's metadata, before allocating them
        module, example_inputs = load_model(task["model_path"], max_params=limit)
    except ModelFormatError as error:
        if f"more than the limit {limit}" in str(error):  # the intake's wording for this limit
            raise TaskFailure("RESOURCE_EXHAUSTED", f"the model has too many parameters: {error}") from None
        raise
    num_parameters = count_params(module)
    if num_parameters > limit:
        raise TaskFailure(
            "RESOURCE_EXHAUSTED",
            f"the model has {num_parameters:,} parameters; this server accepts at most "
            f"{task['max_parameters']:,}",
        )
    _check_finite(module)
    module.eval()
    with torch.no_grad():
        output = _first_tensor(module(*example_inputs))
    if output is None:
        raise TaskFailure("INVALID_ARGUMENT", "the model's forward pass returns no tensor")
    first_input = _first_tensor(list(example_inputs))
    return {
        "num_parameters": int(num_parameters),
        "macs": int(count_macs(module, example_inputs)),
        "input_shape": list(first_input.shape) if first_input is not None else [],
        "output_shape": list(output.shape),
        "num_inputs": len(example_inputs),
        **pruning_facts(module, example_inputs),
    }


# module names recorded for checks at submit; a model with more leaves them to the worker
MAX_RECORDED_NAMES = 5000


def pruning_facts(module, example_inputs) -> dict:
    """What a submit is checked against without loading the model again (the server process
    never does): the module names, the ones with prunable output channels, and how far pruning
    can go at most (every prunable group down to one channel). Empty when the analysis fails:
    the job then reports the problem itself."""
    import torch
    from metaprune.pruning.cost import CostModel
    from metaprune.pruning.graph_groups import plan_channel_groups

    names = [name for name, _ in module.named_modules() if name]
    try:  # the pruner's own groups (torch-pruning's search never ends on hand-written attention)
        graph, groups = plan_channel_groups(module, example_inputs)
        cost = CostModel(module, example_inputs, graph, groups)
        cost.set_orders([torch.arange(group.size) for group in groups])
        macs, params = cost.evaluate([group.size - 1 if group.blocked is None else 0 for group in groups])
    except Exception:  # noqa: BLE001 - see the docstring
        return {}
    prunable = sorted({use.unit for group in groups for use in group.uses if use.side == "out"})
    return {
        "module_names": names if len(names) <= MAX_RECORDED_NAMES else None,
        "prunable_modules": prunable if len(prunable) <= MAX_RECORDED_NAMES else None,
        "max_speedup": float(cost.macs_before / macs) if macs > 0 else None,
        "min_params_ratio": float(params / cost.params_before) if cost.params_before else None,
    }


def validate_data(task: dict, emit: Emit) -> dict:
    """Check an uploaded .npz through the library's own dataset intake."""
    from metaprune.data import load_dataset

    emit({"kind": "phase", "phase": "validating"})
    dataset = load_dataset(task["data_path"])
    return {
        "input_shape": list(dataset.input_shape),
        "num_classes": int(dataset.num_classes),
        "train_samples": int(dataset.x_train.shape[0]),
        "test_samples": int(dataset.x_test.shape[0]),
    }


class _LogForwarder(logging.Handler):
    """Turns the library's log records (phases, epoch metrics) into job events."""

    def __init__(self, emit: Emit):
        super().__init__(level=logging.INFO)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        event = {"kind": "log", "message": record.getMessage()[:1000]}
        epoch = getattr(record, "epoch", None)
        if isinstance(epoch, int):
            event["kind"] = "metrics"
            event["epoch"] = epoch
            event["metrics"] = {
                key: float(value)
                for key, value in (getattr(record, "metrics", None) or {}).items()
                if isinstance(value, (int, float)) and math.isfinite(value)
            }
        phase = getattr(record, "phase", None)
        if isinstance(phase, str):
            event["kind"] = "phase"
            event["phase"] = phase
        try:
            self._emit(event)
        except (OSError, ValueError):  # the server went away; the job result still lands on disk
            pass


def _choose_in_folder(options: dict, module, data, folder: str | None) -> dict | None:
    """With `metaprune serve --metanet-dir`, "default" means the checkpoint of that folder whose
    scope fits the model; returns the report's metanet entry (with the reason) or None."""
    from metaprune.metanet.scope import select_metanet
    from metaprune.vocabulary import PruneRequest

    if folder is None or PruneRequest.from_options({**options, "data": data}).resolved_metanet != "default":
        return None
    chosen, entry = select_metanet("default", module, data, folder=folder)
    options["metanet"] = str(chosen)
    return entry


def run_prune(task: dict, emit: Emit) -> dict:
    """Load, prune, save; returns the report. Files land in task["out_dir"]."""
    from metaprune.formats import load_model, save_model
    from metaprune.pruning import prune

    out_dir = Path(task["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = _LogForwarder(emit)
    library_log = logging.getLogger("metaprune")
    library_log.addHandler(handler)
    library_log.setLevel(logging.INFO)
    try:
        emit({"kind": "phase", "phase": "loading"})
        module, example_inputs = load_model(task["model_path"], max_params=task["max_parameters"])
        emit({"kind": "phase", "phase": "pruning"})
        options = dict(task["options"])
        chosen = _choose_in_folder(options, module, task.get("data"), task.get("metanet_dir"))
        result = prune(module, example_inputs, data=task.get("data"), **options)
        emit({"kind": "phase", "phase": "saving"})
        if task["output_format"] == "hf":  # save_pretrained, sent as one archive
            from metaprune.formats.hf_archive import write_hf_archive

            save_model(result.model, example_inputs, str(out_dir / "model"))
            write_hf_archive(out_dir / "model", out_dir / result_file_name("hf"))
        else:
            model_path = out_dir / result_file_name(task["output_format"])
            save_model(result.model, example_inputs, str(model_path))
    finally:
        library_log.removeHandler(handler)
    report = dict(result.report)
    if chosen is not None:  # the folder's choice and its reason, not "given by path"
        report["metanet"] = chosen
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def result_file_name(output_format: str) -> str:
    """The pruned model's file in a job's result folder (a HuggingFace folder: its tar)."""
    return "model.tar" if output_format == "hf" else f"model.{output_format}"


TASKS = {"validate_model": validate_model, "validate_data": validate_data, "prune": run_prune}


def run_task(task: dict, emit: Emit) -> dict:
    """Run one task; raises TaskFailure (with a status code) for every failure."""
    try:
        return TASKS[task["kind"]](task, emit)
    except TaskFailure:
        raise
    except BaseException as error:  # noqa: BLE001 - every failure becomes a status for the client
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        code = failure_code(error)
        if code == "INTERNAL":
            traceback.print_exc()
        raise TaskFailure(code, failure_message(error)) from error


def process_main(task: dict, connection, memory_bytes: int, threads: int) -> None:
    """Entry point of a local worker process: results and events go back on `connection`."""
    try:
        forkserver = os.environ.get("METAPRUNE_FORKSERVER_PID", "")
        apply_process_limits(memory_bytes, threads,
                             parent_pid=int(forkserver) if forkserver.isdigit() else None)
        result = run_task(task, lambda event: connection.send(("event", event)))
        connection.send(("result", result))
    except TaskFailure as failure:
        connection.send(("failure", failure.code, failure.message))
    except MemoryError:
        connection.send(("failure", "RESOURCE_EXHAUSTED", "the worker ran out of its memory limit"))
    finally:
        connection.close()
