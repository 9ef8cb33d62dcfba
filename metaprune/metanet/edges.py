"""Edge features of any length: a set encoder in, a per-entry decoder out, per-layer scales.

An edge of a network graph carries the `k` weights linking one input channel to one output
channel (`k` = kernel size, 1 for a Linear, H*W for a flatten->Linear, 0 for an identity edge).
`k` differs between edge groups and is unknown in advance, so nothing here is a table of known
`k`: every weight entry is encoded by one shared MLP from its (normalised) value and its
relative position in the kernel, the entries of an edge are pooled (mean and max) into one
embedding, and the decoder emits one delta per entry from the edge embedding and that entry's
own features. Weights are divided by their layer's RMS first, so one network serves layers whose
weights differ by orders of magnitude; deltas are multiplied back by the same RMS.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.utils import scatter

from metaprune.graph import edge_groups
from metaprune.metanet.precision import amax

NUM_POSITION_FEATURES = 6  # see `entry_features`


def position_features(k: int, like: torch.Tensor) -> torch.Tensor:
    """[k, NUM_POSITION_FEATURES]: where each entry of a length-k kernel sits.

    Position t = (j + 0.5) / k of entry j, two Fourier pairs of t (so kernel centre and borders
    are told apart for any k) and log2(k) / 8 (which family of kernel the entry belongs to).
    """
    t = (torch.arange(k, dtype=like.dtype, device=like.device) + 0.5) / k
    angle = 2 * math.pi * t
    return torch.stack([
        t, torch.sin(angle), torch.cos(angle), torch.sin(2 * angle), torch.cos(2 * angle),
        torch.full_like(t, math.log2(k) / 8),
    ], dim=-1)


def entry_features(values: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] normalised weights -> [n, k, 1 + NUM_POSITION_FEATURES] per-entry features:
    the value, then `position_features`."""
    position = position_features(k, values)
    return torch.cat([values.unsqueeze(-1), position.expand(values.shape[0], k, -1)], dim=-1)


def entry_linear(linear: nn.Linear, values: torch.Tensor, k: int,
                 base: torch.Tensor | None = None) -> torch.Tensor:
    """``base + linear(entry_features(values, k))`` for [..., k] values (`base` broadcast to
    [..., k, out]), without building the features: the value column scales one weight column,
    the position part is one [k, out] table."""
    position = F.linear(position_features(k, values), linear.weight[:, 1:], linear.bias)
    start = position if base is None else base + position
    return torch.addcmul(start, values.unsqueeze(-1), linear.weight[:, 0])


def layer_weight_rms(data, edge_attr: torch.Tensor, num_layers: int) -> torch.Tensor:
    """RMS of every layer's edge weights, [num_layers] (0 for layers without weighted edges)."""
    sums = edge_attr.new_zeros(num_layers)
    counts = edge_attr.new_zeros(num_layers)
    edge_layer = data.edge_layer.long()
    for group in edge_groups(data, edge_attr):
        if group.k == 0:
            continue
        layers = edge_layer[group.edges]
        sums = sums + scatter(group.attr.square().sum(1), layers, 0, num_layers, "sum")
        counts = counts + scatter(torch.full_like(layers, group.k, dtype=edge_attr.dtype),
                                  layers, 0, num_layers, "sum")
    return (sums / counts.clamp_min(1)).sqrt()


def mlp(sizes: list[int], activation=nn.SiLU) -> nn.Sequential:
    """Linear layers of `sizes` with `activation` between them (none after the last)."""
    modules: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if index:
            modules.append(activation())
        modules.append(nn.Linear(a, b))
    return nn.Sequential(*modules)


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient is recorded (x is a fresh intermediate every caller)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def split_linear(linear: nn.Linear, parts: list[torch.Tensor]) -> torch.Tensor:
    """``linear(torch.cat(parts, -1))`` for parts that only broadcast to a common shape.

    Each part is multiplied by its own column block of the weight before broadcasting, so a
    node embedding gathered as ``[1, in, hidden]`` for a ``[out, in]`` grid of edges costs its
    own size, and no ``[out, in, 3 * hidden]`` concatenation is ever built.
    """
    out, start = None, 0
    for part in parts:
        width = part.shape[-1]
        term = F.linear(part, linear.weight[:, start:start + width])
        out = term if out is None else out + term
        start += width
    return out + linear.bias


