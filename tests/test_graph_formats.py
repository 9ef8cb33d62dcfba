"""Models loaded from .pt2 (exported, then lifted to real modules) give the same graph."""

import pytest
import torch

from architectures import build
from metaprune.graph import to_graph


@pytest.mark.parametrize("name", ["vit_mha", "fused_qkv", "densenet", "vgg_flatten", "mlp_mixer"])
def test_pt2_model_gives_the_same_graph(name, tmp_path):
    formats = pytest.importorskip("metaprune.formats")
    model, inputs = build(name)
    path = tmp_path / f"{name}.pt2"
    formats.save_model(model, inputs, path)
    lifted, lifted_inputs = formats.load_model(path)
    eager, graph = to_graph(model, inputs), to_graph(lifted, lifted_inputs)
    assert torch.equal(graph.data.edge_index, eager.data.edge_index)
    assert torch.equal(graph.data.edge_attr, eager.data.edge_attr)
    assert torch.equal(graph.data.x, eager.data.x)
    rebuilt = graph.write_back()
    with torch.no_grad():
        assert torch.equal(rebuilt(*lifted_inputs), lifted(*lifted_inputs))
