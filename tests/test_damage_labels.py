"""Sparsity-head labels from measured per-group damage: the measurement on a real corpus model
(the tiny digits MLPs of test_metatrain), the least-damage allocation, and train-head reading
the labels unchanged."""

import json

import pytest

from metaprune.cli.main import main as cli_main
from metaprune.metanet import load_metanet
from metaprune.pruning.damage import damage_policy, measure_model_damage
from metaprune.training.damage_labels import DAMAGE_SOURCE
from metaprune.training.metatrain_tasks import CorpusTasks
from metaprune.training.policy_labels import LABEL_FORMAT, label_name, read_labels
from test_metatrain import corpus  # noqa: F401 - the fixture: three digits MLPs, one held out
from test_policy_head import checkpoint  # noqa: F401 - an untrained small metanetwork


def test_the_least_damage_allocation_prunes_cheap_groups_first_and_meets_the_goal():
    measurement = {"macs": 100.0, "groups": [
        # "flat": harmless to prune; "steep": costly from the start; "late": a costly first
        # step then free, so only its hull (0.75 at once) is worth taking
        {"root": "flat", "fraction": [0.25, 0.5, 0.75], "damage": [0.0, 0.01, 0.02],
         "macs_saved": [10.0, 20.0, 30.0]},
        {"root": "steep", "fraction": [0.25, 0.5, 0.75], "damage": [1.0, 2.0, 3.0],
         "macs_saved": [10.0, 20.0, 30.0]},
        {"root": "late", "fraction": [0.25, 0.5, 0.75], "damage": [0.3, 0.3, 0.3],
         "macs_saved": [5.0, 10.0, 30.0]}]}
    assert damage_policy(measurement, 1.25) == {"flat": 0.5, "steep": 1.0, "late": 1.0}
    assert damage_policy(measurement, 2.0) == {"flat": 0.25, "steep": 1.0, "late": 0.25}
    # a goal beyond every measured fraction stops at the deepest ones instead of looping
    assert damage_policy(measurement, 100.0) == {"flat": 0.25, "steep": 0.25, "late": 0.25}


def test_damage_is_measured_per_group_without_touching_the_model(corpus):
    tasks = CorpusTasks(corpus, batch_size=32)
    model_id = tasks.train_ids[0]
    model, example_inputs = tasks.model(model_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = measure_model_damage(model, example_inputs, tasks.loaders(model_id)[0],
                                    fractions=(0.25, 0.75))
    assert all((before[k] == v).all() for k, v in model.state_dict().items())
    assert measured["groups"] and measured["macs"] > 0 and measured["dense_loss"] > 0
    for curve in measured["groups"]:
        assert curve["damage"] == sorted(curve["damage"]) and min(curve["damage"]) >= 0
        assert curve["macs_saved"] == sorted(set(curve["macs_saved"]))
        assert 0 < curve["macs_saved"][-1] < measured["macs"]
    # removing 3/4 of a hidden layer of a trained MLP costs more than removing 1/4
    assert any(curve["damage"][-1] > curve["damage"][0] for curve in measured["groups"])


def test_damage_labels_train_the_head_through_the_existing_command(corpus, checkpoint,
                                                                    tmp_path):
    labels = tmp_path / "labels"
    assert cli_main(["metanet", "damage-labels", "--corpus", str(corpus), "--out", str(labels),
                     "--speedups", "1.5,2", "--fractions", "0.25,0.5,0.75"]) == 0
    tasks = CorpusTasks(corpus)
    names = sorted(label_name(m, s) for m in tasks.train_ids for s in (1.5, 2.0))
    assert sorted(p.name for p in labels.glob("*@*x.json")) == names
    label = json.loads((labels / names[0]).read_text())
    assert label["format"] == LABEL_FORMAT and label["source"] == DAMAGE_SOURCE
    assert label["policy"] == damage_policy(label["damage"], label["speedup"])
    assert len(read_labels(labels)) == len(names)
    stamps = {p.name: p.stat().st_mtime_ns for p in labels.glob("*@*x.json")}
    assert cli_main(["metanet", "damage-labels", "--corpus", str(corpus), "--out", str(labels),
                     "--speedups", "1.5,2", "--fractions", "0.25,0.5,0.75"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in labels.glob("*@*x.json")} == stamps
    out = tmp_path / "head.safetensors"
    assert cli_main(["metanet", "train-head", "--metanet", str(checkpoint), "--labels",
                     str(labels), "--corpus", str(corpus), "--out", str(out),
                     "--epochs", "5"]) == 0
    assert load_metanet(out).head_trained


@pytest.mark.parametrize("fractions", [(0.0, 0.5), (0.5, 1.0)])
def test_fractions_outside_the_open_interval_are_refused(fractions):
    from metaprune.errors import InvalidTargetError
    from metaprune.training.damage_labels import DamageSettings

    with pytest.raises(InvalidTargetError, match="fractions"):
        DamageSettings(corpus="c", out_dir="o", fractions=fractions)
