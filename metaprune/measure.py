"""Model size and cost: parameters, MACs, CPU latency.

MACs follow the convention in DESIGN.md §5: `torch.utils.flop_counter.FlopCounterMode` flops
divided by two, at batch 1, which counts attention matmuls too.
"""

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """Number of parameter entries (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def _at_batch(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple:
    """Example inputs resized along dim 0 to `batch` rows (repeating or slicing row 0..)."""
    resized = []
    for tensor in example_inputs:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            resized.append(tensor)
            continue
        first = tensor[:1]
        resized.append(first.expand(batch, *first.shape[1:]).contiguous())
    return tuple(resized)


@torch.no_grad()
def count_macs(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass at batch 1."""
    was_training = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            module(*_at_batch(example_inputs, 1))
        return int(counter.get_total_flops() // 2)
    finally:
        module.train(was_training)


@torch.no_grad()
def measure_latency_ms(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    batch: int = 64,
    repeats: int = 10,
    warmup: int = 3,
) -> float:
    """Median wall time in milliseconds of one forward pass at `batch` on the CPU."""
    was_training = module.training
    module.eval()
    inputs = _at_batch(example_inputs, batch)
    try:
        for _ in range(warmup):
            module(*inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(*inputs)
            times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)
    finally:
        module.train(was_training)
