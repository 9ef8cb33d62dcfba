"""`MetaNetwork`: a GNN that rewrites a network's weights and proposes per-layer keep ratios."""

from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.utils import scatter

from metaprune.graph import NUM_NODE_FEATURES, PARAM_SLOTS
from metaprune.graph.features import KIND_OFFSET, NODE_KINDS, SCALAR, SLOT
from metaprune.metanet.edges import EdgeSetDecoder, EdgeSetEncoder, mlp
from metaprune.metanet.grids import (
    CHUNK_ENTRIES,
    EdgeStates,
    GraphView,
    aggregate_round,
    cache_budget,
    chunks_of,
    decode_edges,
)
from metaprune.metanet.grids import layer_weight_rms as grid_weight_rms
from metaprune.metanet.layers import BidirectionalBlock
from metaprune.metanet.linear_messages import (
    DEFAULT_LINEAR_AGGREGATIONS,
    LINEAR_CHUNK_ENTRIES,
    LinearMessageBlock,
    LowRankEdgeDecoder,
    linear_decode_edges,
    linear_rounds,
)
from metaprune.metanet.precision import edge_dtype

NUM_SLOTS = len(PARAM_SLOTS)
NUM_STRUCTURAL = NUM_NODE_FEATURES - NUM_SLOTS
# Running variances must stay positive: they are updated multiplicatively, the rest additively.
POSITIVE_SLOT = SLOT["norm_running_var"]
DEFAULT_SPEEDUP = 2.0  # what the sparsity head is conditioned on when no target is given
MIN_PRIOR_KEEP, MAX_PRIOR_KEEP = 0.05, 0.99
# Channels a gate may scale: outputs of layers whose weights feed them directly.
GATED_KINDS = tuple(KIND_OFFSET + NODE_KINDS.index(kind)
                    for kind in ("conv", "conv_transpose", "linear"))
MAX_GATE_GROWTH = 0.5  # a gate shrinks a channel by up to exp(-gate_range), grows it by e^0.5
# how messages are computed: "mlp" (`layers.BidirectionalBlock`: an MLP on every edge, edge
# states updated every round) or "linear" (`linear_messages`: messages linear in the weights,
# a matmul per weight block, no per-edge state; ~100x cheaper on large models)
MESSAGE_KINDS = ("mlp", "linear")


def sparsity_head_mlp(inputs: int, width: int) -> nn.Sequential:
    """The per-layer sparsity head, ``inputs -> width -> 1`` logit added to the uniform prior's.

    Its last layer starts small and unbiased, so an untrained head answers the prior.
    """
    head = mlp([inputs, width, 1])
    with torch.no_grad():
        head[-1].weight.mul_(0.01)
        head[-1].bias.zero_()
    return head


def prior_keep_ratio(speedup: torch.Tensor) -> torch.Tensor:
    """Uniform keep ratio for a MACs speed-up: MACs scale with kept in x kept out channels."""
    return speedup.rsqrt().clamp(MIN_PRIOR_KEEP, MAX_PRIOR_KEEP)


