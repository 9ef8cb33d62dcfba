"""metaprune.graph: exact round trips, exact inverse mapping, sparse identity edges, errors."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from architectures import ARCHITECTURES, CifarResNet, FusedQKVAttention, build
from metaprune.errors import UnsupportedModelError
from metaprune.graph import NUM_NODE_FEATURES, PARAM_SLOTS, to_graph


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_model(a, b, inputs):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a.eval()(*inputs), b.eval()(*inputs))


def _distinct_features(graph):
    """x and edge_attr with every parameter-carrying entry replaced by a distinct value."""
    data = graph.data
    x = data.x.clone()
    mask = data.x_param_mask
    num_x = int(mask.sum())
    num_e = data.edge_attr.numel()
    values = torch.arange(1, num_x + num_e + 1, dtype=data.x.dtype)
    x[:, : mask.shape[1]][mask] = values[:num_x]
    return x, values[num_x:].clone(), values


def check_round_trip(model, inputs):
    before = _state(model)
    graph = to_graph(model, inputs)
    assert graph.data.x.shape == (graph.num_nodes, NUM_NODE_FEATURES)
    # edge-feature memory is the parameter count, never num_edges x largest kernel
    assert graph.data.edge_attr.numel() <= sum(p.numel() for p in model.parameters())
    _assert_same_model(model, graph.write_back(), inputs)

    x, edge_attr, written = _distinct_features(graph)
    rebuilt = graph.write_back(x=x, edge_attr=edge_attr)
    # the source is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    tensors = dict(rebuilt.named_parameters()) | dict(rebuilt.named_buffers())
    read = torch.cat([tensors[name].detach().reshape(-1) for name in graph.feature_parameters])
    # every written value landed in exactly one parameter entry, and nothing else is in them
    assert torch.equal(torch.sort(read).values, written)
    # ... and exactly in the entry it was read from: reading the rebuilt model gives them back
    again = to_graph(rebuilt, inputs)
    assert torch.equal(again.data.edge_attr, edge_attr)
    slots = len(PARAM_SLOTS)
    assert torch.equal(again.data.x[:, :slots][again.data.x_param_mask],
                       x[:, :slots][graph.data.x_param_mask])
    assert torch.equal(again.data.edge_index, graph.data.edge_index)
    # parameters outside the features (class tokens, positional embeddings) come back as is
    covered = set(graph.feature_parameters) | set(graph.side_parameters)
    assert {name for name, _ in model.named_parameters()} <= covered
    for name, value in graph.side_parameters.items():
        assert torch.equal(tensors[name], value)
    return graph


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_round_trip_architectures(name):
    model, inputs = build(name)
    graph = check_round_trip(model, inputs)
    assert graph.data.layer.shape == (graph.num_nodes,)
    assert graph.data.layer.max() == len(graph.layers) - 1
    import networkx as nx

    assert nx.is_directed_acyclic_graph(graph.layer_dag)


# narrow configs keep the test fast; the structure is each family's own
ZOO_CASES = [
    ("mlp", (1, 40), {"hidden": [16, 8]}),
    ("mlp", (1, 40), {"hidden": [12, 12], "residual": True}),
    ("cnn1d", (1, 40), {"widths": [8, 8], "kernel_sizes": [5, 3], "pools": [2, 2]}),
    ("vgg", (3, 16, 16), {"stages": [[8], [16, 16]], "hidden": [16]}),
    ("resnet", (3, 16, 16), {"depth": 8}),
    ("resnet", (1, 40), {"depth": 8, "dims": 1}),
    ("mobilenetv2", (3, 16, 16), {"stem_width": 8, "blocks": [
        {"hidden": 16, "out": 8, "stride": 1, "residual": False},
        {"hidden": 24, "out": 8, "stride": 1, "residual": True},
        {"hidden": 24, "out": 12, "stride": 2, "residual": False}]}),
    ("densenet", (3, 16, 16), {"stem_width": 8, "blocks": [[{"width": 8, "growth": 4}] * 2] * 2}),
    ("vit", (3, 16, 16), {"embed_dim": 16, "blocks": [{"heads": 2, "mlp": 32}] * 2}),
]


def test_round_trip_zoo_families():
    zoo = pytest.importorskip("metaprune.zoo")
    assert {family for family, _, _ in ZOO_CASES} == set(zoo.FAMILIES)
    for family, shape, overrides in ZOO_CASES:
        config = zoo.default_config(family, input_shape=shape, num_classes=4, **overrides)
        torch.manual_seed(0)
        model = zoo.build(family, config).eval()
        check_round_trip(model, zoo.example_inputs(config))


def test_resnet56_identity_edges_are_sparse():
    graph = to_graph(CifarResNet(56).eval(), (torch.randn(1, 3, 32, 32),))
    assert graph.num_edges <= 105_000  # reference implementation: 140,720
    zoo = pytest.importorskip("metaprune.zoo")
    config = zoo.default_config("resnet", input_shape=(3, 32, 32), num_classes=10, depth=56)
    zoo_graph = to_graph(zoo.build("resnet", config).eval(), zoo.example_inputs(config))
    assert zoo_graph.num_edges == graph.num_edges
    identity = graph.edge_groups()[0]
    assert identity.k == 0
    # 27 residual adds, two addends each, one edge per channel: 2 * 9 * (16 + 32 + 64)
    assert identity.attr.shape[0] == 2016


def test_edge_groups_follow_kernel_sizes():
    model, inputs = build("vgg_flatten")
    graph = to_graph(model, inputs)
    groups = {group.k: group for group in graph.edge_groups()}
    # 3x3 convolutions, 1-weight linear edges, and flatten->Linear edges carrying H*W = 16
    assert set(groups) == {9, 1, 16}
    fc = model.classifier[1].weight  # [20, 16 * 4 * 4]
    assert torch.equal(groups[16].attr, fc.detach().reshape(20, 16, 16).reshape(-1, 16))


def test_rewritten_features_change_the_model():
    model, inputs = build("residual_mlp")
    graph = to_graph(model, inputs)
    edge_attr = graph.data.edge_attr * 2
    rebuilt = graph.write_back(edge_attr=edge_attr)
    assert torch.equal(rebuilt.out.weight, model.out.weight * 2)
    with pytest.raises(ValueError, match="flat"):
        graph.write_back(edge_attr=edge_attr[:-1])


class OwnWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return F.linear(x, self.weight)


class LayerScale(nn.Module):
    """ConvNeXt-style block: permute to channels-last, LayerNorm, Linear, layer scale."""

    def __init__(self, width=6):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.rand(width))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.conv(x)
        y = self.fc(self.norm(x.permute(0, 2, 3, 1))) * self.gamma
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


class SpatialScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gamma = nn.Parameter(torch.rand(5, 5))

    def forward(self, x):
        return self.conv(x) * self.gamma


def test_layer_scale_is_a_scale_slot():
    torch.manual_seed(0)
    model = LayerScale().eval()
    graph = check_round_trip(model, (torch.randn(1, 3, 5, 5),))
    scale = next(layer for layer in graph.layers if layer.name == "gamma:scale")
    nodes = slice(scale.first_node, scale.first_node + scale.num_nodes)
    assert torch.equal(graph.data.x[nodes, PARAM_SLOTS.index("scale")], model.gamma.detach())
    assert "gamma" not in graph.side_parameters


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, tokens):
        return F.linear(self.embed(tokens), self.embed.weight)


class SpectralChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        z = torch.fft.rfft(self.conv(x), dim=1).abs()  # 8 channels -> 5 frequencies
        return self.fc(z.mean(-1))


@pytest.mark.parametrize(
    "model, inputs, words",
    [
        (OwnWeight(), (torch.randn(2, 3),), ["linear", "'weight'", "OwnWeight"]),
        (SpatialScale(), (torch.randn(1, 3, 5, 5),), ["mul", "'gamma'", "layer scale"]),
        (nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4)), (torch.randn(1, 3, 4, 4),),
         ["prelu", "'1.weight'", "PReLU"]),
        (Tied(), (torch.randint(0, 10, (2, 3)),), ["linear", "'embed.weight'", "tying"]),
        (SpectralChannels(), (torch.randn(2, 2, 9),), ["fc", "fft_rfft"]),
    ],
)
def test_unsupported_operators_are_named(model, inputs, words):
    with pytest.raises(UnsupportedModelError) as error:
        to_graph(model, inputs)
    for word in words:
        assert word in str(error.value)


def test_layer_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(UnsupportedModelError, match="'fc'.*more than once"):
        to_graph(Twice(), (torch.randn(1, 3),))


def _graph_groups(graph):
    return {frozenset(names) for names in graph.coupled_layers()}


def _torch_pruning_groups(model, inputs):
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    found = set()
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        names = {
            dg._module2name[item.dep.target.module] for item in group
            if dg.is_out_channel_pruning_fn(item.dep.handler)
            and isinstance(item.dep.target.module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
        }
        found.add(frozenset(names))
    return found


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "se_block", "unet", "residual_mlp"])
def test_coupling_agrees_with_torch_pruning(name):
    model, inputs = build(name)
    graph = to_graph(model, inputs)
    assert _graph_groups(graph) == _torch_pruning_groups(model, inputs)


def test_mixer_token_axis_is_not_coupled_to_channels():
    # torch-pruning puts the token-mixing Linear into the channel group; the graph follows axes
    model, inputs = build("mlp_mixer")
    groups = _graph_groups(to_graph(model, inputs))
    assert frozenset({"patch", "blocks.0.channel_fc2", "blocks.1.channel_fc2"}) in groups
    assert frozenset({"blocks.0.token_fc2", "blocks.1.token_fc2"}) in groups


def test_parameters_are_differentiable_in_the_features():
    model, inputs = build("vgg_flatten")
    graph = to_graph(model, inputs)
    x = graph.data.x.clone().requires_grad_()
    edge_attr = graph.data.edge_attr.clone().requires_grad_()
    params = graph.parameters(x, edge_attr)
    for name, value in params.items():
        assert torch.equal(value, model.get_parameter(name) if name in dict(
            model.named_parameters()) else model.get_buffer(name)), name
    trainable = {n: p for n, p in params.items() if n in dict(model.named_parameters())}
    loss = torch.func.functional_call(model, trainable, inputs).square().sum()
    loss.backward()
    assert edge_attr.grad.abs().sum() > 0
    # structural columns and buffers (running statistics) get no gradient
    assert x.grad[:, len(PARAM_SLOTS):].abs().sum() == 0
    assert x.grad[:, 1:3].abs().sum() > 0  # BatchNorm affine folded into slots 1 and 2


def test_batched_graphs_keep_their_groups_and_layers_apart():
    from torch_geometric.data import Batch

    from metaprune.graph import edge_groups

    graphs = [to_graph(*build("vgg_flatten")), to_graph(*build("residual_mlp"))]
    batch = Batch.from_data_list([g.data for g in graphs])
    expected = [(grp.k, grp.attr) for g in graphs for grp in g.edge_groups()]
    got = [(grp.k, grp.attr) for grp in edge_groups(batch)]
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))
    assert batch.layer.max() == len(graphs[0].layers) + len(graphs[1].layers) - 1


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with key/value widths different from the query's."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(4, 8)
        self.memory = nn.Linear(4, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)  # sequence-first layout
        self.out = nn.Linear(8, 2)

    def forward(self, x, m):
        q, mem = self.query(x), self.memory(m)
        return self.out(self.attn(q, mem, mem)[0])


class StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)


class PlainSubclass(nn.Conv2d):
    """A subclass that keeps Conv2d's forward is an ordinary convolution."""


