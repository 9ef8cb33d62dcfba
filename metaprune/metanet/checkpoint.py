"""Metanetwork checkpoints: safetensors weights + a sibling JSON config, checked on load.

``NAME.safetensors`` holds the weights (no pickle anywhere); ``NAME.json`` holds
``{"format": "metaprune-metanet", "version": 1, "config": {...}, "scope": {...},
"training": {...}, "num_parameters": N}``: the architecture hyper-parameters (`MetaNetwork`'s
constructor arguments), the families and datasets it serves (`metaprune.metanet.scope`) and
free-form training metadata, with machine paths cut to their last component. Loading validates every config value and every
tensor name, shape and dtype before any of it reaches the network; whatever is wrong raises
`ModelFormatError`.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaprune.errors import ModelFormatError
from metaprune.metanet.linear_messages import LINEAR_AGGREGATIONS
from metaprune.metanet.network import MESSAGE_KINDS, MetaNetwork
from metaprune.metanet.scope import portable_record, scope_of

FORMAT = "metaprune-metanet"
VERSION = 1
MAX_CHECKPOINT_BYTES = 64 * 2**20  # a metanetwork is small; anything bigger is not ours
MAX_CONFIG_BYTES = 2**20
AGGREGATIONS = ("sum", "mean", "max", "min", "std", "var")
MAX_WIDTH, MAX_LAYERS = 1024, 16
MAX_GATE_RANGE = 10.0  # exp(-10): a channel faded to nothing; beyond that is no longer a gate


def config_path(path: str | Path) -> Path:
    """The JSON config beside a checkpoint: ``metanet.safetensors`` -> ``metanet.json``."""
    return Path(path).with_suffix(".json")


# the ReZero-style scalar of `MetaNetwork`; older checkpoints lack it
GAIN = "rewrite_gain"


def save_metanet(metanet: MetaNetwork, path: str | Path, training: dict | None = None,
                 scope: dict | None = None) -> Path:
    """Writes `metanet`'s weights to `path` (``.safetensors``) and its config beside it.

    Args:
        metanet: the network to save.
        path: target file; must end in ``.safetensors``.
        training: JSON-serialisable training metadata (corpus, steps, losses, ...); absolute
            paths in it are cut to their last component.
        scope: ``{"families": [...], "datasets": [...], "universal": bool}``, what the
            checkpoint serves (None: universal, unscoped).

    Example::

        save_metanet(metanet, "metaprune/checkpoints/metanet.safetensors",
                     training={"corpus": "mnist1d", "steps": 2000})
        loaded = load_metanet("metaprune/checkpoints/metanet.safetensors")
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a metanetwork checkpoint must end in .safetensors, got {str(path)!r}")
    state = {name: value.detach().contiguous().clone()
             for name, value in metanet.state_dict().items()}
    document = {
        "format": FORMAT, "version": VERSION, "config": metanet.config,
        "scope": scope_of({"scope": scope}), "training": portable_record(dict(training or {})),
        "num_parameters": metanet.num_parameters,
    }
    text = json.dumps(document, indent=2, sort_keys=True)  # fails early on unserialisable data
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": FORMAT, "version": str(VERSION)})
    config_path(path).write_text(text + "\n")
    return path


