"""The precision of the metanetwork's per-edge work: fp32, bf16, or bf16 for large graphs.

Almost all of a large model's message passing is per edge: small matmuls (``[edges, 32] @
[32, 64]``) and activations over every weight of the model. On a CPU with native bf16
matmuls (AMX, AVX512-BF16) those matmuls run 2-3x faster in bf16, but PyTorch's elementwise
kernels (SiLU, addcmul, broadcast adds) run slower in bf16 than in fp32, so the whole pass
gains only 10-15 % on large models (see `AUTO_MIN_EDGES`). `precision` picks
the dtype of that per-edge work only; what needs the range or the digits stays in the
network's dtype (fp32): the weights read from the model and their per-layer RMS, node
embeddings and every per-node term, the aggregation of messages across chunks (each chunk's
reduction accumulates in fp32 inside the kernel and is rounded once), the LayerNorm
statistics of the edge update (the node parts in fp32; each edge's own sum and norm
accumulate in fp32 and are rounded once, as casting every edge state up first cost more than
bf16 saved), and the rewritten weights (``old + delta``, the delta cast up before it is
added). The edge states themselves (the residual stream of every edge) are bf16, so the
cache holds twice as many of them.

- ``"fp32"`` (the default): the network's own dtype everywhere; equal to the edge-list
  reference within float rounding.
- ``"bf16"``: per-edge work in bfloat16, for inference only (`edge_dtype` refuses it when
  gradients are recorded: they would not reach the network's fp32 parameters).
- ``"auto"``: bf16 when no gradient is recorded, the graph has at least `AUTO_MIN_EDGES`
  edges and the CPU computes bf16 natively; fp32 otherwise.

Example::

    metanet = load_metanet("default")
    metanet.precision = "bf16"                  # or MetaNetwork.precision
    rewritten = metanet.transform(model, (x,))  # the rewrite within ~0.7 % of fp32's
"""

import copy

import torch

PRECISIONS = ("fp32", "bf16", "auto")
# "auto" switches to bf16 from this many edges. Measured (benchmarks/metanet-scale.md, full
# transform, 1 thread, AMX): bf16 0.77-0.87x fp32's speed on ResNet-56 (0.1 M edges),
# 1.05-1.09x on a ResNet-50 (15 M), 1.15x on a ViT-B/16 (86 M); the crossover lies between,
# not located more finely. "fp32" stays the default: bf16 saves 5-15 % on large models, moves
# the rewrite by 0.5-0.7 % of itself and keep ratios by up to 1.9e-2 with the damage-trained
# head (1.5e-3 with the one before), and small graphs run slower in it.
AUTO_MIN_EDGES = 1 << 22


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16)."""
    cpu = torch.backends.cpu
    probes = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return cpu.get_cpu_capability() != "DEFAULT" and any(probe() for probe in probes if probe)


def edge_dtype(precision: str, num_edges: int, dtype: torch.dtype,
               training: bool) -> torch.dtype:
    """The dtype of the per-edge work for a `precision` setting.

    Args:
        precision: one of `PRECISIONS`.
        num_edges: edges of the graph (``"auto"`` compares it with `AUTO_MIN_EDGES`).
        dtype: the network's own dtype (what ``"fp32"`` means: a float64 network stays so).
        training: whether gradients reach the network's parameters.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32" or dtype != torch.float32:
        return dtype
    if training:
        if precision == "bf16":
            raise ValueError("precision='bf16' is for inference: run under torch.no_grad(), or "
                             "use 'fp32' (or 'auto', which is fp32 when training)")
        return dtype
    if precision == "auto" and (num_edges < AUTO_MIN_EDGES or not native_bf16()):
        return dtype
    return torch.bfloat16


def lowered(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` itself when already in `dtype`, else a copy in `dtype` (a metanetwork is a
    few hundred kB: the copy costs microseconds against a large graph's seconds)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)


def amax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x.amax(dims, keepdim=True)``, fast in bf16 too.

    PyTorch's CPU amax over a middle dimension of a bf16 tensor takes a scalar path (~15x
    its fp32 time on ``[rows, cols, 32]``); a halving tree of elementwise `torch.maximum`
    is vectorised and exact (a max has no rounding).
    """
    if x.dtype != torch.bfloat16:
        return x.amax(dims, keepdim=True)
    for dim in dims:
        size = x.shape[dim]
        if size == 1:
            continue
        half = size // 2
        head = torch.maximum(x.narrow(dim, 0, half), x.narrow(dim, half, half))
        if size % 2:  # the odd one out joins the first
            first = head.narrow(dim, 0, 1)
            torch.maximum(first, x.narrow(dim, size - 1, 1), out=first)
        while head.shape[dim] > 1:  # in place on the fresh buffer
            size, half = head.shape[dim], head.shape[dim] // 2
            low = head.narrow(dim, 0, half)
            torch.maximum(low, head.narrow(dim, half, half), out=low)
            if size % 2:
                first = head.narrow(dim, 0, 1)
                torch.maximum(first, head.narrow(dim, size - 1, 1), out=first)
            head = low
        x = head
    return x
