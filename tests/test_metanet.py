"""metaprune.metanet: runs on every architecture, near-identity untrained, differentiable,
safe checkpoints, and the pruning engine's metanet path end to end."""

import json

import pytest
import torch
from torch.nn import functional as F
from torch_geometric.data import Batch

from architectures import build
from metaprune import zoo
from metaprune.errors import InvalidTargetError, MetaPruneError, ModelFormatError
from metaprune.graph import PARAM_SLOTS, to_graph
from metaprune.graph.features import SCALAR
from metaprune.metanet import (
    GroupSparsity,
    LoadedMetanet,
    MetaNetwork,
    load_metanet,
    metanet_parameters,
    policy_targets,
    save_metanet,
)

SLOTS = len(PARAM_SLOTS)

# narrow configs of every zoo family keep the test fast
ZOO_CASES = [
    ("mlp", (1, 40), {"hidden": [12, 6]}),
    ("cnn1d", (1, 40), {"widths": [6, 10], "kernel_sizes": [3, 5], "pools": [2, 2]}),
    ("vgg", (3, 12, 12), {"stages": [[6], [10]], "hidden": [12]}),
    ("resnet", (1, 32), {"depth": 8, "dims": 1}),
    ("resnet", (3, 12, 12), {"depth": 8, "stage_widths": [4, 8, 8]}),
    ("mobilenetv2", (3, 12, 12), {"stem_width": 6, "blocks": [
        {"hidden": 12, "out": 6, "stride": 1, "residual": True}]}),
    ("densenet", (3, 12, 12), {"stem_width": 6, "blocks": [[{"width": 6, "growth": 3}] * 2]}),
    ("vit", (3, 12, 12), {"embed_dim": 12, "blocks": [{"heads": 3, "mlp": 24}]}),
]
ARCHITECTURE_CASES = ["unet", "text_cnn", "conv_transpose", "mlp_mixer", "se_block", "vgg_flatten"]


def _zoo_model(family, shape, overrides, seed=0):
    config = zoo.default_config(family, input_shape=shape, num_classes=4, **overrides)
    torch.manual_seed(seed)
    return zoo.build(family, config).eval(), zoo.example_inputs(config)


CASES = [(f"zoo-{family}-{i}", i) for i, (family, _, _) in enumerate(ZOO_CASES)] \
    + [(name, name) for name in ARCHITECTURE_CASES]


def _case(key):
    return _zoo_model(*ZOO_CASES[key]) if isinstance(key, int) else build(key)


def _rewriting(metanet: MetaNetwork) -> MetaNetwork:
    """`metanet` with its rewrite switched on, as the first training steps would (an untrained
    metanetwork's rewrite gain is 0: the exact identity)."""
    with torch.no_grad():
        metanet.rewrite_gain.fill_(1.0)
    return metanet


@pytest.fixture(scope="module")
def metanet():
    torch.manual_seed(0)
    return _rewriting(MetaNetwork(hidden=16, num_layers=2)).eval()


def test_an_untrained_metanetwork_is_exactly_the_identity_and_learns_to_leave_it():
    torch.manual_seed(0)
    untrained = MetaNetwork(hidden=8, num_layers=1, gate_range=2.0)
    assert not untrained.rewrites_weights
    model, (inputs,) = _zoo_model(*ZOO_CASES[3])  # a ResNet: BatchNorm, residual streams
    graph = to_graph(model, (inputs,))
    params = metanet_parameters(untrained, graph, speedup=2.0)
    for name, value in model.state_dict().items():
        if name in params:
            assert torch.equal(params[name], value), name
    # the gain's gradient is not 0, so the first step turns the rewrite on
    logits = torch.func.functional_call(model, params, (inputs,))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert untrained.rewrite_gain.grad.abs() > 0


def _relative_error(a, b):
    return float((a - b).norm() / a.norm())


def test_every_zoo_family_is_covered():
    assert {family for family, _, _ in ZOO_CASES} == set(zoo.FAMILIES)


