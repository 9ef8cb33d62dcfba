"""The metanetwork's grid message passing against the edge-list oracle (`scatter_reference`):
same outputs and same gradients on small models, whatever the chunking and caching; and
`NetworkGraph.data` built only when asked for."""

import pytest
import torch
from torch.nn import functional as F

from architectures import build
from metaprune import zoo
from metaprune.graph import edge_grids, to_graph
from metaprune.metanet import (
    LoadedMetanet,
    MetaNetwork,
    metanet_parameters,
    parameters_from_features,
)
from metaprune.metanet.checkpoint import read_metanet
from metaprune.metanet.scatter_reference import scatter_forward
from metaprune.pruning.metanet_bridge import default_checkpoint

TOLERANCE = 1e-5  # max |difference| of outputs and gradients (the bound)
# one of each edge-grid shape: dense conv + residual identity edges, grouped and depthwise
# convs, transposed convs, embedding + attention, flatten->Linear (k = H*W)
MODELS = ["conv_transpose", "text_cnn", "vgg_flatten", "mlp_mixer"]


def _zoo(family, shape, **overrides):
    config = zoo.default_config(family, input_shape=shape, num_classes=4, **overrides)
    torch.manual_seed(0)
    return zoo.build(family, config).eval(), zoo.example_inputs(config)


def small_resnet():
    return _zoo("resnet", (3, 12, 12), depth=8, stage_widths=[4, 8, 8])


def _models():
    yield from (build(name) for name in MODELS)
    yield small_resnet()
    yield _zoo("mobilenetv2", (3, 12, 12), stem_width=6, blocks=[
        {"hidden": 12, "out": 6, "stride": 1, "residual": True}])
    yield _zoo("vit", (3, 12, 12), embed_dim=12, blocks=[{"heads": 3, "mlp": 24}])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def graphs():
    return [to_graph(model, inputs) for model, inputs in _models()]


@pytest.fixture(scope="module")
def committed():
    return read_metanet(default_checkpoint())[0]


def _rewriting(metanet: MetaNetwork) -> MetaNetwork:
    """`metanet` with its rewrite gain at 1: a fresh network's gain is 0, which would make
    every decoder's output (and gradient) vanish from the comparison."""
    with torch.no_grad():
        metanet.rewrite_gain.fill_(1.0)
    return metanet


def max_difference(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def assert_matches_oracle(metanet, graphs, speedups=(None,)) -> list:
    """Each graph at each speed-up: `metanet`'s outputs equal the edge-list oracle's
    (`scatter_forward`) within TOLERANCE. Returns the outputs, graph-major."""
    outputs = []
    with torch.no_grad():
        for graph in graphs:
            for speedup in speedups:
                new = metanet(graph, speedup=speedup)
                oracle = scatter_forward(metanet, graph.data, speedup=speedup)
                assert max_difference(new, oracle) <= TOLERANCE
                outputs.append(new)
    return outputs


def training_gradients(metanet, model, graph, inputs, forward) -> dict[str, torch.Tensor]:
    """Gradients in `metanet` of a meta-training loss (the task loss of the rewritten `model`
    plus the keep ratios' sum) computed from ``forward() -> (new_x, new_edge_attr, keep)``."""
    labels = torch.arange(inputs.shape[0]) % 4
    metanet.zero_grad()
    new_x, new_edge_attr, keep = forward()
    params = parameters_from_features(graph, new_x, new_edge_attr)
    logits = torch.func.functional_call(model, params, (inputs,))
    (F.cross_entropy(logits, labels) + keep.sum()).backward()
    return {name: p.grad.clone() for name, p in metanet.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("chunk_entries,cache_bytes",
                         [(1 << 16, 1 << 30), (512, 0), (512, 1 << 16)],
                         ids=["cached", "small-chunks-recomputed", "some-cached"])
def test_the_committed_checkpoint_matches_the_edge_list_oracle(graphs, committed,
                                                               chunk_entries, cache_bytes):
    committed.chunk_entries, committed.cache_bytes = chunk_entries, cache_bytes
    try:
        assert_matches_oracle(committed, graphs, speedups=(1.5, 3.0))
    finally:
        committed.chunk_entries, committed.cache_bytes = MetaNetwork().chunk_entries, \
            MetaNetwork().cache_bytes


@pytest.mark.parametrize("aggregations", [["sum", "mean", "max"], ["min", "var", "std"]])
def test_every_aggregation_matches_the_oracle(graphs, aggregations):
    torch.manual_seed(1)
    metanet = _rewriting(MetaNetwork(hidden=8, num_layers=2, aggregations=aggregations,
                                     gate_range=3.0).eval())
    metanet.chunk_entries = 256  # several chunks per grid, reductions across chunks
    assert_matches_oracle(metanet, graphs)


def test_meta_training_gradients_match_the_oracle():
    model, (inputs,) = small_resnet()
    graph = to_graph(model, (inputs,))
    torch.manual_seed(0)
    metanet = _rewriting(MetaNetwork(hidden=16, num_layers=2, gate_range=3.0))
    metanet.chunk_entries, metanet.cache_bytes = 128, 4096  # some cached, some recomputed

    new = training_gradients(metanet, model, graph, inputs,
                             lambda: metanet(graph, speedup=2.0))
    oracle = training_gradients(metanet, model, graph, inputs,
                                lambda: scatter_forward(metanet, graph.data, speedup=2.0))
    assert set(new) == set(oracle)
    assert new["edge_encoder.entry.0.weight"].abs().sum() > 0  # through every round
    for name in oracle:
        assert float((new[name] - oracle[name]).abs().max()) <= TOLERANCE, name
    params = metanet_parameters(metanet, graph)  # the public helper takes the graph itself
    assert set(params) == set(graph.feature_parameters)


def test_the_edge_list_is_built_only_on_request():
    graph = to_graph(*small_resnet())
    with torch.no_grad():
        MetaNetwork(hidden=8, num_layers=1)(graph)
        graph.write_back()
    assert "edge_index" not in graph.features  # nothing above needed it
    data = graph.data
    assert data.edge_index.shape == (2, graph.num_edges)
    assert graph.features is data  # one object: features gained the edge list
    lazy, listed = graph.edge_grids(), edge_grids(data)
    assert [(g.rows, g.cols, g.k, g.layer, g.edge_start, g.attr_start) for g in lazy] == \
        [(g.rows, g.cols, g.k, g.layer, g.edge_start, g.attr_start) for g in listed]
    for a, b in zip(lazy, listed):
        shape = (a.rows, a.cols)
        assert torch.equal(a.src.expand(shape), b.src.expand(shape))
        assert torch.equal(a.dst.expand(shape), b.dst.expand(shape))


def test_a_switched_off_rewrite_is_the_identity_so_transform_may_skip_it(graphs, committed):
    # The shipped checkpoint's decoders end in zero layers: the whole message passing gives
    # back the very features it read, which is what lets `transform` return a copy instead.
    assert not committed.rewrites_weights and _rewriting(MetaNetwork()).rewrites_weights
    with torch.no_grad():
        for graph in graphs:
            new_x, new_edge_attr, _ = committed(graph)
            assert torch.equal(new_x, graph.x) and torch.equal(new_edge_attr, graph.edge_attr)
    model, inputs = small_resnet()
    copied = LoadedMetanet(committed).transform(model, inputs)
    assert copied is not model
    for (name, before), after in zip(model.state_dict().items(),
                                     copied.state_dict().values()):
        assert torch.equal(before, after) and before.data_ptr() != after.data_ptr(), name