class EdgeSetEncoder(nn.Module):
    """Encodes every edge's `k` normalised weights, for any `k`, into one `hidden` vector.

    Args:
        hidden: embedding width.

    Example::

        encoder = EdgeSetEncoder(32)
        e = encoder(data, edge_attr, edge_scale)   # [num_edges, 32], edges in data order
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.entry = mlp([1 + NUM_POSITION_FEATURES, hidden, hidden])  # shared by every entry
        self.pool = mlp([2 * hidden, hidden])  # mean and max of the entries -> edge embedding
        self.identity = nn.Parameter(torch.randn(hidden) * 0.1)  # k = 0: no weight to encode

    def forward(self, data, edge_attr: torch.Tensor, edge_scale: torch.Tensor) -> torch.Tensor:
        parts = []
        for group in edge_groups(data, edge_attr):
            if group.k == 0:
                parts.append(self.identity.expand(group.attr.shape[0], -1))
                continue
            values = group.attr / edge_scale[group.edges].unsqueeze(1)
            entries = self.entry(entry_features(values, group.k))  # [n, k, hidden]
            pooled = torch.cat([entries.mean(1), entries.amax(1)], dim=-1)
            parts.append(self.pool(pooled))
        return torch.cat(parts) if parts else edge_attr.new_zeros(0, self.identity.numel())

    def encode_grid(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """[rows, cols, k] normalised weights of a grid -> [rows, cols, hidden] embeddings."""
        rows, cols = values.shape[:2]
        if k == 0:
            identity = self.identity.expand(rows, cols, -1)
            # a copy without gradients: the edge updates then write over their input
            return identity if torch.is_grad_enabled() else identity.clone()
        first, _, second = self.entry
        hidden = _silu(entry_linear(first, values, k))  # [rows, cols, k, hidden]
        width = hidden.shape[-1]
        if k == 1:  # mean = max = the entry: pool and the entry's last layer fold into one
            both = self.pool[0].weight[:, :width] + self.pool[0].weight[:, width:]
            return F.linear(hidden.squeeze(2), both @ second.weight,
                            both @ second.bias + self.pool[0].bias)
        # the entries' last layer without its bias (mean and max commute with the shift):
        # the bias is added per edge, after pooling, not per entry
        entries = torch.matmul(hidden, second.weight.t())
        # sum / k rather than mean, and `amax`: both several times faster in bf16
        return split_linear(self.pool[0], [entries.sum(2) / k + second.bias,
                                           amax(entries, (2,)).squeeze(2) + second.bias])


class EdgeSetDecoder(nn.Module):
    """The inverse of `EdgeSetEncoder`: one (normalised) delta per weight entry of each edge.

    Each entry's delta is an MLP of the edge's final embedding plus the entry's own features
    (its input value and position), so `k` outputs come out of one embedding for any `k`.

    Args:
        hidden: embedding width.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.from_edge = nn.Linear(hidden, hidden)  # conditioning shared by the edge's entries
        self.from_entry = nn.Linear(1 + NUM_POSITION_FEATURES, hidden, bias=False)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, data, edge_attr: torch.Tensor, edge_scale: torch.Tensor,
                e: torch.Tensor) -> torch.Tensor:
        """Flat deltas laid out like `edge_attr`, in weight units (times the layer's RMS)."""
        parts = []
        for group in edge_groups(data, edge_attr):
            if group.k == 0:
                continue
            scale = edge_scale[group.edges].unsqueeze(1)
            hidden = self.from_edge(e[group.edges]).unsqueeze(1) \
                + self.from_entry(entry_features(group.attr / scale, group.k))
            parts.append((self.out(hidden).squeeze(-1) * scale).reshape(-1))
        return torch.cat(parts) if parts else edge_attr.new_zeros(0)

    def decode_grid(self, e: torch.Tensor, values: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
        """Deltas [rows, cols, k] in weight units from a grid's final edge embeddings
        [rows, cols, hidden] and its normalised weights [rows, cols, k] (`scale`: the RMS)."""
        k = values.shape[-1]
        hidden = entry_linear(self.from_entry, values, k, base=self.from_edge(e).unsqueeze(2))
        return self.out[1](_silu(hidden)).squeeze(-1) * scale
