"""Strict intake of untrusted ``.pt2`` archives.

``torch.export.load`` is not safe on client bytes (torch 2.13, read from its sources):

* ``data/sample_inputs/model.pt`` is unpickled with ``weights_only=True`` and, when that fails,
  *again with full pickle* (``torch/_export/serde/serialize.py: deserialize_torch_artifact``);
* weight/constant payloads flagged ``use_pickle: true``, ``custom_obj_*`` and ``opaque_obj_*``
  constants and a legacy ``data/constants/model.pt`` are unpickled with full pickle
  (``torch/export/pt2_archive/_package.py``);
* every symbolic-shape ``expr_str`` in ``models/model.json`` goes through ``sympy.sympify``,
  which ``eval``s the string;
* node targets are resolved by ``getattr`` chains from ``torch``, ``operator`` and ``math``,
  so the graph could call e.g. ``torch.load`` or ``aten::from_file`` when run;
* ``guards_code`` holds Python source compiled when the program is turned into a module.

:func:`read_pt2_strict` therefore proves, before torch ever sees the bytes, that the archive is a
bounded zip holding only the members a plain ``torch.export.save`` writes, that every payload is
raw tensor bytes whose size matches its ``tensor_meta``, that every symbolic expression is
arithmetic over size symbols and every node target is an ATen operator (or a symbolic-int
helper); then it writes a *sanitised* copy (no sample inputs, no guard code) in memory and
hands only that copy to ``torch.export.load``. The ``sample_inputs`` member is loaded by us with
``weights_only=True`` on its own bytes and rejected if that fails.

Example::

    from metaprune.formats.intake import IntakeLimits, read_pt2_strict
    program, sample_inputs = read_pt2_strict("client.pt2", IntakeLimits(max_params=10_000_000))
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass

import torch

from metaprune.errors import ModelFormatError

_MODEL_NAME = "model"

# Member paths (below the archive's root folder) that a plain torch.export.save writes.
_FIXED_MEMBERS = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_WEIGHT_MEMBER = re.compile(r"data/weights/weight_\d{1,9}")
_CONSTANT_MEMBER = re.compile(r"data/constants/tensor_\d{1,9}")
_ROOT_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

# schema.ScalarType code -> torch dtype; only plain float / int / bool tensors are accepted.
_DTYPES = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
_STRIDED_LAYOUT = 7

# Symbolic size expressions may only use these names besides size symbols like s0 / u3.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "True", "False", "positive", "integer",
    "nonnegative", "real", "finite", "Mod", "PythonMod", "FloorDiv", "CleanDiv", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "TruncToFloat", "RoundToInt", "RoundDecimal",
    "ToFloat", "FloorToInt", "CeilToInt", "Max", "Min", "Abs", "Identity", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "Piecewise", "IsNonOverlappingAndDenseIndicator",
}
# Powers and shifts are left out on purpose: sympy evaluates them exactly, so Pow(9, 10**9)
# would be a denial of service; batch-size expressions never need them.
_SIZE_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}")
_EXPR_TOKEN = re.compile(
    r"\s+|==|!=|<=|>=|[A-Za-z_][A-Za-z0-9_]*|\d{1,18}(?:\.\d{1,18})?(?![0-9])|'[a-z]{1,4}\d{1,9}'|[-+*/%(),=<>]"
)

# Node targets: ATen operators, and the few Python callables export uses for symbolic ints.
_OPERATOR_TARGETS = {
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul",
    "_operator.floordiv", "_operator.truediv", "_operator.mod", "_operator.neg",
    "_operator.pow", "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le",
    "_operator.gt", "_operator.ge", "_operator.and_", "_operator.or_", "_operator.not_",
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_sqrt", "torch.sym_ite", "torch.sym_sum", "math.ceil", "math.floor",
    "math.trunc", "math.sqrt",
}
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
# ATen operators that touch the file system or re-point tensors at raw storage.
_FORBIDDEN_ATEN = re.compile(r"file|save|load|storage|from_blob|^set_$", re.IGNORECASE)

_INPUT_SPEC_KINDS = {"parameter", "buffer", "tensor_constant", "user_input", "constant_input"}


@dataclass(frozen=True)
class IntakeLimits:
    """Bounds applied to an untrusted archive.

    Example::

        limits = IntakeLimits(max_params=1_000_000)   # refuse models above 1 M parameters
    """

    #: largest archive file accepted, in bytes
    max_file_bytes: int = 512 * 2**20
    #: largest sum of uncompressed member sizes, in bytes
    max_total_bytes: int = 2 * 2**30
    #: most members in the zip
    max_members: int = 20_000
    #: largest compression ratio for members above 1 MiB (zip bombs)
    max_ratio: float = 100.0
    #: largest models/model.json or config member, in bytes
    max_json_bytes: int = 64 * 2**20
    #: most parameters (elements of all parameter tensors)
    max_params: int = 100_000_000
    #: most elements in one stored tensor
    max_tensor_numel: int = 2**31 - 1
    #: most elements over all stored tensors (a zero stride could make a tiny payload huge)
    max_state_numel: int = 2**28
    #: most elements in one example input rebuilt from the graph's input specs
    max_input_numel: int = 2**25
    #: most elements in any intermediate tensor the graph declares (bounds memory when run)
    max_activation_numel: int = 2**28


def _fail(message: str) -> ModelFormatError:
    return ModelFormatError(f"invalid .pt2 archive: {message}")


def _open_zip(data: bytes) -> zipfile.ZipFile:
    if not data:
        raise _fail("the file is empty")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as err:
        raise _fail(f"not a readable zip file ({err})") from err


def _member_map(archive: zipfile.ZipFile, limits: IntakeLimits) -> dict:
    """Check names, count and sizes; return relative path (below the root folder) -> ZipInfo."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise _fail(f"{len(infos)} members, more than the limit {limits.max_members}")
    total = sum(info.file_size for info in infos)
    if total > limits.max_total_bytes:
        raise _fail(f"members expand to {total} bytes, more than the limit {limits.max_total_bytes}")
    members: dict[str, zipfile.ZipInfo] = {}
    root = None
    for info in infos:
        name = info.filename
        if info.is_dir():
            continue
        head, _, rel = name.partition("/")
        if not _ROOT_NAME.fullmatch(head) or head in (".", ".."):
            raise _fail(f"unexpected member {name!r}")
        if root is None:
            root = head
        elif head != root:
            raise _fail(f"members under two roots ({root!r}, {head!r})")
        if not (rel in _FIXED_MEMBERS or _WEIGHT_MEMBER.fullmatch(rel) or _CONSTANT_MEMBER.fullmatch(rel)):
            raise _fail(f"unexpected member {name!r} (only plain torch.export.save archives are accepted)")
        if rel in members:
            raise _fail(f"duplicate member {name!r}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(f"member {name!r} uses an unsupported compression method")
        if info.file_size > 2**20 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _fail(f"member {name!r} has a compression ratio above {limits.max_ratio:g} (zip bomb?)")
        members[rel] = info
    if root is None:
        raise _fail("the zip holds no members")
    for required in ("archive_version", "models/model.json", "data/weights/model_weights_config.json",
                     "data/constants/model_constants_config.json"):
        if required not in members:
            raise _fail(f"missing member {root}/{required}")
    return members


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as err:  # RuntimeError: encrypted member
        raise _fail(f"member {info.filename!r} cannot be read ({err})") from err
    if len(data) != info.file_size:
        raise _fail(f"member {info.filename!r} is truncated")
    return data


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IntakeLimits):
    if info.file_size > limits.max_json_bytes:
        raise _fail(f"member {info.filename!r} is larger than {limits.max_json_bytes} bytes")
    try:
        return json.loads(_read(archive, info))
    except (ValueError, RecursionError) as err:
        raise _fail(f"member {info.filename!r} is not valid JSON ({err})") from err


