"""Hardware-friendly widths: every pruned group keeps a multiple of N channels.

CPU kernels work on vectors of 8 (AVX2) or 16 (AVX-512) floats and oneDNN lays channels out in
blocks of that size, so a layer with 33 channels costs about what one with 40 costs. With
`round_to=N` a group keeps a multiple of N channels (or all of them, when it is narrower or
not a multiple itself); with `"auto"` N is read off this CPU: the most expensive prunable
layer is timed at every width of its top two vector blocks and N is the block size whose
steps the timings follow, falling back to the CPU's vector width in floats.
"""

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from metaprune.latency.lock import measurement_lock
from metaprune.latency.machine import DEFAULT_THREADS, fixed_threads
from metaprune.latency.timing import _time_once, clock_for
from metaprune.pruning.groups import ChannelGroup

_CANDIDATES = (32, 16, 8, 4)
# a block size is "seen" when one channel past a multiple costs this many times the average
# channel of the block (1 = time linear in width)
_STEP_STRENGTH = 2.0


def apply_round_to(groups: Sequence[ChannelGroup], round_to: int) -> None:
    """Makes every prunable group keep a multiple of `round_to` channels (heads still equal)."""
    for group in groups:
        if group.blocked is None and round_to > 1:
            group.step = math.lcm(group.step, int(round_to))


def vector_width() -> int:
    """Floats per SIMD register on this CPU (16 with AVX-512, 8 with AVX2, else 4)."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((line for line in cpuinfo.read_text(errors="replace").splitlines()
                      if line.startswith("flags")), "")
    if " avx512f" in flags:
        return 16
    if " avx2" in flags:
        return 8
    return 4


def _heaviest_layer(model: nn.Module, units: Sequence[str], macs_of: Callable[[str], float]):
    modules = dict(model.named_modules())
    layers = [n for n in units if isinstance(modules.get(n), (nn.Conv1d, nn.Conv2d, nn.Linear))
              and getattr(modules[n], "groups", 1) == 1]
    return max(layers, key=macs_of, default=None)


@torch.no_grad()
def auto_round_to(model: nn.Module, example_inputs, units: Sequence[str],
                  macs_of: Callable[[str], float], *, batch: int = 1,
                  threads: int = DEFAULT_THREADS,
                  progress: Callable[[str], None] | None = None) -> int:
    """The channel multiple this CPU rewards, measured on the model's heaviest layer.

    Times the layer at every output width w in the top 2·32 widths below its own (the minimum
    of three sweeps), and picks the largest block size N for which one channel past a multiple
    of N costs at least `_STEP_STRENGTH` times the block's average channel — the time moves in
    steps of N. Falls back to `vector_width()` when no step shows above the noise.
    """
    name = _heaviest_layer(model, units, macs_of)
    fallback = vector_width()
    if name is None:
        return fallback
    layer = dict(model.named_modules())[name]
    captured = {}
    handle = layer.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        model.eval()(*[t[:1].expand(batch, *t.shape[1:]) for t in example_inputs])
    finally:
        handle.remove()
    x = captured["x"]
    is_conv = isinstance(layer, nn.modules.conv._ConvNd)
    total = layer.out_channels if is_conv else layer.out_features
    widths = list(range(max(1, total - 2 * max(_CANDIDATES) + 1), total + 1))
    if len(widths) < 2 * max(_CANDIDATES):
        return fallback
    times = {w: float("inf") for w in widths}
    read_clock = clock_for(threads)[1]
    with measurement_lock(progress), fixed_threads(threads):
        if progress is not None:
            progress(f"round_to auto: timing {name} at {len(widths)} widths")
        for _sweep in range(3):  # minimum over sweeps: load only ever adds time
            for width in widths:
                weight = layer.weight[:width]
                bias = None if layer.bias is None else layer.bias[:width]
                if is_conv:
                    def run(inputs, weight=weight, bias=bias):
                        return layer._conv_forward(inputs, weight, bias)
                else:
                    def run(inputs, weight=weight, bias=bias):
                        return nn.functional.linear(inputs, weight, bias)
                run(x)
                times[width] = min(times[width], _time_once(run, (x,), 3, read_clock))
    for block in _CANDIDATES:
        shares = []
        for start in range(widths[0] + (-widths[0]) % block, total - block + 1, block):
            low, high = times.get(start), times.get(start + block)
            if low is None or high is None or high <= low:
                continue
            shares.append((times[start + 1] - low) / (high - low))
        # a linear cost gives share 1/block, a pure step at multiples of `block` gives 1
        if len(shares) >= 2 and statistics.median(shares) * block >= _STEP_STRENGTH:
            return block
    return fallback
