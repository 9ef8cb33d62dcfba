"""The committed metanetwork: small, safe to load, trained, and what `method="metanet"` uses."""

import pytest
import torch

from metaprune import zoo
from metaprune.errors import MetaPruneError
from metaprune.metanet import load_metanet
from metaprune.pruning import prune
from metaprune.pruning.metanet_bridge import default_checkpoint

MAX_CHECKPOINT_BYTES = 5 * 2**20  # the budget for a committed checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    path = default_checkpoint()
    assert path is not None, "no metanetwork committed under metaprune/checkpoints/"
    return path


def test_the_committed_checkpoint_is_small_and_trained_on_the_corpus(checkpoint):
    assert checkpoint.stat().st_size <= MAX_CHECKPOINT_BYTES
    assert checkpoint.with_suffix(".json").stat().st_size < 64 * 2**10
    loaded = load_metanet(checkpoint)
    training = loaded.training_metadata
    assert training["step"] > 0 and training["workers"] >= 1
    config = training["config"]
    assert config["gate_range"] > 0 and config["prune_weight"] > 0
    assert loaded.head_trained and training["head_training"]["examples"] > 0


@pytest.mark.parametrize("family, overrides", [
    ("cnn1d", {"widths": [16, 24]}),
    ("resnet", {"depth": 8, "stage_widths": [8, 16, 16]}),  # residual streams: what broke
    ("mlp", {"hidden": [24, 16]}),
])
def test_the_shipped_rewrite_alone_never_changes_a_model(checkpoint, family, overrides):
    # The guard: on held-out models the trained rewrites cost up to 88 points (ResNets), so
    # the shipped checkpoint has its rewrite switched off; only its sparsity head allocates.
    config = zoo.default_config(family, input_shape=(1, 40), num_classes=10, **overrides)
    torch.manual_seed(0)
    model = zoo.build(family, config).eval()
    inputs = zoo.example_inputs(config, batch=4)
    loaded = load_metanet(checkpoint)
    rewritten = loaded.transform(model, inputs)
    for (name, before), after in zip(model.state_dict().items(),
                                     rewritten.state_dict().values()):
        assert torch.equal(before, after), name
    with torch.no_grad():
        assert torch.equal(rewritten(*inputs), model(*inputs))
    assert loaded.training_metadata["rewrite"].startswith("off")


@pytest.mark.usefixtures("one_torch_thread")  # the allocation choice: many tiny passes
def test_method_metanet_uses_the_committed_checkpoint_and_fine_tunes_after_pruning():
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10, widths=[16, 24])
    torch.manual_seed(0)
    model = zoo.build("cnn1d", config)
    inputs = zoo.example_inputs(config)
    with pytest.raises(MetaPruneError, match="needs data"):
        prune(model, inputs, method="metanet", speedup=2.0)
    report = prune(model, inputs, method="metanet", speedup=2.0, data="mnist1d",
                   finetune_epochs=2).report
    assert report["method"] == "metanet" and report["criterion"] == "l2"
    assert report["allocation"] == "metanet"  # the trained head's keep ratios, rescaled
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02
    # the shipped rewrite is off: nothing to fine-tune before pruning, the whole budget after
    assert report["finetune"]["epochs_after_metanet"] == 0
    assert report["finetune"]["epochs_after_prune"] == 2
