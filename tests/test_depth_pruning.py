"""Depth pruning: residual branches emptied to 0 channels, exactly, and saved like any model."""

import copy

import pytest
import torch
from torch import nn

from metaprune import zoo
from metaprune.errors import ModelFormatError
from metaprune.formats import load_model, save_model
from metaprune.measure import count_macs
from metaprune.pruning.depth import check_connected, mark_emptiable
from metaprune.pruning.empty_layers import EmptyConv, collapse_empty_layers
from metaprune.pruning.graph_groups import plan_channel_groups
from metaprune.pruning.removal import remove_channels


def _resnet(random_statistics: bool = True):
    """A ResNet-14 (2 blocks per stage), by default with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    config = zoo.default_config("resnet", input_shape=(3, 16, 16), num_classes=10, depth=14,
                                stage_widths=[8, 16, 16])
    model = zoo.build("resnet", config).eval()
    for module in model.modules() if random_statistics else ():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.bias.data.uniform_(-0.5, 0.5)
    return model, (torch.randn(2, 3, 16, 16),)


def _plan(model, inputs):
    _, groups = plan_channel_groups(model, inputs)
    return groups, [torch.arange(g.size) for g in groups]


def test_only_residual_branches_may_be_emptied():
    model, inputs = _resnet()
    groups, orders = _plan(model, inputs)
    mark_emptiable(groups, model, inputs, orders)
    emptiable = sorted(g.root for g in groups if g.emptiable)
    # every block's inner width; never a residual stream (the stem's, a shortcut's) nor fc
    assert emptiable == [f"stages.{s}.{b}.conv1" for s in range(3) for b in range(2)]

    torch.manual_seed(0)
    chain = zoo.build("vgg", zoo.default_config("vgg", input_shape=(1, 16, 16), num_classes=4,
                                                stages=[[8], [8]], hidden=[16]))
    chain_inputs = (torch.randn(2, 1, 16, 16),)
    groups, orders = _plan(chain, chain_inputs)
    assert mark_emptiable(groups, chain, chain_inputs, orders) == 0
    assert not any(g.emptiable for g in groups)


def test_an_emptied_branch_is_exact_cheaper_and_round_trips(tmp_path):
    model, inputs = _resnet()
    groups, orders = _plan(model, inputs)
    index = next(i for i, g in enumerate(groups) if g.root == "stages.1.0.conv1")  # stride 2
    counts = [groups[index].size if i == index else 0 for i in range(len(groups))]
    pruned = remove_channels(model, inputs, groups, orders, counts).eval()
    block = pruned.stages[1][0]
    assert isinstance(block.conv1, EmptyConv) and isinstance(block.conv2, EmptyConv)
    assert isinstance(block.bn1, nn.Identity)

    # the same model with the branch's consumer reading nothing: conv2's weights zeroed
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.stages[1][0].conv2.weight.zero_()
    with torch.no_grad():
        expected = reference(*inputs)
        assert torch.allclose(pruned(*inputs), expected, atol=1e-6, rtol=0)
    assert count_macs(pruned, inputs) < count_macs(model, inputs)
    check_connected(pruned, inputs)

    for suffix in ("safetensors", "pt2"):
        path = tmp_path / f"pruned.{suffix}"
        save_model(pruned, inputs, path)
        loaded, _ = load_model(path)
        with torch.no_grad():
            assert torch.allclose(loaded(*inputs), expected, atol=1e-6, rtol=0), suffix
    assert zoo.config_of("resnet", pruned)["block_widths"][1][0] == 0


@pytest.mark.parametrize("stride, bias", [(1, False), (2, True)])
def test_a_convolution_without_input_channels_gives_its_bias_everywhere(stride, bias):
    # a real convolution whose only input channel reads zeros computes the same thing
    real = nn.Conv2d(1, 4, 3, stride=stride, padding=1, bias=bias)
    with torch.no_grad():
        real.weight.zero_()
    empty = collapse_empty_layers(nn.Sequential(nn.Conv2d(0, 4, 3, stride=stride, padding=1,
                                                          bias=bias)))
    with torch.no_grad():
        if bias:
            empty[0].bias.copy_(real.bias)
        x = torch.randn(2, 1, 9, 9)
        assert torch.equal(empty(x[:, :0]), real(x))
    assert isinstance(empty[0], EmptyConv)


def test_the_latency_allocation_empties_only_emptiable_groups():
    from test_latency import _mlp_latency_model

    from metaprune.pruning.latency_cost import latency_allocation

    times = {"0": lambda i, o: 4.0 * i * o, "2": lambda i, o: 1.0 * i * o,
             "4": lambda i, o: 0.1 * i * o}
    groups, latency = _mlp_latency_model(times)
    keys = [torch.linspace(0.5, 1.5, g.size, dtype=torch.float64) for g in groups]
    free = [i for i, g in enumerate(groups) if not g.blocked]
    plain = latency_allocation(groups, keys, latency)
    assert all(c < groups[i].size for i, c in enumerate(plain.counts(plain.high)))
    groups[free[0]].emptiable = True  # the allocator's rule, whatever the model would allow
    depth = latency_allocation(groups, keys, latency)
    final = depth.counts(depth.high)
    assert final[free[0]] == groups[free[0]].size
    assert all(final[i] <= depth.max_removed[i] for i in free[1:])


@pytest.mark.parametrize("random_statistics", [False, True])
def test_prune_with_latency_depth_meets_a_macs_target(tmp_path, random_statistics):
    from metaprune import prune

    model, inputs = _resnet(random_statistics)
    result = prune(model, inputs, speedup=3.0, allocation="latency-depth", latency=False)
    assert abs(result.report["speedup"] / 3.0 - 1) <= 0.02
    emptied = [name for name, (kept, _total) in result.report["kept"].items() if kept == 0]
    assert all(name.endswith("conv1") for name in emptied)  # only residual branches
    # where emptied blocks left the outputs constant (random BatchNorm statistics and a
    # narrowed stream can: every ReLU after them clamps), it pruned again without emptying
    # and the report's allocation says "latency"
    assert result.report["allocation"] in ("latency-depth", "latency")
    assert not emptied or result.report["allocation"] == "latency-depth"
    if emptied:  # emptied groups never cut the model (without them, the latency tables of
        # this machine decide how far the stream narrows, and random statistics can clamp it)
        check_connected(result.model, inputs)
    save_model(result.model, inputs, tmp_path / "pruned.safetensors")
    loaded, _ = load_model(tmp_path / "pruned.safetensors")
    with torch.no_grad():
        assert torch.allclose(loaded(*inputs), result.model.eval()(*inputs), atol=1e-6)


# per family, a small config and the groups to empty: every MLP of a ViT, the inverted
# residuals of a MobileNetV2 (not the strided block, which has no skip), a DenseNet layer's
# bottleneck and growth together and another layer's growth alone
_EMPTIED_FAMILIES = {
    "vit": ({"input_shape": [1, 16, 16], "patch_size": 4, "embed_dim": 16,
             "blocks": [{"heads": 2, "mlp": 32}] * 2},
            ["blocks.0.fc1", "blocks.1.fc1"], ("blocks", 1, "mlp")),
    "mobilenetv2": ({"input_shape": [3, 16, 16], "stem_width": 8, "last_width": 16,
                     "blocks": [{"hidden": 16, "out": 8}, {"hidden": 16, "out": 8},
                                {"hidden": 16, "out": 16, "stride": 2}]},
                    ["blocks.0.depthwise.conv", "blocks.1.depthwise.conv"],
                    ("blocks", 1, "hidden")),
    "densenet": ({"input_shape": [1, 16, 16], "stem_width": 8, "transitions": [8],
                  "blocks": [[{"width": 8, "growth": 4}] * 2] * 2},
                 ["features.0.0.conv1", "features.0.0.conv2", "features.2.1.conv2"],
                 ("blocks", 1, 1, "growth")),
}


@pytest.mark.parametrize("family", sorted(_EMPTIED_FAMILIES))
def test_emptied_branches_round_trip_through_safetensors(tmp_path, family):
    config, roots, emptied_key = _EMPTIED_FAMILIES[family]
    torch.manual_seed(0)
    model = zoo.build(family, zoo.default_config(family, num_classes=4, **config)).eval()
    inputs = (torch.randn(2, *config["input_shape"]),)
    groups, orders = _plan(model, inputs)
    assert set(roots) <= {g.root for g in groups}
    counts = [g.size if g.root in roots else 0 for g in groups]
    pruned = remove_channels(model, inputs, groups, orders, counts).eval()
    check_connected(pruned, inputs)

    save_model(pruned, inputs, tmp_path / "pruned.safetensors")
    loaded, _ = load_model(tmp_path / "pruned.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), pruned(*inputs))
    value = zoo.config_of(family, loaded)
    for key in emptied_key:
        value = value[key]
    assert value == 0


def test_a_width_the_config_cannot_state_names_the_key_and_pt2(tmp_path):
    # the strided block has no skip: emptied (never by depth pruning, which checks the output
    # still depends on the input) its config width 0 is refused, and saving says what to use
    config, _roots, _key = _EMPTIED_FAMILIES["mobilenetv2"]
    model = zoo.build("mobilenetv2", zoo.default_config("mobilenetv2", num_classes=4, **config))
    inputs = (torch.randn(2, *config["input_shape"]),)
    groups, orders = _plan(model, inputs)
    counts = [g.size if g.root == "blocks.2.depthwise.conv" else 0 for g in groups]
    pruned = remove_channels(model, inputs, groups, orders, counts).eval()
    with pytest.raises(ModelFormatError, match=r"'blocks'\[2\]\.hidden .* got 0; save this "
                                               r"model as \.pt2 instead"):
        save_model(pruned, inputs, tmp_path / "pruned.safetensors")
