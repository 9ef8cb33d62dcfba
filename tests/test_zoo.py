"""metaprune.zoo: every family builds, exports with a dynamic batch, round-trips its config, and
rebuilds exactly from `config_of` after real structural pruning with torch-pruning."""

import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

from metaprune import zoo
from metaprune.cli.main import main as cli_main
from metaprune.errors import ModelFormatError

# (family, input_shape, overrides): tiny configs covering each family's input kinds and options.
CASES = [
    ("mlp", (1, 40), {"hidden": [16, 12]}),
    ("mlp", (1, 8, 8), {"residual": True, "width": 16, "hidden": [24, 20]}),
    ("cnn1d", (1, 40), {"widths": [8, 12, 16]}),
    ("cnn1d", (2, 40), {"widths": [8, 12], "head": "flatten", "hidden": [16]}),
    ("vgg", (1, 28, 28), {"stages": [[8], [12, 12]], "hidden": [16]}),
    ("resnet", (1, 40), {"stage_widths": [8, 12, 16]}),
    ("resnet", (3, 16, 16), {"stage_widths": [8, 12, 16]}),
    ("mobilenetv2", (3, 16, 16), {
        "stem_width": 8, "last_width": 32,
        "blocks": [{"hidden": 16, "out": 8}, {"hidden": 24, "out": 12, "stride": 2},
                   {"hidden": 36, "out": 12}, {"hidden": 36, "out": 16}],
    }),
    ("densenet", (1, 16, 16), {
        "stem_width": 8,
        "blocks": [[{"width": 16, "growth": 4}] * 2, [{"width": 16, "growth": 6}] * 2],
    }),
    ("vit", (1, 40), {"embed_dim": 16, "blocks": [{"heads": 2, "mlp": 32}] * 2}),
    ("vit", (3, 16, 16), {"embed_dim": 16, "blocks": [{"heads": 4, "mlp": 24}], "pool": "mean"}),
]
IDS = [f"{family}-{'x'.join(map(str, shape))}-{i}" for i, (family, shape, _) in enumerate(CASES)]


def make(family, input_shape, overrides, seed=0):
    torch.manual_seed(seed)
    config = zoo.default_config(family, input_shape=input_shape, num_classes=5, **overrides)
    model = zoo.build(family, config).eval()
    # Non-trivial BN statistics, so a wrongly wired norm layer changes the outputs.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return config, model


def test_families_are_the_design_ids():
    assert zoo.FAMILIES == ("mlp", "cnn1d", "vgg", "resnet", "mobilenetv2", "densenet", "vit")


# The datasets' input kinds each family accepts: MNIST-1D, Fashion-MNIST, CIFAR-10.
INPUT_KINDS = {
    "mlp": [(1, 40), (1, 28, 28), (3, 32, 32)],
    "cnn1d": [(1, 40)],
    "vgg": [(1, 28, 28), (3, 32, 32)],
    "resnet": [(1, 40), (1, 28, 28), (3, 32, 32)],
    "mobilenetv2": [(1, 28, 28), (3, 32, 32)],
    "densenet": [(1, 28, 28), (3, 32, 32)],
    "vit": [(1, 40), (1, 28, 28), (3, 32, 32)],
}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_default_configs_build_and_run_on_every_input_kind(family):
    for input_shape in INPUT_KINDS[family]:
        config = zoo.default_config(family, input_shape=input_shape, num_classes=10)
        assert json.loads(json.dumps(config)) == config
        model = zoo.build(family, config).eval()
        with torch.no_grad():
            assert model(torch.randn(2, *input_shape)).shape == (2, 10)


@pytest.mark.parametrize(("family", "input_shape", "overrides"), CASES, ids=IDS)
def test_build_forward_export_and_config_round_trip(family, input_shape, overrides):
    config, model = make(family, input_shape, overrides)
    x = torch.randn(3, *input_shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 5)

    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    other = torch.randn(7, *input_shape)  # a batch size the export never saw
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other))

    # The config survives JSON, and rebuilding from it takes the same weights exactly.
    assert zoo.config_of(family, model) == config
    again = zoo.build(family, json.loads(json.dumps(config)))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), out, rtol=0, atol=0)


def prune_unevenly(model, example):
    """Remove channels with torch-pruning, a different fraction per layer (10 % to 40 %)."""
    output_layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    layers = [
        m for m in model.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m is not output_layer
    ]
    attention = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    tokens = [(p, 2) for name, p in model.named_parameters() if name in ("pos_embed", "cls_token")]
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio_dict={layer: 0.1 + 0.1 * (i % 4) for i, layer in enumerate(layers)},
        ignored_layers=[output_layer],
        num_heads=attention,
        unwrapped_parameters=tokens,
    )
    pruner.step()


@pytest.mark.parametrize(("family", "input_shape", "overrides"), CASES, ids=IDS)
def test_config_of_rebuilds_a_structurally_pruned_model(family, input_shape, overrides):
    config, model = make(family, input_shape, overrides)
    x = torch.randn(4, *input_shape)
    params_before = sum(p.numel() for p in model.parameters())
    prune_unevenly(model, x)
    assert sum(p.numel() for p in model.parameters()) < params_before

    pruned_config = zoo.config_of(family, model)
    assert pruned_config != config
    rebuilt = zoo.build(family, json.loads(json.dumps(pruned_config)))
    rebuilt.load_state_dict(model.state_dict())  # strict: every shape must match
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)


