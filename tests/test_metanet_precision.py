"""bf16 per-edge message passing (`MetaNetwork.precision`): close to fp32 on small models,
fp32 exactly where "auto" keeps it, refused where gradients are recorded."""

import pytest
import torch

from metaprune import zoo
from metaprune.graph import to_graph
from metaprune.bench.metanet_scale import rewrite_switched_on
from metaprune.metanet import LoadedMetanet
from metaprune.metanet.checkpoint import read_metanet
from metaprune.metanet.grids import GraphView
from metaprune.metanet.precision import AUTO_MIN_EDGES, amax, edge_dtype
from metaprune.pruning.metanet_bridge import default_checkpoint

# bf16 against fp32, the committed checkpoint with its rewrite on, on the two models below,
# measured 2026-12-03: rewrite error 0.36-0.54 %, weights within 3.3e-5-4.0e-5 of their
# layer's RMS, keep ratios within 4.8e-4-2.2e-3 (1.4e-4-3.4e-4 with the checkpoint before;
# the keep ratios move with the sparsity head, which meta-training keeps changing).
REWRITE_TOLERANCE = 2e-2  # |new16 - new32| / |new32 - old|, in norm: the rewrite's own error
WEIGHT_TOLERANCE = 2e-4  # max |new16 - new32| / the layer's weight RMS
KEEP_TOLERANCE = 1e-2  # max |keep16 - keep32|: under a channel in a hundred

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zoo(family, shape, **overrides):
    config = zoo.default_config(family, input_shape=shape, num_classes=4, **overrides)
    torch.manual_seed(0)
    return zoo.build(family, config).eval(), zoo.example_inputs(config)


@pytest.fixture(scope="module")
def graphs():
    return [to_graph(*_zoo("resnet", (3, 16, 16), depth=8, stage_widths=[8, 16, 16])),
            to_graph(*_zoo("vit", (3, 16, 16), embed_dim=24, blocks=[{"heads": 3, "mlp": 48}]))]


@pytest.fixture()
def metanet():
    """The committed checkpoint (its message passing and trained sparsity head) with its
    rewrite switched on, as the bench times it: its decoders are zero as shipped."""
    network = rewrite_switched_on(LoadedMetanet(read_metanet(default_checkpoint())[0])).metanet
    network.chunk_entries, network.cache_bytes = 512, 1 << 16  # chunks, some recomputed
    return network


def _run(metanet, graph, precision):
    metanet.precision = precision
    with torch.no_grad():
        return metanet(graph)


def test_bf16_stays_within_its_tolerance_of_fp32(graphs, metanet):
    for graph in graphs:
        x32, w32, keep32 = _run(metanet, graph, "fp32")
        x16, w16, keep16 = _run(metanet, graph, "bf16")
        assert w16.dtype == w32.dtype == graph.features.edge_attr.dtype == torch.float32
        old = graph.features.edge_attr
        assert float((w16 - w32).norm() / (w32 - old).norm()) < REWRITE_TOLERANCE
        for grid in GraphView.of(graph).grids:
            if grid.k:
                rms = grid.attr(old).square().mean().sqrt()
                assert float((grid.attr(w16) - grid.attr(w32)).abs().max() / rms) \
                    < WEIGHT_TOLERANCE
        assert float((keep16 - keep32).abs().max()) < KEEP_TOLERANCE
        assert not torch.equal(w16, w32)  # the bf16 path did run


def test_auto_is_fp32_below_its_threshold_and_bf16_is_for_inference(graphs, metanet):
    graph = graphs[0]
    assert graph.num_edges < AUTO_MIN_EDGES
    for fp32, auto in zip(_run(metanet, graph, "fp32"), _run(metanet, graph, "auto")):
        assert torch.equal(fp32, auto)
    metanet.precision = "bf16"
    with pytest.raises(ValueError, match="inference"):
        metanet(graph)  # gradients recorded: they would not reach the fp32 parameters
    assert edge_dtype("auto", AUTO_MIN_EDGES, torch.float32, training=True) == torch.float32
    assert edge_dtype("bf16", 10, torch.float64, training=False) == torch.float64
    with pytest.raises(ValueError, match="precision"):
        edge_dtype("fp16", 10, torch.float32, training=False)


def test_the_loaded_metanet_sets_the_precision_of_its_network(metanet):
    loaded = LoadedMetanet(metanet)
    loaded.precision = "auto"
    assert metanet.precision == loaded.precision == "auto"


@pytest.mark.parametrize("shape,dims", [((5, 7, 3), (1,)), ((7, 5, 3), (0,)), ((6, 9, 3), (0, 1)),
                                        ((4, 3, 9, 2), (2,)), ((1, 1, 3), (0, 1))])
def test_the_bf16_max_tree_equals_amax(shape, dims):
    x = torch.randn(shape).to(torch.bfloat16)
    assert torch.equal(amax(x, dims), x.amax(dims, keepdim=True))
    assert torch.equal(amax(x.float(), dims), x.float().amax(dims, keepdim=True))