def _positive_int(config: dict, key: str, high: int, low: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelFormatError(f"metanetwork config {key!r} must be an integer in "
                               f"[{low}, {high}], got {value!r}")
    return value


def validate_config(config) -> dict:
    """`MetaNetwork` keyword arguments from a config read from a file, every value checked."""
    expected = {"hidden", "num_layers", "aggregations", "residual_scale", "head_hidden"}
    # absent in checkpoints made before channel gates (no gate) and before the linear
    # message kind ("mlp")
    optional = {"gate_range", "message", "rank"}
    if not isinstance(config, dict) or not expected <= set(config) <= expected | optional:
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ModelFormatError(f"metanetwork config must have the keys {sorted(expected)} "
                               f"(and optionally {sorted(optional)}), got {keys}")
    gate_range = config.get("gate_range", 0.0)
    if isinstance(gate_range, bool) or not isinstance(gate_range, (int, float)) \
            or not math.isfinite(gate_range) or not 0 <= gate_range <= MAX_GATE_RANGE:
        raise ModelFormatError(f"metanetwork config 'gate_range' must be a number in "
                               f"[0, {MAX_GATE_RANGE}], got {gate_range!r}")
    message = config.get("message", "mlp")
    if message not in MESSAGE_KINDS:
        raise ModelFormatError(f"metanetwork config 'message' must be one of "
                               f"{list(MESSAGE_KINDS)}, got {message!r}")
    allowed = AGGREGATIONS if message == "mlp" else LINEAR_AGGREGATIONS
    aggregations = config["aggregations"]
    if (not isinstance(aggregations, list) or not aggregations
            or any(a not in allowed for a in aggregations)
            or len(set(aggregations)) != len(aggregations)):
        raise ModelFormatError(f"metanetwork config 'aggregations' must be a non-empty list of "
                               f"distinct names from {list(allowed)}, got {aggregations!r}")
    scale = config["residual_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or not 0 < scale <= 1:
        raise ModelFormatError(f"metanetwork config 'residual_scale' must be a number in "
                               f"(0, 1], got {scale!r}")
    return {
        "hidden": _positive_int(config, "hidden", MAX_WIDTH),
        "num_layers": _positive_int(config, "num_layers", MAX_LAYERS, low=0),
        "aggregations": list(aggregations),
        "residual_scale": float(scale),
        "head_hidden": _positive_int(config, "head_hidden", MAX_WIDTH),
        "gate_range": float(gate_range),
        "message": message,
        "rank": _positive_int({"rank": config.get("rank", 8)}, "rank", MAX_WIDTH),
    }


def _read_document(path: Path) -> dict:
    sibling = config_path(path)
    if not sibling.is_file():
        raise ModelFormatError(f"metanetwork checkpoint {str(path)!r} has no config "
                               f"{str(sibling)!r} beside it")
    if sibling.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"metanetwork config {str(sibling)!r} is larger than "
                               f"{MAX_CONFIG_BYTES} bytes")
    try:
        document = json.loads(sibling.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelFormatError(f"metanetwork config {str(sibling)!r} is not JSON: {error}") \
            from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelFormatError(f"{str(sibling)!r} is not a metanetwork config "
                               f"(expected \"format\": {FORMAT!r})")
    if document.get("version") != VERSION:
        raise ModelFormatError(f"metanetwork config version {document.get('version')!r} is not "
                               f"supported (this build reads version {VERSION})")
    if not isinstance(document.get("training", {}), dict):
        raise ModelFormatError("metanetwork config 'training' must be a JSON object")
    scope_of(document)  # a malformed scope fails here, not when a model is matched to it
    return document


def _read_weights(path: Path, metanet: MetaNetwork) -> dict[str, torch.Tensor]:
    if path.stat().st_size > MAX_CHECKPOINT_BYTES:
        raise ModelFormatError(f"metanetwork checkpoint {str(path)!r} is larger than "
                               f"{MAX_CHECKPOINT_BYTES} bytes")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFormatError(f"{str(path)!r} is not a readable safetensors file: {error}") \
            from error
    expected = metanet.state_dict()
    if GAIN not in state and set(state) == set(expected) - {GAIN}:
        # saved before the rewrite gain existed: it rewrote at full gain, and still does
        state[GAIN] = torch.ones_like(expected[GAIN])
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ModelFormatError(f"metanetwork checkpoint {str(path)!r} does not match its config "
                               f"(missing tensors {missing[:5]}, unexpected {extra[:5]})")
    for name, value in state.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise ModelFormatError(
                f"metanetwork tensor {name!r} is {value.dtype} {tuple(value.shape)}, expected "
                f"{expected[name].dtype} {tuple(expected[name].shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ModelFormatError(f"metanetwork tensor {name!r} holds NaN or infinite values")
    return state


def read_metanet(path: str | Path) -> tuple[MetaNetwork, dict]:
    """The `MetaNetwork` (eval mode) and its JSON document from a checkpoint.

    Raises:
        ModelFormatError: missing, unreadable or inconsistent files, or values out of bounds.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ModelFormatError(f"metanetwork checkpoint {str(path)!r} must be an existing "
                               ".safetensors file")
    document = _read_document(path)
    metanet = MetaNetwork(**validate_config(document.get("config")))
    metanet.load_state_dict(_read_weights(path, metanet))
    return metanet.eval(), document
