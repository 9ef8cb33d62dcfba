"""Checkpoint scopes: recorded without machine paths, discovered in a folder, matched to a model."""

import json
from pathlib import Path

import pytest

from metaprune.errors import MetaPruneError, ModelFormatError
from metaprune.metanet import (
    MetaNetwork,
    choose_checkpoint,
    discover_checkpoints,
    read_metanet,
    save_metanet,
)
from metaprune.pruning.metanet_bridge import CHECKPOINT_DIR


def _folder(tmp_path):
    metanet = MetaNetwork(hidden=4, num_layers=1, head_hidden=4)
    save_metanet(metanet, tmp_path / "universal.safetensors",
                 scope={"families": ["mlp", "resnet"], "datasets": ["mnist1d"],
                        "universal": True})
    save_metanet(metanet, tmp_path / "cnn.safetensors",
                 scope={"families": ["cnn1d"], "datasets": ["mnist1d"]})
    save_metanet(metanet, tmp_path / "cnn-fashion.safetensors",
                 scope={"families": ["cnn1d", "vgg"], "datasets": ["fashion-mnist"]})
    return discover_checkpoints(tmp_path)


def test_the_checkpoint_whose_scope_matches_family_and_dataset_wins(tmp_path):
    checkpoints = _folder(tmp_path)
    assert [c.name for c in checkpoints] == ["cnn", "cnn-fashion", "universal"]
    chosen, reason = choose_checkpoint(checkpoints, family="cnn1d", dataset="mnist1d")
    assert chosen.name == "cnn" and reason == "per-family checkpoint for cnn1d on mnist1d"
    chosen, _ = choose_checkpoint(checkpoints, family="cnn1d", dataset="fashion-mnist")
    assert chosen.name == "cnn-fashion"
    chosen, reason = choose_checkpoint(checkpoints, family="vgg", dataset="digits")
    assert chosen.name == "cnn-fashion" and "none for digits" in reason
    chosen, reason = choose_checkpoint(checkpoints, family="vit", dataset="mnist1d")
    assert chosen.name == "universal" and "no per-family checkpoint for vit" in reason
    chosen, reason = choose_checkpoint(checkpoints, family=None, dataset=None)
    assert chosen.name == "universal" and "not a zoo family" in reason
    with pytest.raises(MetaPruneError, match="none is universal"):
        choose_checkpoint([c for c in checkpoints if not c.universal], family="vit")


def test_a_saved_scope_and_training_record_carry_no_machine_path(tmp_path):
    path = save_metanet(MetaNetwork(hidden=4, num_layers=1, head_hidden=4),
                        tmp_path / "m.safetensors",
                        training={"corpus": "/home/someone/corpus", "runs": ["~/runs/a"],
                                  "steps": 3},
                        scope={"families": ["mlp"], "datasets": ["mnist1d"]})
    _, document = read_metanet(path)
    assert document["training"] == {"corpus": "corpus", "runs": ["a"], "steps": 3}
    assert document["scope"] == {"families": ["mlp"], "datasets": ["mnist1d"],
                                 "universal": False}
    info = discover_checkpoints(tmp_path)[0]
    assert set(info.describe()) == {"name", "sha256", "families", "datasets", "universal"}
    assert str(tmp_path) not in json.dumps(info.describe())


def test_a_malformed_scope_is_refused_on_load(tmp_path):
    path = save_metanet(MetaNetwork(hidden=4, num_layers=1, head_hidden=4),
                        tmp_path / "m.safetensors")
    document = json.loads(path.with_suffix(".json").read_text())
    document["scope"] = {"families": "mlp"}
    path.with_suffix(".json").write_text(json.dumps(document))
    with pytest.raises(ModelFormatError, match="scope"):
        read_metanet(path)


def test_shipped_checkpoints_are_scoped_portable_and_one_is_universal():
    checkpoints = discover_checkpoints(CHECKPOINT_DIR)
    assert any(c.universal for c in checkpoints)
    for info in checkpoints:
        text = Path(info.path).with_suffix(".json").read_text()
        assert '"/' not in text and '"~' not in text  # no absolute path of any machine


def test_prune_selection_uses_the_models_zoo_family_and_the_dataset_id(tmp_path):
    import torch

    from metaprune import zoo
    from metaprune.metanet.scope import select_metanet

    _folder(tmp_path)
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10)
    cnn = zoo.build("cnn1d", config)
    path, entry = select_metanet("default", cnn, "mnist1d", folder=tmp_path)
    assert path == tmp_path / "cnn.safetensors"
    assert entry["name"] == "cnn" and entry["reason"].startswith("per-family checkpoint")
    assert len(entry["sha256"]) == 64 and str(tmp_path) not in json.dumps(entry)
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4))
    path, entry = select_metanet("default", bare, None, folder=tmp_path)
    assert entry["name"] == "universal" and "not a zoo family" in entry["reason"]
    path, entry = select_metanet(tmp_path / "cnn.safetensors", bare, None)
    assert entry["reason"] == "checkpoint given by path"
    loaded = object()
    assert select_metanet(loaded, bare) == (loaded, None)


def test_default_picks_the_folders_default_among_universal_checkpoints(tmp_path):
    import torch

    from metaprune.metanet.scope import default_candidates, select_metanet

    _folder(tmp_path)  # "universal" (2 families), "cnn", "cnn-fashion"
    metanet = MetaNetwork(hidden=4, num_layers=1, head_hidden=4)
    # the folder's default ("metanet*") has the narrower scope: scope breaks no tie here
    save_metanet(metanet, tmp_path / "metanet.safetensors",
                 scope={"families": ["mlp"], "datasets": ["mnist1d"], "universal": True})
    assert [c.name for c in default_candidates(tmp_path)] == ["cnn", "cnn-fashion", "metanet"]
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4))
    path, entry = select_metanet("default", bare, None, folder=tmp_path)
    assert path.name == "metanet.safetensors" and "universal" in entry["reason"]
    path, entry = select_metanet("universal", bare, None, folder=tmp_path)
    assert entry["name"] == "universal" and entry["reason"] == "checkpoint given by name"
