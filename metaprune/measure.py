"""Model size and cost: parameters, MACs, CPU latency.

MACs follow the convention in DESIGN.md §5: `torch.utils.flop_counter.FlopCounterMode` flops
divided by two, at batch 1, which counts attention matmuls too.
"""

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


def measure_latency_ms(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    batch: int = 64,
    repeats: int = 10,
) -> float:
    """Median time in milliseconds of one forward pass at `batch` on the CPU, `repeats` rounds.

    A one-model `metaprune.latency.compare_latency` (warm-up, one thread, the machine-wide
    measurement lock); compare models with that instead, interleaved.
    """
    from metaprune.latency import compare_latency  # it imports this module

    return compare_latency([module], example_inputs, batch=batch, min_rounds=repeats,
                           max_rounds=repeats).median_ms[0]
