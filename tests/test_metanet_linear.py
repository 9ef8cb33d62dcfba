"""The "linear" message kind (`metaprune.metanet.linear_messages`) against its edge-list oracle
(`scatter_reference`): same outputs and gradients on small models of every grid layout; an
untrained network is exactly the identity; checkpoints of the kind round-trip."""

import pytest
import torch
from test_metanet_grids import (
    TOLERANCE,
    assert_matches_oracle,
    max_difference,
    small_resnet,
    training_gradients,
)

from architectures import build
from metaprune.errors import ModelFormatError
from metaprune.graph import to_graph
from metaprune.metanet import MetaNetwork, read_metanet, save_metanet
from metaprune.metanet.checkpoint import validate_config
from metaprune.metanet.scatter_reference import scatter_forward

# every grid layout: dense conv + residual identity edges, grouped and depthwise convs,
# transposed convs, embedding + attention, flatten->Linear (k = H*W), fused qkv
MODELS = ["conv_transpose", "text_cnn", "vgg_flatten", "mlp_mixer", "vit_mha", "fused_qkv",
          "mobilenetv2", "densenet"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def graphs():
    return [to_graph(*build(name)) for name in MODELS] + [to_graph(*small_resnet())]


def _linear(seed: int = 1, **overrides) -> MetaNetwork:
    """A linear-kind network whose rewrite is on (a fresh one's gain is 0: the identity)."""
    torch.manual_seed(seed)
    metanet = MetaNetwork(**{"hidden": 8, "num_layers": 2, "message": "linear",
                             "gate_range": 3.0, **overrides})
    with torch.no_grad():
        metanet.rewrite_gain.fill_(1.0)
    return metanet.eval()


@pytest.mark.parametrize("chunk_entries", [1 << 18, 64], ids=["whole-blocks", "small-chunks"])
def test_block_matmuls_match_the_edge_list_oracle(graphs, chunk_entries):
    metanet = _linear()
    metanet.chunk_entries = chunk_entries
    speedups = (1.5, 3.0)
    outputs = assert_matches_oracle(metanet, graphs, speedups)
    for index, graph in enumerate(graphs):
        for new in outputs[index * len(speedups):(index + 1) * len(speedups)]:
            assert not torch.equal(new[1], graph.edge_attr)  # the rewrite did act


def test_meta_training_gradients_match_the_oracle():
    model, (inputs,) = small_resnet()
    graph = to_graph(model, (inputs,))
    metanet = _linear(seed=0, hidden=16).train()
    metanet.chunk_entries = 128  # blocks cut into chunks: partial sums across chunks
    new = training_gradients(metanet, model, graph, inputs,
                             lambda: metanet(graph, speedup=2.0))
    oracle = training_gradients(metanet, model, graph, inputs,
                                lambda: scatter_forward(metanet, graph.data, speedup=2.0))
    assert set(new) == set(oracle) == {name for name, _ in metanet.named_parameters()}
    assert new["blocks.0.forward_messages.weight"].abs().sum() > 0  # through every round
    for name in oracle:
        assert float((new[name] - oracle[name]).abs().max()) <= TOLERANCE, name


def test_an_untrained_linear_network_is_exactly_the_identity(graphs):
    torch.manual_seed(0)
    metanet = MetaNetwork(hidden=8, num_layers=2, message="linear", gate_range=3.0).eval()
    assert not metanet.rewrites_weights
    with torch.no_grad():
        for graph in graphs:
            new_x, new_edge_attr, keep = metanet(graph)
            assert torch.equal(new_x, graph.x) and torch.equal(new_edge_attr, graph.edge_attr)
            assert bool(((keep > 0) & (keep < 1)).all())


def test_a_linear_checkpoint_round_trips_and_its_config_is_checked(tmp_path, graphs):
    metanet = _linear()
    path = save_metanet(metanet, tmp_path / "fast.safetensors", training={"steps": 0})
    loaded, document = read_metanet(path)
    assert document["config"]["message"] == "linear" and loaded.message == "linear"
    with torch.no_grad():
        assert max_difference(loaded(graphs[0]), metanet(graphs[0])) == 0
    good = dict(document["config"])
    for bad in ({"aggregations": ["max"]}, {"message": "other"}, {"rank": 0}):
        with pytest.raises(ModelFormatError):
            validate_config({**good, **bad})
    old_style = {key: value for key, value in good.items() if key not in ("message", "rank")}
    assert validate_config({**old_style, "aggregations": ["sum"]})["message"] == "mlp"


def test_metanet_init_writes_an_untrained_linear_checkpoint(tmp_path, graphs):
    from metaprune.cli.main import main as cli_main
    from metaprune.metanet import load_metanet

    path = tmp_path / "fresh.safetensors"
    assert cli_main(["metanet", "init", "--out", str(path), "--hidden", "8", "--seed", "3"]) == 0
    loaded = load_metanet(str(path))
    assert loaded.metanet.message == "linear" and not loaded.rewrites_weights
    assert not loaded.head_trained  # the engine allocates globally until train-head has run
    torch.manual_seed(3)
    same = MetaNetwork(hidden=8, message="linear", gate_range=3.0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.metanet.state_dict().values(),
                                                 same.state_dict().values()))


def test_the_shipped_fast_checkpoint_is_linear_named_and_never_chosen_by_default():
    from metaprune.metanet import load_metanet
    from metaprune.metanet.scope import select_metanet

    model, inputs = small_resnet()
    fast = load_metanet("fast")
    assert fast.metanet.message == "linear" and fast.head_trained and not fast.rewrites_weights
    keep = fast.layer_keep_ratios(model, inputs, speedup=2.0)
    assert keep and all(0 < ratio <= 1 for ratio in keep.values())
    path, entry = select_metanet("fast", model)
    assert path.stem == "fast" and entry["reason"] == "checkpoint given by name"
    assert select_metanet("default", model)[0].stem == "metanet"  # the default stays