def test_pruning_keeps_mobilenet_skip_connections_as_they_were():
    # 12 → 16 has no skip; pruning both widths to the same number must not create one.
    overrides = dict(CASES[7][2])
    config, model = make("mobilenetv2", (3, 16, 16), overrides)
    model.blocks[3].project.conv.out_channels = 12  # what a pruner leaves: equal widths
    read = zoo.config_of("mobilenetv2", model)
    assert [block["residual"] for block in read["blocks"]] == [True, False, True, False]


@pytest.mark.parametrize(("depth", "blocks"), [(20, 3), (32, 5), (56, 9)])
def test_resnet_layouts(depth, blocks):
    model = zoo.build("resnet", {"input_shape": [3, 32, 32], "depth": depth})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three_by_three = [m for m in convs if m.kernel_size == (3, 3)]
    projections = [m for m in convs if m.kernel_size == (1, 1)]
    # depth counts the stem, 2 convs per block and the classifier.
    assert len(three_by_three) + 1 == depth
    assert len(projections) == 2  # where stages 2 and 3 change width and resolution
    assert [len(stage) for stage in model.stages] == [blocks] * 3


def test_resnet_scales_to_resnet50_size():
    config = zoo.default_config(
        "resnet", input_shape=(3, 32, 32), num_classes=10, stage_widths=[160, 320, 640]
    )
    with torch.device("meta"):
        params = sum(p.numel() for p in zoo.build("resnet", config).parameters())
    assert 20e6 < params < 30e6


def test_missing_keys_take_defaults_that_follow_other_keys():
    config = zoo.default_config("resnet", input_shape=(1, 40), num_classes=10, depth=32)
    assert config["dims"] == 1
    assert config["block_widths"] == [[16] * 5, [32] * 5, [64] * 5]
    model = zoo.build("resnet", {"input_shape": [1, 40], "depth": 32})
    assert zoo.config_of("resnet", model) == config


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("alexnet", {}, "unknown zoo family 'alexnet'"),
        ("cnn1d", {"widht": [8]}, "unknown config keys ['widht']"),
        ("cnn1d", {"widths": [8, -4]}, "'widths'[1] must be an integer in [1, 65536], got -4"),
        ("cnn1d", {"widths": [8.0]}, "'widths'[0] must be an integer"),
        ("vgg", {"hidden": [True]}, "'hidden'[0] must be an integer"),
        ("mlp", {"hidden": [10**9]}, "must be an integer in [1, 65536]"),
        ("mlp", {"hidden": [65536, 65536]}, "parameters, more than the limit of 100,000,000"),
        ("resnet", {"depth": 21}, "must be 6n + 2"),
        ("resnet", {"dims": 1}, "'dims' must match input_shape"),
        ("resnet", {"depth": 20, "block_widths": [[8], [8], [8]]}, "must have 3 entries"),
        ("cnn1d", {"input_shape": [1, 40, 40]}, "input_shape must have 2 entries"),
        ("vgg", {"input_shape": [3, 100000, 100000]}, "input_shape[1] must be an integer"),
        ("cnn1d", {"kernel_sizes": [4, 5, 5]}, "must be odd"),
        ("vit", {"embed_dim": 30, "blocks": [{"heads": 4}]}, "must divide embed_dim 30"),
        ("vit", {"blocks": [{"heads": 2, "ffn": 8}]}, "unknown keys ['ffn']"),
        ("mobilenetv2", {"blocks": [{"out": 8, "stride": 2, "residual": True}]}, "residual"),
        # an emptied branch (hidden 0) only where the skip still carries the input
        ("mobilenetv2", {"blocks": [{"hidden": 0, "out": 8, "stride": 2}]},
         "'blocks'[0].hidden must be an integer in [1, 65536], got 0"),
        ("densenet", {"transitions": [4]}, "'transitions' must have 2 entries"),
        ("mlp", {"hidden": list(range(1, 30_000))}, "more than 20000 values"),
        # 30 k parameters, but 32-channel 1024×1024 feature maps: refused before allocating.
        ("resnet", {"input_shape": [3, 1024, 1024], "depth": 8, "stage_widths": [32, 32, 32]},
         "feature map per sample"),
        ("vit", {"input_shape": [1, 65536], "patch_size": 1}, "65536 tokens, more than 4096"),
    ],
)
def test_invalid_configs_raise_model_format_error(family, config, message):
    with pytest.raises(ModelFormatError) as raised:
        zoo.build(family, config)
    assert message in str(raised.value)


def test_config_of_refuses_a_module_of_another_family():
    with pytest.raises(ModelFormatError, match="expected a ResNet, got MLP"):
        zoo.config_of("resnet", zoo.build("mlp", {}))
    assert zoo.family_of(zoo.build("mlp", {})) == "mlp"
    assert zoo.family_of(nn.Linear(2, 2)) is None


def test_cli_zoo_list_and_show(capsys):
    assert cli_main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    for family in zoo.FAMILIES:
        assert family in listing
    assert "stage_widths" in listing

    show = ["zoo", "show", "cnn1d", "--input-shape", "1", "40", "--set", "widths=[8,16]"]
    assert cli_main(show) == 0
    shown = capsys.readouterr().out
    spec = json.loads(shown[: shown.index("params:")])
    assert spec["config"]["widths"] == [8, 16]
    assert "MACs:" in shown

    assert cli_main(["zoo", "show", "alexnet"]) == 2
    assert "unknown zoo family" in capsys.readouterr().err