def _as_int(value, what: str) -> int:
    if not (isinstance(value, dict) and set(value) == {"as_int"} and type(value["as_int"]) is int):
        raise _fail(f"{what} must be a plain integer, got {value!r:.80}")
    return value["as_int"]


def _check_payload_config(config, kind: str, members: dict, limits: IntakeLimits) -> tuple[int, int]:
    """Validate a weights/constants config; return (parameter elements, all elements)."""
    prefix = "weight_" if kind == "weights" else "tensor_"
    folder = f"data/{kind}/"
    if not (isinstance(config, dict) and set(config) == {"config"} and isinstance(config["config"], dict)):
        raise _fail(f"model_{kind}_config.json must be {{'config': {{...}}}}")
    params = total = 0
    needed: dict[str, int] = {}
    exact: dict[str, list[int]] = {}
    for fqn, meta in config["config"].items():
        where = f"{kind} entry {fqn!r}"
        if not isinstance(meta, dict):
            raise _fail(f"{where} is not an object")
        if meta.get("use_pickle") is not False:
            raise _fail(f"{where} is stored as a pickle (use_pickle must be false)")
        path = meta.get("path_name")
        if not (isinstance(path, str) and path.startswith(prefix) and folder + path in members):
            raise _fail(f"{where} points at a missing or unexpected payload {path!r:.80}")
        tensor_meta = meta.get("tensor_meta")
        if not isinstance(tensor_meta, dict):
            raise _fail(f"{where} has no tensor_meta")
        code = tensor_meta.get("dtype")
        dtype = _DTYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise _fail(f"{where} has an unsupported dtype code {tensor_meta.get('dtype')!r:.20}"
                        " (only float, int and bool tensors)")
        if tensor_meta.get("layout") != _STRIDED_LAYOUT:
            raise _fail(f"{where} is not a dense strided tensor")
        device = tensor_meta.get("device")
        if not (isinstance(device, dict) and device.get("type") == "cpu"):
            raise _fail(f"{where} is not on the CPU (export the model on CPU)")
        raw_sizes, raw_strides = tensor_meta.get("sizes"), tensor_meta.get("strides")
        if not (isinstance(raw_sizes, list) and isinstance(raw_strides, list)):
            raise _fail(f"{where} has no size / stride lists")
        sizes = [_as_int(s, f"{where} size") for s in raw_sizes]
        strides = [_as_int(s, f"{where} stride") for s in raw_strides]
        offset = _as_int(tensor_meta.get("storage_offset", {"as_int": 0}), f"{where} storage offset")
        if len(sizes) != len(strides) or len(sizes) > 8:
            raise _fail(f"{where} has {len(sizes)} sizes and {len(strides)} strides")
        if any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
            raise _fail(f"{where} has a negative size, stride or offset")
        numel = math.prod(sizes)
        if numel > limits.max_tensor_numel:
            raise _fail(f"{where} has an absurd shape {sizes}")
        total += numel
        if meta.get("is_param"):
            params += numel
        itemsize = torch.empty((), dtype=dtype).element_size()
        extent = 0 if numel == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
        needed[path] = max(needed.get(path, 0), extent * itemsize)
        contiguous = offset == 0 and strides == [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        exact.setdefault(path, []).append(numel * itemsize if contiguous else -1)
    for path, size in needed.items():
        actual = members[folder + path].file_size
        views = exact[path]
        if actual < size or (len(views) == 1 and views[0] >= 0 and actual != views[0]):
            raise _fail(f"payload {folder}{path} holds {actual} bytes but its tensor_meta needs {size}")
    unused = [rel for rel in members if rel.startswith(folder + prefix) and rel[len(folder):] not in needed]
    if unused:
        raise _fail(f"unreferenced payload member {unused[0]!r}")
    return params, total


def _check_expr(expr: str) -> None:
    if not isinstance(expr, str) or len(expr) > 4096:
        raise _fail("a symbolic size expression is not a short string")
    if any(op in expr.replace(" ", "") for op in ("**", "<<", ">>")):
        raise _fail(f"symbolic size expression {expr!r:.80} uses a power or shift")
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            raise _fail(f"symbolic size expression {expr!r:.80} holds a forbidden character")
        token = match.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _SYMPY_NAMES \
                and not _SIZE_SYMBOL.fullmatch(token):
            raise _fail(f"symbolic size expression {expr!r:.80} uses the name {token!r}")
        pos = match.end()


def _check_target(target) -> None:
    if not isinstance(target, str):
        raise _fail("a graph node has no operator name")
    if target in _OPERATOR_TARGETS:
        return
    if not _ATEN_TARGET.fullmatch(target):
        raise _fail(f"graph node calls {target!r:.100}; only ATen operators are accepted")
    if _FORBIDDEN_ATEN.search(target.split(".")[3]):
        raise _fail(f"graph node calls the file-system operator {target!r}")


def _check_activation_sizes(graph: dict, limits: IntakeLimits) -> None:
    """Refuse graphs declaring intermediate tensors too large to run (sizes or their hints)."""
    values = graph.get("tensor_values") or {}
    if not isinstance(values, dict):
        raise _fail("graph tensor_values is not an object")
    for name, meta in values.items():
        sizes = meta.get("sizes") if isinstance(meta, dict) else None
        if not isinstance(sizes, list):
            raise _fail(f"graph value {name!r:.60} has no sizes")
        numel = 1
        for size in sizes:
            value = size.get("as_int") if isinstance(size, dict) else None
            if value is None and isinstance(size, dict) and isinstance(size.get("as_expr"), dict):
                hint = size["as_expr"].get("hint")
                value = hint.get("as_int") if isinstance(hint, dict) else 1
            if type(value) is not int or value < 0:
                value = 1
            numel *= value
        if numel > limits.max_activation_numel:
            raise _fail(f"graph value {name!r:.60} has {numel} elements, more than the limit "
                        f"{limits.max_activation_numel}")


def _check_int_list(values: list, limits: IntakeLimits) -> None:
    """Size-like int lists (zeros, expand, view sizes) must not describe absurd tensors."""
    numel = 1
    for value in values:
        if type(value) is not int:
            raise _fail(f"an integer list holds {value!r:.40}")
        numel *= max(abs(value), 1)
        if numel > limits.max_activation_numel:
            raise _fail(f"an operator argument {values[:8]!r:.120} describes more than "
                        f"{limits.max_activation_numel} elements")


def _check_model_json(model: dict, limits: IntakeLimits) -> None:
    """Walk the serialized program: expressions, targets, signature kinds, no custom objects."""
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        raise _fail("models/model.json does not describe an exported program")
    graph_module = model["graph_module"]
    graph = graph_module.get("graph")
    if not isinstance(graph, dict):
        raise _fail("models/model.json has no graph")
    if graph.get("custom_obj_values"):
        raise _fail("the program holds custom (script/opaque) objects")
    signature = graph_module.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("input_specs"), list):
        raise _fail("models/model.json has no graph signature")
    for spec in signature["input_specs"]:
        kinds = set(spec) if isinstance(spec, dict) else {"?"}
        if not kinds <= _INPUT_SPEC_KINDS:
            raise _fail(f"unsupported graph input kind {sorted(kinds)}")
    constraints = model.get("range_constraints") or {}
    if not isinstance(constraints, dict):
        raise _fail("range_constraints is not an object")
    for name in constraints:
        if not _SIZE_SYMBOL.fullmatch(name):
            raise _fail(f"range constraint on an unexpected symbol {name!r:.40}")

    stack = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                _check_expr(item["expr_str"])
            if "target" in item and "inputs" in item and "outputs" in item:
                _check_target(item["target"])
            if isinstance(item.get("as_ints"), list):
                _check_int_list(item["as_ints"], limits)
            if "as_custom_obj" in item or "as_opaque_obj" in item:
                raise _fail("the program holds custom (script/opaque) objects")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _load_sample_inputs(data: bytes):
    """Unpickle the sample inputs with the weights-only unpickler, or refuse the archive."""
    try:
        loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # any failure means the member holds more than plain tensors
        raise _fail("data/sample_inputs holds a pickle that is not plain tensors "
                    f"(refused, it was not executed): {type(err).__name__}") from err
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], tuple)):
        raise _fail("data/sample_inputs is not an (args, kwargs) pair")
    return loaded