@pytest.mark.parametrize("key", [key for _, key in CASES], ids=[name for name, _ in CASES])
def test_keeps_shapes_and_structure_and_is_near_identity(metanet, key):
    model, inputs = _case(key)
    graph = to_graph(model, inputs)
    data = graph.data
    with torch.no_grad():
        new_x, new_edge_attr, keep = metanet(data, speedup=2.0)
    assert new_x.shape == data.x.shape and new_x.dtype == data.x.dtype
    assert new_edge_attr.shape == data.edge_attr.shape
    assert keep.shape == (len(graph.layers),)
    assert bool(((keep > 0) & (keep <= 1)).all())
    # structural columns and slots that hold no parameter never change
    assert torch.equal(new_x[:, SLOTS:], data.x[:, SLOTS:])
    slots_free = ~data.x_param_mask
    assert torch.equal(new_x[:, :SLOTS][slots_free], data.x[:, :SLOTS][slots_free])
    # the untrained rewrite is a small, real change
    assert not torch.equal(new_edge_attr, data.edge_attr)
    rewritten = graph.write_back(new_x, new_edge_attr)
    with torch.no_grad():
        before, after = model(*inputs), rewritten(*inputs)
    error = _relative_error(before, after)
    assert 0 < error < 1e-2, (type(model).__name__, error)


def test_channel_gates_scale_whole_channels_and_spare_the_outputs():
    torch.manual_seed(0)
    gated = MetaNetwork(hidden=8, num_layers=1, residual_scale=1e-6, gate_range=3.0).eval()
    with torch.no_grad():
        gated.gate_decoder[-1].bias.fill_(-0.5)  # as if trained to fade every channel
    gain = float(torch.exp(3.0 * torch.tanh(torch.tensor(-0.5))))
    model, inputs = _zoo_model("mlp", (1, 40), {"hidden": [12]})
    graph = to_graph(model, inputs)
    with torch.no_grad():
        new_x, new_edge_attr, _ = gated(graph.data)
        rewritten = graph.write_back(new_x, new_edge_attr)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        # ReLU is positively homogeneous: the hidden channels' gate scales the logits' input
        expected = gain * (model(*inputs) - head.bias) + head.bias
        assert torch.allclose(rewritten(*inputs), expected, rtol=1e-4, atol=1e-5)
    # the model's output channels keep their bias
    output = graph.data.x[:, SCALAR["is_output"]] > 0
    assert torch.allclose(new_x[output, 0], graph.data.x[output, 0], atol=1e-6)
    # an untrained gate is exactly 1: the default metanetwork rewrites as without gates
    plain = MetaNetwork(hidden=8, num_layers=1, gate_range=3.0).eval()
    with torch.no_grad():
        assert torch.allclose(plain.gate_decoder(torch.randn(3, 8)), torch.zeros(3, 1))


def _relative_changes(metanet, model, inputs):
    graph = to_graph(model, inputs)
    with torch.no_grad():
        new_x, new_edge_attr, _ = metanet(graph.data)
    before, after = graph.parameters(), graph.parameters(new_x, new_edge_attr)
    return {name: float((after[name] - before[name]).norm() / before[name].norm())
            for name in before if before[name].dim() > 1}


def test_deltas_follow_each_layers_own_scale(metanet):
    model, inputs = build("vgg_flatten")
    reference = _relative_changes(metanet, model, inputs)
    name = next(iter(reference))
    with torch.no_grad():
        model.get_parameter(name).mul_(1000.0)  # one layer 1000x larger than the others
    scaled = _relative_changes(metanet, model, inputs)
    assert 0.1 < scaled[name] / reference[name] < 10  # not 1000x smaller
    assert all(0 < change < 1e-2 for change in scaled.values())


def test_float64_models_keep_their_precision(metanet):
    model, inputs = build("text_cnn")
    model = model.double()
    with torch.no_grad():  # digits float32 cannot hold
        for parameter in model.parameters():
            parameter.add_(torch.rand_like(parameter) * 1e-10)
    graph = to_graph(model, inputs)
    with torch.no_grad():
        new_x, new_edge_attr, _ = metanet(graph.data)
    assert new_x.dtype == new_edge_attr.dtype == torch.float64
    untouched = ~graph.data.x_param_mask
    assert torch.equal(new_x[:, :SLOTS][untouched], graph.data.x[:, :SLOTS][untouched])
    # the (float32) deltas are added in float64: old digits are not rounded away
    delta = new_edge_attr - graph.data.edge_attr
    assert (delta - delta.float().double()).abs().max() < 1e-12


def test_batched_graphs_give_each_graph_its_own_answer(metanet):
    graphs = [to_graph(*build("text_cnn")), to_graph(*build("vgg_flatten"))]
    batch = Batch.from_data_list([g.data for g in graphs])
    with torch.no_grad():
        new_x, new_edge_attr, keep = metanet(batch, speedup=torch.tensor([2.0, 4.0]))
        alone = [metanet(g.data, speedup=s) for g, s in zip(graphs, (2.0, 4.0))]
    torch.testing.assert_close(new_x, torch.cat([a[0] for a in alone]))
    torch.testing.assert_close(new_edge_attr, torch.cat([a[1] for a in alone]))
    torch.testing.assert_close(keep, torch.cat([a[2] for a in alone]))