def test_separate_key_value_projections_round_trip():
    torch.manual_seed(0)
    check_round_trip(CrossAttention().eval(), (torch.randn(5, 2, 4), torch.randn(3, 2, 4)))


def test_subclasses_keeping_forward_are_layers():
    model = nn.Sequential(PlainSubclass(3, 4, 3), nn.ReLU())
    check_round_trip(model, (torch.randn(1, 3, 6, 6),))


@pytest.mark.parametrize(
    "model, inputs, words",
    [
        (nn.Sequential(StandardisedConv(3, 4, 3)), (torch.randn(1, 3, 6, 6),),
         ["'0.weight'", "StandardisedConv"]),
        (nn.LSTM(3, 4), (torch.randn(5, 1, 3),), ["lstm", "LSTM"]),
        (nn.Bilinear(3, 3, 2), (torch.randn(2, 3), torch.randn(2, 3)), ["bilinear"]),
    ],
)
def test_unknown_parametrised_modules_are_named(model, inputs, words):
    with pytest.raises(UnsupportedModelError) as error:
        to_graph(model, inputs)
    for word in words:
        assert word in str(error.value)


class ChannelsLastHead(nn.Module):
    """Flatten in H, W, C order: each channel's H*W weights are strided in the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.conv(x).permute(0, 2, 3, 1).flatten(1))


def test_channels_last_flatten_groups_each_channels_weights():
    torch.manual_seed(0)
    model = ChannelsLastHead().eval()
    graph = check_round_trip(model, (torch.randn(1, 3, 5, 5),))
    group = next(g for g in graph.edge_groups() if g.k == 9)
    fc_layer = [layer.name for layer in graph.layers].index("fc")
    fc_edges = graph.data.edge_layer[group.edges] == fc_layer
    # edge (output j, channel c) holds fc.weight[j, c::4] (positions in H, W order)
    expected = model.fc.weight.detach().reshape(5, 9, 4).permute(0, 2, 1).reshape(20, 9)
    assert torch.equal(group.attr[fc_edges], expected)


def test_uneven_features_per_channel_are_refused():
    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(2, 3, 1), nn.Conv1d(2, 3, 1)
            self.fc = nn.Linear(3 * 4 + 3 * 2, 2)

        def forward(self, x):
            return self.fc(torch.cat([self.a(x).flatten(1), self.b(x[..., :2]).flatten(1)], 1))

    with pytest.raises(UnsupportedModelError, match="fc.weight.*unequal"):
        to_graph(Uneven(), (torch.randn(1, 2, 4),))


@pytest.mark.parametrize("attention", ["matmul", "sdpa", "einsum"])
def test_sequence_input_channels_are_its_last_axis(attention):
    torch.manual_seed(0)
    model = FusedQKVAttention(8, 2, attention=attention).eval()  # [batch, tokens, dim] input
    graph = check_round_trip(model, (torch.randn(2, 5, 8),))
    names = [layer.name for layer in graph.layers]
    assert names == ["input.0.last_axis", "qkv", "proj"]  # 8 input channels, no positions
    dag = graph.layer_dag
    assert {(dag.nodes[a]["name"], dag.nodes[b]["name"]) for a, b in dag.edges} == {
        ("input.0.last_axis", "qkv"), ("qkv", "proj")}
    # proj reads exactly the value channels: qkv outputs 16..23, in order
    proj = [layer.name for layer in graph.layers].index("proj")
    src = graph.data.edge_index[0, graph.data.edge_layer == proj].reshape(8, 8)
    qkv_first = graph.layers[names.index("qkv")].first_node
    assert torch.equal(src, torch.arange(qkv_first + 16, qkv_first + 24).expand(8, 8))


def test_unused_layers_go_to_the_side_store():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    graph = check_round_trip(Spare(), (torch.randn(1, 3),))
    assert set(graph.side_parameters) == {"spare.weight", "spare.bias"}
    assert any("'spare' is never called" in note for note in graph.notes)


def test_root_module_as_the_only_layer():
    graph = check_round_trip(nn.Linear(3, 2), (torch.randn(1, 3),))
    assert set(graph.feature_parameters) == {"weight", "bias"}