class MetaNetwork(nn.Module):
    """A metanetwork over `metaprune.graph` graphs: residual weight rewrite + sparsity head.

    Nodes (channels) are embedded from their structural features and their per-layer
    normalised parameter slots; edges (weights) by `EdgeSetEncoder`, for any kernel length.
    `num_layers` `BidirectionalBlock` rounds pass messages along and against the edges. The
    outputs are residual: ``new = old + residual_scale * delta * rms`` on parameter-carrying
    entries only, ``rms`` being the RMS of the layer's weights (edges) or of the layer's values
    of that slot (nodes), so layers of any magnitude are served alike; running variances become
    ``old * exp(residual_scale * delta)``, so they stay positive. Every delta is also
    multiplied by ``rewrite_gain``, one learned scalar that starts at 0 (as in ReZero): an
    untrained metanetwork is exactly the identity (``old + 0``, gates ``exp(0)``), yet its
    first training step moves the gain, and with it every decoder. Checkpoints saved before the
    gain existed load with a gain of 1, so they compute what they always did. Structural
    columns never change.
    A channel gate scales whole output channels of conv and linear layers (not the model's
    outputs) by ``g = exp(log_gate)``: the weights into the channel, its bias and norm affine
    by g, its norm's running mean by g and running variance by g^2, so the channel's output is
    g times what it was. ``log_gate`` lies in ``(-gate_range, 0.5)`` and starts at 0, so a
    trained gate can fade the channels pruning will remove, which the additive rewrite could
    only do weight by weight.
    The sparsity head pools node embeddings per layer and, given the speed-up target, predicts
    each layer's keep ratio around the uniform prior ``speedup ** -0.5``.

    Args:
        hidden: width of node, edge and per-weight-entry embeddings.
        num_layers: message-passing rounds (each one forward + reverse + edge update).
        aggregations: PyG aggregations combined at every node (fan-in varies from 1 to 1000s).
        residual_scale: multiplies every delta; small, so a trained rewrite starts gently.
        head_hidden: width of the per-layer sparsity head's MLP.
        gate_range: the most a channel gate shrinks a channel, in log units (0: no gate).
        message: one of `MESSAGE_KINDS`. "linear" passes messages linear in the edge weights
            (`metaprune.metanet.linear_messages`), aggregated with `aggregations` from
            ``("mean", "norm_sum")`` (None: both), and rewrites weights with a low-rank
            `LowRankEdgeDecoder` of rank `rank`; "mlp" (the default, every checkpoint made
            before the linear kind) runs an MLP on every edge.
        rank: rank of the linear kind's weight rewrite (unused by "mlp").

    Example::

        from metaprune.graph import to_graph
        metanet = MetaNetwork(hidden=32, num_layers=3)
        graph = to_graph(model, example_inputs)
        new_x, new_edge_attr, keep = metanet(graph, speedup=2.0)
        rewritten = graph.write_back(new_x.detach(), new_edge_attr.detach())
        keep.shape                                   # [len(graph.layers)]
        fast = MetaNetwork(hidden=32, num_layers=3, message="linear")  # for large models
    """

    def __init__(
        self,
        hidden: int = 32,
        num_layers: int = 3,
        aggregations: Sequence[str] | None = None,
        residual_scale: float = 1e-3,
        head_hidden: int = 32,
        gate_range: float = 0.0,
        message: str = "mlp",
        rank: int = 8,
    ):
        super().__init__()
        if message not in MESSAGE_KINDS:
            raise ValueError(f"message must be one of {MESSAGE_KINDS}, got {message!r}")
        if aggregations is None:
            aggregations = ("sum", "mean", "max") if message == "mlp" \
                else DEFAULT_LINEAR_AGGREGATIONS
        self.config = {
            "hidden": int(hidden), "num_layers": int(num_layers),
            "aggregations": list(aggregations), "residual_scale": float(residual_scale),
            "head_hidden": int(head_hidden), "gate_range": float(gate_range),
        }
        if message != "mlp":  # an "mlp" config stays as every checkpoint before wrote it
            self.config.update(message=message, rank=int(rank))
        self.message = message
        self.residual_scale = float(residual_scale)
        # ReZero-style: 0 makes the untrained rewrite exactly the identity (see the docstring)
        self.rewrite_gain = nn.Parameter(torch.zeros(()))
        self.gate_range = float(gate_range)
        # how the forward pass walks the edges (no effect on its result): weights per chunk,
        # and the bytes of edge embeddings kept between rounds instead of recomputed
        self.chunk_entries = CHUNK_ENTRIES if message == "mlp" else LINEAR_CHUNK_ENTRIES
        self.cache_bytes = None  # None: `grids.cache_budget` of the graph
        # the dtype of the per-edge work: "fp32", "bf16" (inference) or "auto" (bf16 for large
        # graphs on a CPU with native bf16); node terms, statistics and results stay fp32
        # (see `metaprune.metanet.precision`; the linear kind always runs in its own dtype)
        self.precision = "fp32"
        # structural columns, normalised slots, slot mask, log RMS of the layer's weights
        self.node_encoder = mlp([NUM_STRUCTURAL + 2 * NUM_SLOTS + 1, hidden, hidden])
        # (modules made in the order of before: a seeded "mlp" network draws the same weights)
        if message == "mlp":
            self.edge_encoder = EdgeSetEncoder(hidden)
            self.blocks = nn.ModuleList(
                BidirectionalBlock(hidden, aggregations) for _ in range(num_layers))
        else:  # edges carry fixed features of their weights, no learned embedding
            self.blocks = nn.ModuleList(
                LinearMessageBlock(hidden, aggregations) for _ in range(num_layers))
        self.node_decoder = mlp([hidden, hidden, NUM_SLOTS])
        self.edge_decoder = EdgeSetDecoder(hidden) if message == "mlp" \
            else LowRankEdgeDecoder(hidden, rank)
        self.gate_decoder = mlp([hidden, hidden, 1])
        # per layer: mean and max node embedding, mean structure, log width, log speed-up
        self.sparsity_head = sparsity_head_mlp(2 * hidden + NUM_STRUCTURAL + 2, head_hidden)
        with torch.no_grad():
            # small last layers: deltas start O(0.1) (the untrained rewrite is near-identity)
            # and keep ratios start at the uniform prior; training moves away from both
            # (zero biases: a shared offset would shift every weight of the model one way)
            for last in [self.node_decoder[-1]] + ([self.edge_decoder.out[-1]]
                                                   if message == "mlp" else []):
                last.weight.mul_(0.5)
                last.bias.zero_()
            # gates start exactly at 1; the zero last layer still passes gradients to itself
            self.gate_decoder[-1].weight.zero_()
            self.gate_decoder[-1].bias.zero_()

    @property
    def rewrites_weights(self) -> bool:
        """False when every rewrite is exactly the identity: an untrained network (gain 0), or
        the node and edge decoders' last layers all zero (deltas 0, so ``old + 0``) and the gate
        decoder's too (``exp(0)``). A head-only checkpoint is such a network."""
        if self.residual_scale == 0 or float(self.rewrite_gain.detach()) == 0:
            return False
        lasts = self.rewrite_layers()
        if self.gate_range <= 0:
            lasts.remove(self.gate_decoder[-1])
        return any(bool(p.detach().abs().sum() > 0) for last in lasts for p in last.parameters())

    def rewrite_layers(self) -> list[nn.Linear]:
        """The layers whose zero weights and biases make every rewrite exactly the identity:
        the last layers of the node and gate decoders, and the edge decoder's last layer
        ("mlp") or its target-side factors ("linear": u = p = 0 make every delta 0)."""
        if self.message == "mlp":
            edge = [self.edge_decoder.out[-1]]
        else:
            edge = [self.edge_decoder.scale_target, self.edge_decoder.shift_target]
        return [self.node_decoder[-1], *edge, self.gate_decoder[-1]]

    def delta_scale(self) -> torch.Tensor:
        """What every decoded delta is multiplied by: ``residual_scale * rewrite_gain``."""
        return self.residual_scale * self.rewrite_gain

    def forward(self, graph, speedup=None, *, rewrite_edges: bool = True):
        """Rewritten features and per-layer keep ratios of a graph or a PyG `Batch` of graphs.

        Args:
            graph: a `NetworkGraph` (its edge list is never built), its ``data``, or a `Batch`
                of ``data``.
            speedup: MACs speed-up target the keep ratios are for: a number, a tensor with one
                value per graph of the batch, or None (`DEFAULT_SPEEDUP`).
            rewrite_edges: False skips decoding the weights (``new_edge_attr`` is None), for
                callers that only want keep ratios.

        Returns:
            ``(new_x, new_edge_attr, keep_ratios)``: features shaped and typed like the input's,
            and a keep ratio in (0, 1) for every layer (``data.layer`` indices).
        """
        view = GraphView.of(graph)
        dtype = self.node_encoder[0].weight.dtype
        x = view.x.to(dtype)
        num_layers = view.num_layers
        with torch.no_grad():  # scales are normalisers, not something to learn through
            rms = grid_weight_rms(view, dtype)
        h, slot_scale = self._encode_nodes(x, view.x_param_mask, view.node_layer, rms)
        chunks = chunks_of(view.grids, self.chunk_entries)
        if self.message == "linear":
            h = linear_rounds(self, view, chunks, rms.clamp_min(1e-12), h)

            def decode(log_gate):
                return linear_decode_edges(self, view, chunks, rms.clamp_min(1e-12), h, log_gate)
        else:
            h, decode = self._mlp_rounds(view, chunks, rms, dtype, h)

        new_slots = self._rewrite_slots(view.x, h, view.x_param_mask, slot_scale,
                                        view.node_layer)
        log_gate = None
        if self.gate_range > 0:
            log_gate = self._log_gate(view.x, h, new_slots.dtype)
            new_slots = self._gate_slots(new_slots, log_gate)
        new_edge_attr = decode(log_gate) if rewrite_edges else None
        new_x = torch.cat([new_slots, view.x[:, NUM_SLOTS:]], dim=-1)
        keep = self._keep_ratios(view.batch, x, h, view.node_layer, num_layers, speedup)
        return new_x, new_edge_attr, keep

    def _mlp_rounds(self, view, chunks, rms, dtype, h):
        """The "mlp" kind's rounds (`grids`): node embeddings, and the edge decoding as a
        function of the channel gates."""
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        per_edge = edge_dtype(self.precision, sum(grid.num_edges for grid in view.grids), dtype,
                              training)
        cache = cache_budget(view) if self.cache_bytes is None else self.cache_bytes
        states = EdgeStates(self, view, chunks, rms.clamp_min(1e-12), dtype, cache, per_edge)
        for t, block in enumerate(self.blocks):
            forward, reverse = aggregate_round(self, states, chunks, t, h)
            h = block.update_nodes(h, forward, reverse)
            states.end_round(t, h)

        def decode(log_gate):
            return decode_edges(self, states, chunks, len(self.blocks), log_gate)
        return h, decode

    def _encode_nodes(self, x, param_mask, node_layer, rms):
        """Initial node embeddings and the per-layer slot scales, from features in our dtype."""
        num_layers = rms.shape[0]
        with torch.no_grad():
            slot_scale = self._slot_scale(x, param_mask, node_layer, num_layers, rms)
        mask = param_mask.to(x.dtype)
        slots = x[:, :NUM_SLOTS] * mask / slot_scale[node_layer]
        log_rms = rms.clamp_min(1e-12).log().clamp(-12, 4) / 4
        h = self.node_encoder(torch.cat(
            [x[:, NUM_SLOTS:], slots, mask, log_rms[node_layer].unsqueeze(1)], dim=-1))
        return h, slot_scale

    def _rewrite_slots(self, model_x, h, param_mask, slot_scale, node_layer):
        """New parameter slots in the model's dtype: additive deltas, multiplicative for the
        running variance (deltas computed in our dtype, added in the model's: no precision of a
        float64 model's untouched entries is lost)."""
        mask = param_mask.to(h.dtype)
        delta = self.delta_scale() * self.node_decoder(h) * mask
        positive = torch.arange(NUM_SLOTS, device=h.device) == POSITIVE_SLOT
        factor = torch.where(positive, delta.exp(), torch.ones_like(delta)).to(model_x.dtype)
        shift = torch.where(positive, torch.zeros_like(delta), delta * slot_scale[node_layer])
        return model_x[:, :NUM_SLOTS] * factor + shift.to(model_x.dtype)

    def _log_gate(self, model_x, h, dtype):
        """log g of every node (0 where no gate applies), in `dtype`."""
        kind = model_x[:, list(GATED_KINDS)].sum(1) > 0
        gated = kind & (model_x[:, SCALAR["is_output"]] <= 0)
        raw = self.gate_decoder(h).squeeze(1)
        # shrink far, grow little: growing a channel is never needed to make pruning easy
        log_gate = torch.where(raw < 0, self.gate_range * torch.tanh(raw),
                               MAX_GATE_GROWTH * torch.tanh(raw))
        return torch.where(gated, log_gate, torch.zeros_like(log_gate)).to(dtype)

    @staticmethod
    def _gate_slots(slots, log_gate):
        """Bias, norm affine and running mean times g, running variance times g^2."""
        power = torch.ones(NUM_SLOTS, dtype=slots.dtype, device=slots.device)
        power[POSITIVE_SLOT] = 2  # a variance scales with the square
        power[SLOT["scale"]] = 0  # a per-channel scale multiplies after the norm: left alone
        return slots * torch.exp(log_gate.unsqueeze(1) * power)

    @staticmethod
    def _slot_scale(x, param_mask, node_layer, num_layers, rms):
        """[num_layers, NUM_SLOTS]: RMS of each slot within its layer, else the weights' RMS."""
        mask = param_mask.to(x.dtype)
        squares = scatter((x[:, :NUM_SLOTS] * mask).square(), node_layer, 0, num_layers, "sum")
        counts = scatter(mask, node_layer, 0, num_layers, "sum")
        slot_rms = (squares / counts.clamp_min(1)).sqrt()
        fallback = torch.where(rms > 0, rms, torch.ones_like(rms)).unsqueeze(1)
        return torch.where(slot_rms > 0, slot_rms, fallback)

    def _keep_ratios(self, batch, x, h, node_layer, num_layers, speedup):
        pooled = torch.cat([
            scatter(h, node_layer, 0, num_layers, "mean"),
            scatter(h, node_layer, 0, num_layers, "max"),
            scatter(x[:, NUM_SLOTS:], node_layer, 0, num_layers, "mean"),
            scatter(torch.ones_like(x[:, :1]), node_layer, 0, num_layers, "sum").log() / 8,
        ], dim=-1)
        target = self._speedup_per_layer(batch, node_layer, num_layers, speedup, x)
        return self.head_keep_ratios(pooled, target)

    def head_keep_ratios(self, pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The sparsity head alone: keep ratios from per-layer pooled features and speed-ups.

        `pooled` is [layers, head inputs - 1] (what `forward` pools per layer); `target` the
        speed-up of each layer. The head adds a learned logit to the uniform prior's.
        """
        features = torch.cat([pooled, target.log().unsqueeze(1)], dim=-1)
        prior = torch.logit(prior_keep_ratio(target))
        return torch.sigmoid(prior + self.sparsity_head(features).squeeze(1))

    @staticmethod
    def _speedup_per_layer(batch, node_layer, num_layers, speedup, like):
        if speedup is None:
            speedup = DEFAULT_SPEEDUP
        speedup = torch.as_tensor(speedup, dtype=like.dtype, device=like.device)
        if bool((speedup < 1).any()) or not bool(torch.isfinite(speedup).all()):
            raise ValueError(f"speedup must be finite and >= 1, got {speedup.tolist()}")
        if speedup.dim() == 0:
            return speedup.expand(num_layers)
        if batch is None:
            batch = torch.zeros_like(node_layer)
        layer_graph = scatter(batch, node_layer, 0, num_layers, "max")
        return speedup[layer_graph]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def metanet_parameters(metanet: MetaNetwork, graph, speedup=None) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers rewritten by `metanet`, differentiable in its weights.

    For meta-training: the task loss of the rewritten model flows back into the metanetwork.

    Example::

        graph = to_graph(model, example_inputs)
        params = metanet_parameters(metanet, graph)
        loss = F.cross_entropy(torch.func.functional_call(model, params, (inputs,)), labels)
        loss.backward()                       # gradients land in metanet.parameters()
    """
    new_x, new_edge_attr, _ = metanet(graph, speedup)
    return parameters_from_features(graph, new_x, new_edge_attr)


def parameters_from_features(graph, new_x: torch.Tensor, new_edge_attr: torch.Tensor):
    """The model's parameters and buffers read from rewritten graph features.

    `metanet_parameters` without the metanetwork forward: meta-training runs the metanetwork once
    per step and feeds the same features to the task loss (through this) and to the regulariser.
    """
    params = graph.parameters(new_x, new_edge_attr)
    # Running statistics are estimates, not trained weights (batch_norm refuses gradients
    # through them): their rewritten values are used, detached. A probe with ones in the
    # statistics columns only tells which tensors they are (each tensor comes from one slot).
    probe = torch.zeros_like(graph.x)
    probe[:, [SLOT["norm_running_mean"], SLOT["norm_running_var"]]] = 1
    probed = graph.parameters(probe, torch.zeros_like(graph.edge_attr))
    for name, value in probed.items():
        if value.numel() and bool(value.any()):
            params[name] = params[name].detach()
    return params