def test_sparsity_head_follows_the_speedup(metanet):
    graph = to_graph(*build("vgg_flatten"))
    with torch.no_grad():
        mild = metanet(graph.data, speedup=1.5)[2]
        strong = metanet(graph.data, speedup=4.0)[2]
    assert bool((strong < mild).all())
    with pytest.raises(ValueError, match="speedup"):
        metanet(graph.data, speedup=0.5)


def test_task_loss_gradients_reach_the_metanetwork():
    torch.manual_seed(0)
    metanet = _rewriting(MetaNetwork(hidden=16, num_layers=2))
    model, (inputs,) = _zoo_model(*ZOO_CASES[1])
    graph = to_graph(model, (inputs,))
    labels = torch.tensor([0, 1])
    params = metanet_parameters(metanet, graph, speedup=2.0)
    assert set(params) == set(graph.feature_parameters)
    logits = torch.func.functional_call(model, params, (inputs,))
    F.cross_entropy(logits, labels).backward()
    grads = {name: p.grad for name, p in metanet.named_parameters()}
    assert grads["edge_decoder.out.1.weight"].abs().sum() > 0
    assert grads["node_decoder.2.weight"].abs().sum() > 0
    assert grads["edge_encoder.entry.0.weight"].abs().sum() > 0  # through message passing
    assert grads["blocks.0.forward_messages.message_mlp.0.weight"].abs().sum() > 0


def test_group_sparsity_is_differentiable_and_shrinks_with_the_groups():
    model, inputs = build("resnet20")
    graph = to_graph(model, inputs)
    regularizer = GroupSparsity(graph)
    x = graph.data.x.clone().requires_grad_()
    edge_attr = graph.data.edge_attr.clone().requires_grad_()
    norms = regularizer.group_norms(x, edge_attr)
    # ResNet-20: each block's first conv channel is its own group (3 blocks per stage of 16,
    # 32, 64), each channel of a stage's residual stream one more; input/output are left out
    assert regularizer.num_groups == 3 * (16 + 32 + 64) + (16 + 32 + 64)
    assert bool((norms > 0).all())
    loss = regularizer(x, edge_attr)
    loss.backward()
    assert edge_attr.grad.abs().sum() > 0
    assert x.grad[:, :SLOTS].abs().sum() > 0
    assert x.grad[:, SLOTS:].abs().sum() == 0  # structure carries no parameter
    with torch.no_grad():
        shrunk = regularizer(x * 0.5, edge_attr * 0.5)
    assert shrunk < loss
    # a gradient step on the regulariser alone lowers it
    with torch.no_grad():
        stepped = regularizer(x - 0.01 * x.grad, edge_attr - 0.01 * edge_attr.grad)
    assert stepped < loss


