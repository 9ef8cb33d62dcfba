"""LLaMA-, BERT-, GPT- (tied), ConvNeXt-, ResNeXt- and SE-style miniatures written the way their
upstream code writes them: exact graph round trip, 2x MACs within 2 %, whole attention heads,
tied weights written once, and a .pt2 round trip of the pruned model."""

import pytest
import torch
from torch import nn

from architectures_upstream import UPSTREAM_ARCHITECTURES
from metaprune import load_model, prune, save_model
from metaprune.graph import to_graph
from test_graph import check_round_trip


def _build(name):
    torch.manual_seed(0)
    model, inputs = UPSTREAM_ARCHITECTURES[name]()
    return model.eval(), inputs


def _outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.mark.parametrize("name", sorted(UPSTREAM_ARCHITECTURES))
def test_round_trip_prune_2x_and_pt2(name, tmp_path):
    model, inputs = _build(name)
    check_round_trip(model, inputs)
    result = prune(model, inputs, speedup=2.0, latency=False)
    assert abs(result.report["speedup"] / 2.0 - 1) <= 0.02
    pruned = result.model
    assert _outputs(pruned, inputs).shape == _outputs(model, inputs).shape
    assert result.report["params_after"] < result.report["params_before"]
    path = tmp_path / f"{name}.pt2"
    save_model(pruned, inputs, path)
    loaded, loaded_inputs = load_model(path)
    assert torch.allclose(_outputs(loaded, inputs), _outputs(pruned, inputs), atol=1e-6)


def test_llama_gqa_prunes_a_key_value_head_with_its_query_heads():
    model, inputs = _build("llama_style")
    result = prune(model, inputs, policy={"layers.0.self_attn.q_proj": 0.5}, latency=False)
    report, attention = result.report, result.model.layers[0].self_attn
    assert report["kept_heads"] == {"layers.0.self_attn": [2, 4], "layers.1.self_attn": [4, 4]}
    # one of two key-value heads and its two query heads: the 4:2 ratio stays 2:1
    assert attention.q_proj.out_features == 2 * attention.head_dim
    assert attention.k_proj.out_features == attention.v_proj.out_features == attention.head_dim
    assert attention.o_proj.in_features == 2 * attention.head_dim
    # the hidden size is one coupled group: embeddings, every RMSNorm and projection agree
    hidden = prune(model, inputs, policy={"embed_tokens": 0.5}, latency=False).model
    widths = {hidden.embed_tokens.embedding_dim, hidden.norm.weight.numel(),
              hidden.lm_head.in_features, hidden.layers[1].mlp.down_proj.out_features,
              hidden.layers[0].input_layernorm.weight.numel()}
    assert widths == {16}
    assert _outputs(hidden, inputs).shape == (2, 8, 48)


def test_bert_heads_are_removed_whole():
    model, inputs = _build("bert_style")
    result = prune(model, inputs, policy={"layers.1.attention.query": 0.5}, latency=False)
    assert result.report["kept_heads"]["layers.1.attention"] == [2, 4]
    attention = result.model.layers[1].attention
    assert attention.key.out_features == attention.value.out_features == 16
    assert _outputs(result.model, inputs).shape == (2, 3)


def test_gpt_tied_weight_is_stored_once_and_stays_tied():
    model, inputs = _build("gpt_tied")
    graph = to_graph(model, inputs)
    tied = [layer for layer in graph.layers if layer.tied]
    assert [layer.tied for layer in tied] == [{"lm_head.weight": "wte.weight"}]
    import networkx as nx

    dag = graph.layer_dag  # the tie is an attribute of the LM head's vertex, not a cycle
    assert nx.is_directed_acyclic_graph(dag)
    assert [d["tied"] for _, d in dag.nodes(data=True) if d["tied"]] == [tied[0].tied]
    assert graph.feature_parameters.count("wte.weight") == 1
    assert "lm_head.weight" not in graph.feature_parameters
    copy = graph.write_back(edge_attr=graph.data.edge_attr * 2)
    assert copy.lm_head.weight is copy.wte.weight
    assert torch.equal(copy.wte.weight, model.wte.weight * 2)

    pruned = prune(model, inputs, speedup=2.0, latency=False).model
    assert pruned.lm_head.weight is pruned.wte.weight
    assert pruned.lm_head.in_features == pruned.wte.embedding_dim < 32
    # heads split with a fixed split size (GPT-2's `split(self.split_size)`): asking for them
    # names the operator that breaks, and the model is not changed
    with pytest.raises(Exception, match="removing its channels breaks the model"):
        prune(model, inputs, policy={"h.0.attn.c_attn": 0.5}, latency=False)


def test_resnext_grouped_convs_lose_whole_groups():
    model, inputs = _build("resnext_style")
    result = prune(model, inputs, policy={"layer2.conv1": 0.5}, latency=False)
    conv, norm = result.model.layer2.conv2, result.model.layer2.bn2
    assert (conv.in_channels, conv.out_channels, conv.groups) == (16, 16, 2)
    assert (norm.num_channels, norm.num_groups) == (16, 2)
    assert conv.weight.shape == (16, 8, 3, 3)  # 8 input channels per group, as before


def test_convnext_layer_norm_2d_is_folded_like_the_module():
    model, inputs = _build("convnext_style")
    graph = to_graph(model, inputs)
    assert {"stem.1.weight", "stem.1.bias", "downsample.0.weight"} <= set(
        graph.feature_parameters)
    assert not graph.side_parameters
    pruned = prune(model, inputs, policy={"stem.0": 0.5}, latency=False).model
    assert pruned.stem[1].normalized_shape == (8,)
    assert pruned.stage1.gamma.numel() == 8


def test_an_unreachable_target_says_how_far_off_it_is():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(Exception, match=r"off the target") as error:
        prune(model, (torch.randn(1, 4),), speedup=1.9, latency=False)
    assert "1.9 cannot be met" in str(error.value)
