"""Per-layer latency tables: each prunable layer timed on this CPU at a few kept widths.

MACs say a layer at half width costs a quarter; the CPU often disagrees (vector-width steps,
memory-bound small layers, fixed call overhead). So every convolution, Linear, norm and
attention layer a pruning could shrink is rebuilt alone at a grid of kept fractions of its input
and output channels and timed on its real input shape; the engine interpolates between grid
points. Layers with the same configuration are timed once, and tables are cached per machine
(CPU model, threads, torch version) under ``$METAPRUNE_CACHE/latency/``, so a second prune of
the same architecture measures nothing.
"""

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from metaprune.data.cache import cache_dir
from metaprune.latency.allocator import allocator_note, steady_allocator
from metaprune.latency.lock import measurement_lock
from metaprune.latency.machine import DEFAULT_THREADS, cpu_model, fixed_threads
from metaprune.latency.timing import _time_once, clock_for
from metaprune.measure import _at_batch

FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
_SAMPLES = 5
_MIN_SAMPLE_MS = 0.5
_TIED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.MultiheadAttention)


@dataclass
class LayerTimes:
    """One layer's time (ms, all its calls in a forward pass) over kept fractions.

    Attributes:
        tied: True when input and output widths move together (depthwise convolution, norms,
            attention): `times_ms` then has a single row indexed by the kept fraction.
        times_ms: ``times_ms[i][j]`` at input fraction ``in_fractions[i]`` and output fraction
            ``out_fractions[j]``.
    """

    tied: bool
    times_ms: list[list[float]]
    activations: int = 0  # output elements of all its calls, the reach of the ops that follow it
    in_fractions: tuple[float, ...] = FRACTIONS  # the grid of `times_ms`'s rows
    out_fractions: tuple[float, ...] = FRACTIONS  # and of its columns

    def at(self, keep_in: float, keep_out: float) -> float:
        """Interpolated time at the given kept fractions (linear, towards 0 below the grid)."""
        if self.tied:
            return _interpolate(self.out_fractions, self.times_ms[0], keep_out)
        column = [_interpolate(self.out_fractions, row, keep_out) for row in self.times_ms]
        return _interpolate(self.in_fractions, column, keep_in)


def _interpolate(fractions: Sequence[float], values: Sequence[float], fraction: float) -> float:
    fraction = min(max(fraction, 0.0), 1.0)
    if fraction <= fractions[0]:
        return values[0] * fraction / fractions[0]
    for (f0, v0), (f1, v1) in zip(zip(fractions, values), zip(fractions[1:], values[1:])):
        if fraction <= f1 + 1e-12:
            return v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)
    return values[-1]


