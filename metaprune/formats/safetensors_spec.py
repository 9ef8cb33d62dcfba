"""``.safetensors`` weights + a sibling JSON spec naming a zoo family and its config.

The spec ``NAME.json`` next to ``NAME.safetensors`` is
``{"format": 1, "family": ID, "config": {...}, "input_shape": [C, ...]}``; ``input_shape`` is
one sample's channel-first shape (the batch dim excluded). The config lists per-layer widths,
so a pruned zoo model round-trips: saving reads them with ``metaprune.zoo.config_of``.

Example::

    model = zoo.build("cnn1d", zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10))
    save_safetensors(model, (torch.randn(2, 1, 40),), "m.safetensors")   # family read by zoo.family_of
    again, example_inputs = load_safetensors("m.safetensors")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from metaprune.errors import ModelFormatError
from metaprune.formats.pt2 import check_finite

SPEC_FORMAT = 1
MAX_SPEC_BYTES = 4 * 2**20
MAX_FILE_BYTES = 512 * 2**20
MAX_INPUT_ELEMENTS = 1 << 24
_ALLOWED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


def spec_path(path: str | os.PathLike) -> Path:
    """The spec file beside a weights file: ``NAME.safetensors`` -> ``NAME.json``."""
    return Path(path).with_suffix(".json")


def _read_spec(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise ModelFormatError(f"spec {path.name} is larger than {MAX_SPEC_BYTES} bytes")
        spec = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise ModelFormatError(f"a .safetensors model needs its spec file {path.name} beside it") from err
    except OSError as err:
        raise ModelFormatError(f"cannot read spec {path.name}: {err.strerror}") from err
    except (ValueError, RecursionError) as err:
        raise ModelFormatError(f"spec {path.name} is not valid JSON: {err}") from err
    if not isinstance(spec, dict):
        raise ModelFormatError(f"spec {path.name} must be a JSON object")
    if spec.get("format") != SPEC_FORMAT:
        raise ModelFormatError(f"spec {path.name}: 'format' must be {SPEC_FORMAT}, got {spec.get('format')!r:.40}")
    unknown = set(spec) - {"format", "family", "config", "input_shape"}
    if unknown:
        raise ModelFormatError(f"spec {path.name}: unknown keys {sorted(unknown)}")
    if not isinstance(spec.get("family"), str):
        raise ModelFormatError(f"spec {path.name}: 'family' must be a zoo family id")
    if not isinstance(spec.get("config"), dict):
        raise ModelFormatError(f"spec {path.name}: 'config' must be an object")
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4
            and all(type(s) is int and s >= 1 for s in shape) and math.prod(shape) <= MAX_INPUT_ELEMENTS):
        raise ModelFormatError(f"spec {path.name}: 'input_shape' must list 1 to 4 positive sizes "
                               f"(one sample, channels first), got {shape!r:.80}")
    return spec


def load_safetensors(path: str | os.PathLike):
    """Build the spec's zoo model and load the weights strictly; ``(module, example_inputs)``."""
    from metaprune import zoo

    path = Path(path)
    spec = _read_spec(spec_path(path))
    config = dict(spec["config"])
    config.setdefault("input_shape", spec["input_shape"])
    if list(config["input_shape"]) != spec["input_shape"]:
        raise ModelFormatError(f"spec {spec_path(path).name}: input_shape {spec['input_shape']} differs "
                               f"from the config's {config['input_shape']}")
    module = zoo.build(spec["family"], config)  # raises ModelFormatError on a bad family/config
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ModelFormatError(f"{path.name} is larger than {MAX_FILE_BYTES} bytes")
        state = safetensors.torch.load_file(str(path), device="cpu")
    except FileNotFoundError as err:
        raise ModelFormatError(f"model file {path.name} does not exist") from err
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ModelFormatError(f"{path.name} is not a valid safetensors file: {err}") from err
    bad = [k for k, t in state.items() if t.dtype not in _ALLOWED_DTYPES]
    if bad:
        raise ModelFormatError(f"{path.name}: tensor {bad[0]!r} has unsupported dtype {state[bad[0]].dtype}")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{mismatched[0]!r} is {list(state[mismatched[0]].shape)}, the config gives "
                       f"{list(expected[mismatched[0]].shape)}")
        raise ModelFormatError(f"{path.name} does not match the {spec['family']!r} config in its spec: {detail}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    check_finite(module)
    module.eval()
    return module, (torch.randn(2, *spec["input_shape"], generator=torch.Generator().manual_seed(0)),)


def save_safetensors(module: nn.Module, example_inputs: tuple, path: str | os.PathLike,
                     family: str | None = None) -> None:
    """Write ``NAME.safetensors`` and its spec ``NAME.json`` for a zoo model (pruned or not).

    Args:
        module: a module built by ``metaprune.zoo.build`` (possibly structurally pruned).
        example_inputs: a tuple whose first tensor has the batch dim first; its other dims are
            the spec's ``input_shape``.
        path: the ``.safetensors`` path.
        family: the zoo family id; by default ``metaprune.zoo.family_of(module)``.
    """
    from metaprune import zoo

    family = family or zoo.family_of(module)
    if family is None:
        raise ModelFormatError(f"a {type(module).__name__} is not a zoo model; .safetensors + spec "
                               "holds zoo families only, save it as .pt2")
    try:
        config = zoo.config_of(family, module)
    except ModelFormatError as err:
        # a width its family's config cannot state (a plain chain's layer pruned to 0
        # channels): the exported graph of a .pt2 holds any width
        raise ModelFormatError(f"{err}; save this model as .pt2 instead") from err
    first = example_inputs[0] if example_inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() < 2:
        raise ModelFormatError("example_inputs must start with a batched tensor")
    spec = {"format": SPEC_FORMAT, "family": family, "config": config,
            "input_shape": list(first.shape[1:])}
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    spec_path(path).write_text(json.dumps(spec, indent=1))