def _validate(archive: zipfile.ZipFile, members: dict, limits: IntakeLimits):
    """All content checks; returns (model JSON without guard code, sample inputs, parameters)."""
    version = _read(archive, members["archive_version"]).decode("ascii", "replace").strip()
    if version != "0":
        raise _fail(f"archive_version {version!r:.20} is not supported (expected '0')")
    weights_config = _read_json(archive, members["data/weights/model_weights_config.json"], limits)
    constants_config = _read_json(archive, members["data/constants/model_constants_config.json"], limits)
    params, weight_elements = _check_payload_config(weights_config, "weights", members, limits)
    _, constant_elements = _check_payload_config(constants_config, "constants", members, limits)
    if params > limits.max_params:
        raise _fail(f"{params} parameters, more than the limit {limits.max_params}")
    if weight_elements + constant_elements > limits.max_state_numel:
        raise _fail(f"{weight_elements + constant_elements} stored elements, more than the limit "
                    f"{limits.max_state_numel}")
    model = _read_json(archive, members["models/model.json"], limits)
    _check_model_json(model, limits)
    _check_activation_sizes(model["graph_module"]["graph"], limits)
    model["guards_code"] = []  # Python source run when the program becomes a module
    sample_inputs = None
    if "data/sample_inputs/model.pt" in members:
        info = members["data/sample_inputs/model.pt"]
        if info.file_size > limits.max_json_bytes:
            raise _fail("data/sample_inputs is too large")
        sample_inputs = _load_sample_inputs(_read(archive, info))
    return model, sample_inputs, params