def test_dropping_groups_acts_like_removing_their_channels():
    model, inputs = _zoo_model("mlp", (1, 40), {"hidden": [12, 6]})
    graph = to_graph(model, inputs)
    regularizer = GroupSparsity(graph)
    norms = regularizer.group_norms(graph.data.x, graph.data.edge_attr)
    dropped = regularizer.weakest_groups(norms, 0.34)
    # per hidden layer, floor(0.34 * width) groups: 4 of 12 and 2 of 6
    assert int(dropped.sum()) == 4 + 2
    x, edge_attr = regularizer.drop_groups(graph.data.x, graph.data.edge_attr, ~dropped)
    masked = graph.write_back(x, edge_attr)
    # the same channels zeroed by hand: the weakest rows of each hidden layer by group norm
    by_hand = graph.write_back()
    linears = [m for m in by_hand.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, after, count in ((linears[0], linears[1], 4), (linears[1], linears[2], 2)):
            outgoing = after.weight.square().sum(0)
            group_norm = (layer.weight.square().sum(1) + layer.bias.square() + outgoing).sqrt()
            weakest = torch.argsort(group_norm)[:count]
            layer.weight[weakest] = 0
            layer.bias[weakest] = 0
            after.weight[:, weakest] = 0
    assert torch.allclose(masked(*inputs), by_hand(*inputs), atol=1e-6)
    assert not torch.allclose(masked(*inputs), model(*inputs), atol=1e-3)
    # nothing dropped: the features are unchanged
    same = regularizer.drop_groups(graph.data.x, graph.data.edge_attr,
                                   torch.ones_like(dropped))
    assert torch.equal(same[0], graph.data.x) and torch.equal(same[1], graph.data.edge_attr)


def test_keep_gates_are_hard_forward_and_soft_backward():
    model, inputs = _zoo_model("mlp", (1, 40), {"hidden": [12, 6]})
    graph = to_graph(model, inputs)
    regularizer = GroupSparsity(graph)
    norms = regularizer.group_norms(graph.data.x, graph.data.edge_attr).requires_grad_()
    gates = regularizer.keep_gates(norms, 0.34)
    hard = (~regularizer.weakest_groups(norms, 0.34)).float()
    assert torch.allclose(gates.detach(), hard, atol=1e-6)
    # the gradient of the kept count rewards raising the norms nearest the threshold
    gates.sum().backward()
    assert bool((norms.grad >= 0).all()) and norms.grad.sum() > 0


def test_save_load_gives_identical_outputs(tmp_path, metanet):
    path = save_metanet(metanet, tmp_path / "metanet.safetensors", training={"steps": 0})
    document = json.loads((tmp_path / "metanet.json").read_text())
    assert document["config"]["hidden"] == 16 and document["training"] == {"steps": 0}
    assert document["num_parameters"] == metanet.num_parameters
    loaded = load_metanet(path)
    assert isinstance(loaded, LoadedMetanet)
    model, inputs = build("text_cnn")
    graph = to_graph(model, inputs)
    with torch.no_grad():
        expected = metanet(graph.data)
        got = loaded.metanet(graph.data)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = loaded.transform(model, inputs)
    for key, value in model.state_dict().items():  # the input is untouched
        assert torch.equal(value, state[key])
    reference = graph.write_back(expected[0], expected[1])
    for key, value in reference.state_dict().items():
        assert torch.equal(rewritten.state_dict()[key], value), key


def test_bad_checkpoints_are_model_format_errors(tmp_path, metanet):
    good = save_metanet(metanet, tmp_path / "good.safetensors")
    config = json.loads((tmp_path / "good.json").read_text())

    def variant(name, weights: bytes, document):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(weights)
        text = document if isinstance(document, str) else json.dumps(document)
        (tmp_path / f"{name}.json").write_text(text)
        return path

    weights = good.read_bytes()
    pickled = tmp_path / "pickle.safetensors"
    torch.save(metanet.state_dict(), pickled)  # a pickle under a safetensors name
    (tmp_path / "pickle.json").write_text(json.dumps(config))
    cases = {
        variant("truncated", weights[: len(weights) // 2], config): "safetensors",
        variant("garbage", b"\x00" * 64, config): "safetensors",
        pickled: "safetensors",
        variant("not_json", weights, "{"): "not JSON",
        variant("wrong_format", weights, {**config, "format": "other"}): "not a metanetwork",
        variant("future", weights, {**config, "version": 99}): "version",
        variant("extra_key", weights, {**config, "config": {**config["config"], "x": 1}}):
            "must have the keys",
        variant("huge_width", weights, {**config, "config": {**config["config"],
                                                             "hidden": 10**9}}): "hidden",
        variant("bad_aggr", weights, {**config, "config": {**config["config"],
                                                           "aggregations": ["eval"]}}):
            "aggregations",
        variant("mismatch", weights, {**config, "config": {**config["config"], "hidden": 8}}):
            "expected",
    }
    (tmp_path / "no_config.safetensors").write_bytes(weights)
    cases[tmp_path / "no_config.safetensors"] = "no config"
    for path, words in cases.items():
        with pytest.raises(ModelFormatError, match=words):
            load_metanet(path)
    # a missing file is no format problem: the message names the classic criteria instead
    with pytest.raises(MetaPruneError, match="does not exist.*classic criterion"):
        load_metanet(tmp_path / "missing.safetensors")
    nan_state = {k: v.clone() for k, v in metanet.state_dict().items()}
    next(iter(nan_state.values())).fill_(float("nan"))
    broken = MetaNetwork(**metanet.config)
    broken.load_state_dict(nan_state)
    with pytest.raises(ModelFormatError, match="NaN"):
        load_metanet(save_metanet(broken, tmp_path / "nan.safetensors"))


def test_keep_ratios_are_a_policy_the_engine_accepts(metanet):
    from metaprune.pruning.allocation import policy_to_groups
    from metaprune.pruning.groups import build_dependency_graph, collect_groups, output_layers

    loaded = LoadedMetanet(metanet)
    for case in (ZOO_CASES[4], ZOO_CASES[5], ZOO_CASES[7]):  # resnet, mobilenetv2, vit
        model, inputs = _zoo_model(*case)
        policy = loaded.layer_keep_ratios(model, inputs, speedup=3.0)
        assert model.training is False  # the tracing for groups leaves modes as they were
        names = dict(model.named_modules())
        assert policy and all(0 < ratio <= 1 for ratio in policy.values())
        DG = build_dependency_graph(model, inputs)
        groups = collect_groups(DG, output_layers(DG))
        ratios = policy_to_groups(policy, groups, set(names))  # raises on anything impossible
        assert min(ratios) < 1.0
        assert loaded.layer_keep_ratios(model, inputs, params_ratio=0.5).keys() == policy.keys()


def test_policy_targets_index_the_head_outputs(metanet):
    model, inputs = _zoo_model(*ZOO_CASES[1])
    graph = to_graph(model, inputs)
    conv = next(layer.name for layer in graph.layers if layer.kind == "conv")
    index, target = policy_targets(graph, {conv: 0.25, "not_a_layer": 0.5})
    assert [graph.layers[i].name for i in index.tolist()] == [conv]
    assert target.tolist() == [0.25]
    keep = metanet(graph.data, speedup=2.0)[2]
    F.mse_loss(keep[index], target).backward()
    assert metanet.sparsity_head[0].weight.grad.abs().sum() > 0
    metanet.zero_grad()


@pytest.mark.usefixtures("one_torch_thread")  # the allocation choice: many tiny passes
def test_prune_runs_through_the_metanet_seam(tmp_path):
    from metaprune.pruning import prune

    torch.manual_seed(0)
    path = save_metanet(MetaNetwork(hidden=8, num_layers=1), tmp_path / "untrained.safetensors")
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10, widths=[16, 16])
    model = zoo.build("cnn1d", config)
    result = prune(model, zoo.example_inputs(config), method="metanet", metanet=str(path),
                   data="mnist1d", speedup=2.0, finetune_epochs=3)
    report = result.report
    # an untrained sparsity head is not asked: the choice runs over the non-learned candidates
    assert report["method"] == "metanet" and report["allocation"] == "metanet"
    assert {c["source"] for c in report["metanet"]["allocation_choice"]["candidates"]} <= {
        "uniform", "measured"}
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02
    # by default the whole budget of 3 epochs follows pruning
    assert report["finetune"]["epochs_after_metanet"] == 0
    assert report["finetune"]["epochs_after_prune"] == 3
    assert "metanet" in report["seconds"]


@pytest.mark.usefixtures("one_torch_thread")  # the allocation choice: many tiny passes
def test_a_trained_sparsity_head_allocates_and_the_split_is_configurable(tmp_path):
    from metaprune.pruning import prune

    torch.manual_seed(0)
    path = save_metanet(MetaNetwork(hidden=8, num_layers=1), tmp_path / "head.safetensors",
                        training={"sparsity_head_trained": True})
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10, widths=[16, 16])
    model = zoo.build("cnn1d", config)
    result = prune(model, zoo.example_inputs(config), method="metanet", metanet=str(path),
                   data="mnist1d", speedup=2.0, finetune_epochs=1,
                   finetune={"metanet_epochs": 1})
    report = result.report
    assert report["allocation"] == "metanet"
    assert report["finetune"]["epochs_after_metanet"] == 1
    assert report["finetune"]["epochs_after_prune"] == 0
    with pytest.raises(InvalidTargetError, match="exceeds finetune_epochs"):
        prune(model, zoo.example_inputs(config), method="metanet", metanet=str(path),
              data="mnist1d", speedup=2.0, finetune_epochs=1, finetune={"metanet_epochs": 2})


def test_load_metanet_is_the_one_public_entry_point(tmp_path, metanet):
    import metaprune

    loaded = metaprune.load_metanet("default")  # the committed checkpoint, by name
    assert isinstance(loaded, LoadedMetanet) and loaded.head_trained
    # saved before the rewrite gain existed: loaded at gain 1, computing what it always did
    assert float(loaded.metanet.rewrite_gain) == 1.0 and not loaded.rewrites_weights
    assert metaprune.load_metanet(loaded) is loaded  # a loaded one passes through
    path = save_metanet(metanet, tmp_path / "mine.safetensors")
    mine = metaprune.load_metanet(str(path))  # a path
    model, inputs = _zoo_model(*ZOO_CASES[1])
    rewritten = mine.transform(model, inputs)
    assert rewritten is not model
    assert set(mine.layer_keep_ratios(rewritten, inputs, speedup=2.0)) <= \
        {name for name, _ in model.named_modules()}
    with pytest.raises(MetaPruneError, match="does not exist"):
        metaprune.load_metanet("no-such-metanet")
