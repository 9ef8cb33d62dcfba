"""Checks a SubmitJob request and turns it into the options a worker passes to `prune`.

Everything is checked here, in the server, before a job is queued: names, bounds and the
policy (a plain one or a `metaprune tune` recipe) by `metaprune.vocabulary` — the same checks
the library and the CLI run — then data references for existence and ownership. The worker
trusts nothing it did not get from this function.
"""

from __future__ import annotations

import math

from metaprune.errors import InvalidTargetError, MissingDataError
from metaprune.vocabulary import (
    PruneRequest,
    available_metanetworks as checkpoint_files,
    check_params_ratio,
    check_speedup,
    policy_from_json,
)

from . import limits as vocabulary
from .limits import Limits
from .store import JobStore

# protobuf enum value -> file suffix (pruning.proto ModelFormat)
FORMAT_NAMES = {1: "pt2", 2: "safetensors", 3: "onnx"}


class RequestError(Exception):
    """A request the service refuses, with the gRPC status name to answer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise _invalid(f"unknown {what} {value[:80]!r}; choose one of {', '.join(allowed)}")
    return value


def _policy(text: str) -> dict[str, float] | None:
    """The checked policy of a request: a plain policy or a recipe, as JSON text."""
    if not text:
        return None
    try:
        return policy_from_json(text)
    except InvalidTargetError as error:
        raise _invalid(str(error)) from None


def _checked(check, value):
    try:
        return check(value)
    except InvalidTargetError as error:
        raise _invalid(str(error)) from None


def available_metanetworks(folder=None) -> dict[str, str]:
    """Metanetwork name -> what `prune(metanet=...)` takes, for the checkpoints in `folder`
    (`metaprune serve --metanet-dir`; the ones the library ships when None).

    "default" (the library's own choice) is offered whenever a checkpoint exists; each file is
    also offered by its stem, resolved here to its path, so a client never sends a path.
    """
    return {name: "default" if name == "default" else str(path)
            for name, path in checkpoint_files(folder).items()}


def build_task(request, *, tenant: str, store: JobStore, metanetworks: dict[str, str],
               limits: Limits) -> dict:
    """The worker task (minus `kind`/`out_dir`) for a valid request; raises RequestError."""
    model = store.get_upload(request.model_id, tenant, "model")
    if model is None:
        raise RequestError("NOT_FOUND", f"no model with id {request.model_id[:80]!r}")

    method = _choice(request.method or "l2", vocabulary.METHODS, "method")
    options: dict = {"method": method}
    if request.criterion:
        options["criterion"] = _choice(request.criterion, vocabulary.CRITERIA, "criterion")
    if request.allocation:
        options["allocation"] = _choice(request.allocation, vocabulary.ALLOCATIONS, "allocation")
    if request.metanet:
        options["metanet"] = metanetworks[_choice(request.metanet, tuple(metanetworks), "metanetwork")]

    target = request.WhichOneof("target")
    if target == "speedup":
        options["speedup"] = _checked(check_speedup, request.speedup)
    elif target == "params_ratio":
        options["params_ratio"] = _checked(check_params_ratio, request.params_ratio)
    elif target == "latency_speedup":
        options["latency_speedup"] = request.latency_speedup  # bounds: PruneRequest below
    policy = _policy(request.policy_json)
    if policy is not None:
        options["policy"] = policy
    if target is None and policy is None:
        raise _invalid("give a target: speedup, params_ratio, latency_speedup or a policy")
    options.update(_latency_and_shape_options(request))

    data = None
    source = request.WhichOneof("data")
    if source == "dataset":
        data = _choice(request.dataset, vocabulary.DATASETS + vocabulary.TEXT_DATASETS,
                       "dataset")
    elif source == "data_id":
        upload = store.get_upload(request.data_id, tenant, "data")
        if upload is None:
            raise RequestError("NOT_FOUND", f"no data with id {request.data_id[:80]!r}")
        data = str(store.upload_dir(upload.id) / "data.npz")

    epochs = request.finetune_epochs
    if not 0 <= epochs <= limits.max_finetune_epochs:
        raise _invalid(f"finetune_epochs must be in [0, {limits.max_finetune_epochs}], got {epochs}")
    options["finetune_epochs"] = epochs
    finetune = _finetune_options(request)
    if finetune:
        options["finetune"] = finetune

    if (method == "metanet" or options.get("allocation") == "metanet") and not metanetworks:
        raise RequestError("FAILED_PRECONDITION",
                           "this server has no metanetwork checkpoint; use a classic criterion: "
                           + ", ".join(vocabulary.CRITERIA))
    criterion = options.get("criterion", "l2" if method == "metanet" else method)
    if data is None:
        if method == "metanet" or options.get("allocation") == "metanet":
            raise RequestError(
                "FAILED_PRECONDITION",
                "the metanetwork method needs data (a dataset or an uploaded .npz) to recover "
                "its rewritten weights; without data use a classic criterion: "
                + ", ".join(c for c in vocabulary.CRITERIA if c not in vocabulary.DATA_CRITERIA),
            )
        if criterion in vocabulary.DATA_CRITERIA:
            raise RequestError("FAILED_PRECONDITION", f"criterion {criterion!r} needs data")
        if epochs > 0:
            raise RequestError("FAILED_PRECONDITION", "fine-tuning needs data; give a dataset or data_id")

    output_format = FORMAT_NAMES.get(request.output_format, model.format)
    if request.output_format and request.output_format not in FORMAT_NAMES:
        raise _invalid(f"unknown output format {request.output_format}")
    if output_format == "safetensors" and model.format != "safetensors":
        raise _invalid("safetensors output needs a safetensors (zoo family) input; use pt2 or onnx")

    try:  # the library's own check of the whole request, as the worker will run it
        PruneRequest.from_options({**options, "data": data})
    except MissingDataError as error:
        raise RequestError("FAILED_PRECONDITION", str(error)) from None
    except InvalidTargetError as error:
        raise _invalid(str(error)) from None

    return {
        "model_path": str(store.upload_dir(model.id) / f"model.{model.format}"),
        "max_parameters": limits.max_parameters,
        "output_format": output_format,
        "options": options,
        "data": data,
    }


def _latency_and_shape_options(request) -> dict:
    """latency_batch, round_to, latency and exclude as `prune` takes them (DESIGN §6); their
    bounds are checked by PruneRequest with everything else."""
    options: dict = {}
    if request.latency_batch:
        options["latency_batch"] = request.latency_batch
    if request.round_to:
        options["round_to"] = int(request.round_to) if request.round_to.isdigit() else request.round_to
    if request.HasField("latency"):
        options["latency"] = request.latency
    if request.exclude:
        options["exclude"] = list(request.exclude)
    return options


def _finetune_options(request) -> dict:
    if not request.HasField("finetune"):
        return {}
    given = request.finetune
    options: dict = {}
    if given.HasField("optimizer"):
        options["optimizer"] = _choice(given.optimizer, vocabulary.OPTIMIZERS, "optimizer")
    if given.HasField("schedule"):
        options["schedule"] = _choice(given.schedule, vocabulary.SCHEDULES, "schedule")
    if given.HasField("lr"):
        if not math.isfinite(given.lr) or not 0 < given.lr <= 10:
            raise _invalid(f"lr must be in (0, 10], got {given.lr}")
        options["lr"] = given.lr
    for flag in ("distill", "bn_recalibration"):
        if given.HasField(flag):
            options[flag] = getattr(given, flag)
    return options