def sanitised_archive(path: str | os.PathLike, limits: IntakeLimits) -> tuple[bytes, tuple | None, int]:
    """Validate the archive at ``path`` and rebuild it with only safe members.

    Returns the sanitised zip bytes (root folder ``model``, an empty sample-inputs member, no guard code),
    the verified sample inputs ``(args, kwargs)`` or None, and the parameter count.
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ModelFormatError(f"cannot read model file {os.fspath(path)!r}: {err.strerror}") from err
    if size > limits.max_file_bytes:
        raise _fail(f"{size} bytes, more than the limit {limits.max_file_bytes}")
    with open(path, "rb") as handle:
        data = handle.read()
    archive = _open_zip(data)
    with archive:
        members = _member_map(archive, limits)
        try:
            model, sample_inputs, params = _validate(archive, members, limits)
        except (TypeError, AttributeError, KeyError, IndexError) as err:
            # JSON of the wrong shape somewhere the checks above did not name
            raise _fail(f"malformed metadata ({type(err).__name__}: {err})"[:500]) from err

        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as clean:
            # torch.export.load requires the member; empty bytes mean "no sample inputs"
            clean.writestr(f"{_MODEL_NAME}/data/sample_inputs/model.pt", b"")
            for rel, info in members.items():
                if rel == "data/sample_inputs/model.pt":
                    continue
                payload = json.dumps(model).encode() if rel == "models/model.json" else _read(archive, info)
                clean.writestr(f"{_MODEL_NAME}/{rel}", payload)
    return out.getvalue(), sample_inputs, params


def read_pt2_strict(path: str | os.PathLike, limits: IntakeLimits | None = None):
    """Load an ExportedProgram from an untrusted ``.pt2`` after the strict intake check.

    Args:
        path: the archive on disk.
        limits: bounds on size, members and parameters (``IntakeLimits()`` by default).

    Returns:
        ``(exported_program, sample_inputs)``; ``sample_inputs`` is the verified
        ``(args, kwargs)`` pair saved with the program, or None when the archive had none.

    Raises:
        ModelFormatError: anything wrong with the file, with the reason in the message.
    """
    limits = limits or IntakeLimits()
    clean, sample_inputs, _ = sanitised_archive(path, limits)
    try:
        program = torch.export.load(io.BytesIO(clean))
    except Exception as err:  # torch raises many types on malformed programs; all are the client's
        raise _fail(f"torch.export.load rejected the program: {type(err).__name__}: {err}"[:2000]) from err
    return program, sample_inputs