def grid(total: int, multiple: int | None) -> tuple[float, ...]:
    """Kept fractions a table is measured at: every allowed width when `multiple` leaves at
    most 8 of them (so the table sees the steps rounding lands on), else `FRACTIONS`."""
    if multiple and multiple > 1 and total % multiple == 0 and total // multiple <= 8:
        return tuple(k * multiple / total for k in range(1, total // multiple + 1))
    return FRACTIONS


def _width(total: int, fraction: float, multiple: int = 1) -> int:
    return max(multiple, round(total * fraction / multiple) * multiple)


def _resized(module: nn.Module, kept_in: int, kept_out: int) -> nn.Module | None:
    """A fresh layer like `module` with other channel counts (None: not a kind we time)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            return None
        if depthwise:
            kept_in = kept_out
        options = dict(kernel_size=module.kernel_size, stride=module.stride,
                       padding=module.padding, dilation=module.dilation,
                       groups=kept_out if depthwise else 1, bias=module.bias is not None,
                       padding_mode=module.padding_mode)
        if module.transposed:
            options["output_padding"] = module.output_padding
        return type(module)(kept_in, kept_out, **options)
    if isinstance(module, nn.Linear):
        return nn.Linear(kept_in, kept_out, bias=module.bias is not None)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return type(module)(kept_out)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return nn.LayerNorm(kept_out, elementwise_affine=module.elementwise_affine)
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return nn.MultiheadAttention(kept_out, module.num_heads, bias=module.in_proj_bias is not None,
                                     batch_first=module.batch_first)
    return None


def _can_time(module: nn.Module) -> bool:
    """Whether `_resized` can rebuild this layer at other widths."""
    heads = module.num_heads if isinstance(module, nn.MultiheadAttention) else 1
    counts = _channel_counts(module) if isinstance(module, _TIED + (nn.Linear,
                                                                  nn.modules.conv._ConvNd)) \
        else None
    return counts is not None and _resized(module, heads, heads) is not None


def _is_tied(module: nn.Module) -> bool:
    if isinstance(module, _TIED):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.modules.conv._ConvNd, nn.BatchNorm1d, nn.BatchNorm2d,
                                    nn.BatchNorm3d)) else -1


def _channel_counts(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0], module.normalized_shape[0]
    return module.num_features, module.num_features


def _record_inputs(model: nn.Module, example_inputs, names: set[str], batch: int) -> dict:
    """{name: (input shape, calls, output elements)} of the named modules at `batch`."""
    seen: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(_module, args, output, name=name):
                first = output[0] if isinstance(output, tuple) else output
                elements = first.numel() if isinstance(first, torch.Tensor) else 0
                if name in seen:
                    seen[name][1] += 1
                    seen[name][2] += elements
                elif args and isinstance(args[0], torch.Tensor):
                    seen[name] = [tuple(args[0].shape), 1, elements]
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*_at_batch(example_inputs, batch))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: tuple(record) for name, record in seen.items()}


def _signature(module: nn.Module, shape: tuple, threads: int, multiple: int | None) -> str:
    """Everything a layer's table depends on, as a cache key."""
    grids = [grid(total, multiple) for total in _channel_counts(module)]
    described = {"kind": type(module).__name__, "shape": list(shape), "grids": grids,
                 "clock": clock_for(threads)[0],
                 "channels": list(_channel_counts(module)), "threads": threads,
                 "cpu": cpu_model(), "torch": torch.__version__,
                 # the tables are timed under steady_allocator; a different allocator setting
                 # (another libc, MALLOC_* in the environment) times differently
                 "allocator": allocator_note()}
    for attribute in ("kernel_size", "stride", "padding", "dilation", "groups", "num_heads",
                      "batch_first", "transposed"):
        if hasattr(module, attribute):
            value = getattr(module, attribute)
            described[attribute] = list(value) if isinstance(value, tuple) else value
    described["bias"] = getattr(module, "bias", None) is not None
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _time_layer(module: nn.Module, shape: tuple, fraction_in: float, fraction_out: float,
                clock) -> float:
    kept_in_total, kept_out_total = _channel_counts(module)
    multiple = module.num_heads if isinstance(module, nn.MultiheadAttention) else 1
    kept_out = _width(kept_out_total, fraction_out, multiple)
    kept_in = kept_out if _is_tied(module) else _width(kept_in_total, fraction_in)
    layer = _resized(module, kept_in, kept_out).eval()
    dim = _channel_dim(module)
    resized_shape = list(shape)
    resized_shape[dim] = kept_in
    x = torch.randn(resized_shape)
    inputs = (x, x, x) if isinstance(module, nn.MultiheadAttention) else (x,)
    layer(*inputs)
    first = max(_time_once(layer, inputs, 1), 1e-3)
    inner = max(1, int(_MIN_SAMPLE_MS / first) + 1)
    return min(_time_once(layer, inputs, inner, clock) for _ in range(_SAMPLES))


def _cache_file() -> "os.PathLike":
    machine = hashlib.sha256(f"{cpu_model()}|{torch.__version__}".encode()).hexdigest()[:16]
    return cache_dir() / "latency" / f"layers-{machine}.json"


def _read_cache(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _write_cache(path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".layers-", suffix=".json")
    with os.fdopen(handle, "w") as stream:
        json.dump(table, stream)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


@torch.no_grad()
def measure_layer_times(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    unit_names: Sequence[str],
    *,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    multiple: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LayerTimes]:
    """Latency tables of the named layers of `model` (those of a kind we can rebuild).

    Args:
        model: the dense model.
        example_inputs: one forward pass's inputs (row 0 is repeated to `batch` rows).
        unit_names: module names to time (others, and parameters, are ignored).
        batch: the batch the tables are for.
        threads: torch threads while timing.
        multiple: the `round_to` kept widths will be multiples of (see `grid`), or None.
        progress: told how far the timing has got, about once a second.

    Example::

        tables = measure_layer_times(model, (torch.randn(1, 3, 32, 32),), ["conv1", "fc"])
        tables["conv1"].at(0.5, 0.5)    # ms at half its input and output channels
    """
    _clock_name, read_clock = clock_for(threads)
    modules = dict(model.named_modules())
    wanted = {n for n in unit_names if n in modules and _can_time(modules[n])}
    recorded = _record_inputs(model, example_inputs, wanted, batch)
    signatures = {name: _signature(modules[name], record[0], threads, multiple)
                  for name, record in recorded.items()}
    path = _cache_file()
    cached = _read_cache(path)
    missing = {}
    for name, signature in signatures.items():
        if signature not in cached:
            missing.setdefault(signature, name)
    if missing:
        # tables timed as the whole model is (see `compare_latency`)
        with measurement_lock(progress), fixed_threads(threads), steady_allocator():
            cached = _read_cache(path)  # another process may have timed them meanwhile
            todo = [(s, n) for s, n in missing.items() if s not in cached]
            told = time.perf_counter()
            for done, (signature, name) in enumerate(todo):
                module, shape = modules[name], recorded[name][0]
                total_in, total_out = _channel_counts(module)
                in_grid = (1.0,) if _is_tied(module) else grid(total_in, multiple)
                out_grid = grid(total_out, multiple)
                cached[signature] = {
                    "tied": _is_tied(module), "in_fractions": in_grid, "out_fractions": out_grid,
                    "times_ms": [[_time_layer(module, shape, f_in, f_out, read_clock)
                                  for f_out in out_grid] for f_in in in_grid],
                }
                if progress is not None and time.perf_counter() - told > 1.0:
                    progress(f"latency model: layer {done + 1}/{len(todo)} timed")
                    told = time.perf_counter()
            _write_cache(path, cached)
    tables = {}
    for name, signature in signatures.items():
        entry, (_shape, calls, elements) = cached[signature], recorded[name]
        tables[name] = LayerTimes(entry["tied"], [[t * calls for t in row]
                                                  for row in entry["times_ms"]], elements,
                                  tuple(entry["in_fractions"]), tuple(entry["out_fractions"]))
    return tables


def table_total(tables: dict[str, LayerTimes]) -> float:
    """Dense time of all tabled layers (ms)."""
    return statistics.fsum(t.at(1.0, 1.0) for t in tables.values())
