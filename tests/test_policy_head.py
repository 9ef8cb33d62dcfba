"""The sparsity head trained on tuned policies: labels (Ray Tune on the tiny digits corpus of
test_metatrain), head training, the engine allocating with the trained head, and the
comparison table."""

import json

import pytest
import torch

from metaprune.cli.main import main as cli_main
from metaprune.graph import to_graph
from metaprune.metanet import MetaNetwork, load_metanet, read_metanet, save_metanet
from metaprune.pruning import prune
from metaprune.training.head_train import (
    HeadTrainSettings,
    head_features,
    head_keep,
    merged_head,
    normalised_log_keep,
    train_head,
)
from metaprune.training.metatrain_tasks import CorpusTasks
from metaprune.training.policy_eval import compute_ratio, policy_table
from metaprune.training.policy_labels import (
    LABEL_FORMAT,
    LabelSettings,
    build_labels,
    label_name,
    read_labels,
)
from test_metatrain import corpus  # noqa: F401 - the fixture: three digits MLPs, one held out


@pytest.fixture(scope="module")
def labels(corpus, tmp_path_factory):
    """Labels of the first training model at 1.5x and 2x, from 3-trial searches on one Ray."""
    folder = tmp_path_factory.mktemp("labels")
    settings = LabelSettings(corpus=str(corpus), out_dir=str(folder), speedups=(1.5, 2.0),
                             samples=3, finetune_epochs=1, max_models=1, workers=1)
    return folder, settings, build_labels(settings, log=lambda line: None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("metanet") / "metanet.safetensors"
    return save_metanet(MetaNetwork(hidden=16, num_layers=2), path, training={"steps": 0})


def test_labels_hold_the_best_policy_and_the_search_time_and_reruns_skip_them(corpus, labels):
    folder, settings, summary = labels
    first = CorpusTasks(corpus).train_ids[0]
    names = [label_name(first, 1.5), label_name(first, 2.0)]
    assert sorted(p.name for p in folder.glob("*@*x.json")) == names
    assert summary["written"] == 2 and summary["skipped"] == 0
    for name in names:
        label = json.loads((folder / name).read_text())
        assert label["format"] == LABEL_FORMAT and label["search_seconds"] > 0
        trials = json.loads((folder / "searches" / name[:-5] / "trials.json").read_text())
        assert label["policy"] == trials["best"]["policy"]
        assert label["accuracy"] == max(t["accuracy"] for t in label["trials"])
    stamps = {name: (folder / name).stat().st_mtime_ns for name in names}
    again = build_labels(settings, log=lambda line: None)
    assert again["written"] == 0 and again["skipped"] == 2
    assert {name: (folder / name).stat().st_mtime_ns for name in names} == stamps
    assert len(read_labels(folder)) == 2


def test_normalised_allocation_ignores_the_engines_rescaling():
    keep = torch.tensor([0.9, 0.5, 0.2])
    # the engine applies keep ** theta: the normalised allocation is the same for any theta
    assert torch.allclose(normalised_log_keep(keep), normalised_log_keep(keep ** 2.7))
    assert torch.allclose(normalised_log_keep(torch.full((4,), 0.3)), torch.ones(4))


def test_cached_head_features_give_the_networks_own_keep_ratios(corpus, checkpoint):
    loaded = load_metanet(checkpoint)
    model, example_inputs = CorpusTasks(corpus).model(CorpusTasks(corpus).train_ids[0])
    graph = to_graph(loaded.transform(model, example_inputs), example_inputs)
    features = head_features(loaded.metanet, graph)
    for speedup in (1.5, 3.0):
        with torch.no_grad():
            expected = loaded.metanet(graph.data, speedup)[2]
            assert torch.allclose(head_keep(loaded.metanet, features, speedup), expected,
                                  atol=1e-6)


def test_head_training_fits_the_labels_and_leaves_the_rewrite_bit_identical(
        corpus, labels, checkpoint, tmp_path):
    out = tmp_path / "head.safetensors"
    summary = train_head(HeadTrainSettings(metanet=str(checkpoint), labels=str(labels[0]),
                                           corpus=str(corpus), out=str(out), epochs=60,
                                           lr=1e-2), log=lambda line: None)
    assert summary["examples"] == 2
    assert summary["shape_loss_after"] < 0.5 * summary["shape_loss_before"]
    before, _ = read_metanet(checkpoint)
    after, document = read_metanet(out)
    old, new = before.state_dict(), after.state_dict()
    changed = {name for name in old if not torch.equal(old[name], new[name])}
    assert changed and all(name.startswith("sparsity_head.") for name in changed)
    assert document["training"]["sparsity_head_trained"] is True
    assert document["training"]["steps"] == 0  # the starting checkpoint's metadata is kept
    assert document["training"]["head_training"]["label_files"] == 2
    assert load_metanet(out).head_trained and not load_metanet(checkpoint).head_trained


def test_merged_heads_answer_the_mean_of_their_logits():
    from metaprune.metanet.network import sparsity_head_mlp

    torch.manual_seed(0)
    heads = [sparsity_head_mlp(7, 5) for _ in range(3)]
    for head in heads:  # away from the near-zero initial output layer
        torch.nn.init.normal_(head[-1].weight)
    x = torch.randn(11, 7)
    merged = merged_head(heads)
    assert merged[0].out_features == 15
    assert torch.allclose(merged(x), sum(head(x) for head in heads) / 3, atol=1e-6)


def test_several_heads_are_saved_as_one_wider_head(corpus, labels, checkpoint, tmp_path):
    out = tmp_path / "heads.safetensors"
    summary = train_head(HeadTrainSettings(metanet=str(checkpoint), labels=str(labels[0]),
                                           corpus=str(corpus), out=str(out), epochs=10,
                                           heads=2), log=lambda line: None)
    before, _ = read_metanet(checkpoint)
    after, document = read_metanet(out)
    assert document["config"]["head_hidden"] == 2 * before.config["head_hidden"]
    assert summary["shape_loss_after"] < summary["shape_loss_before"]
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[name], new[name]) for name in old
               if not name.startswith("sparsity_head."))
    assert load_metanet(out).head_trained


def test_the_trained_head_allocates_metanet_pruning_to_the_exact_target(corpus, labels,
                                                                         checkpoint, tmp_path):
    out = tmp_path / "head.safetensors"
    code = cli_main(["metanet", "train-head", "--metanet", str(checkpoint), "--labels",
                     str(labels[0]), "--corpus", str(corpus), "--out", str(out),
                     "--epochs", "20"])
    assert code == 0
    tasks = CorpusTasks(corpus)
    model_id = tasks.held_out_ids[0]
    model, example_inputs = tasks.model(model_id)
    report = prune(model, example_inputs, method="metanet", metanet=str(out), speedup=2.0,
                   data=tasks.loaders(model_id), finetune_epochs=0).report
    assert report["allocation"] == "metanet"
    assert abs(report["speedup"] / 2.0 - 1) <= 0.02


def test_policy_table_averages_seeds_per_model_and_states_the_compute_ratio():
    gap = {("a", "tuned"): 0.0, ("b", "tuned"): 0.0, ("a", "predicted"): 0.05,
           ("b", "predicted"): 0.03}
    runs = [{"model": m, "speedup": 2.0, "seed": s, "method": method,
             "accuracy": acc + s / 100 - gap[m, method], "decision_seconds": seconds}
            for m, acc in (("a", 0.90), ("b", 0.80))
            for s in (0, 1)
            for method, seconds in (("tuned", 50.0), ("predicted", 0.5))]
    table = policy_table(runs)
    assert [row["method"] for row in table] == ["tuned", "predicted"]
    tuned = table[0]
    assert tuned["mean"] == pytest.approx(0.855) and tuned["error"] == pytest.approx(0.05)
    assert tuned["models"] == 2 and tuned["runs"] == 4
    # predicted is 0.05 below tuned on model a and 0.03 below on b: paired, the spread cancels
    assert table[1]["versus"] == pytest.approx(-0.04) and table[1]["versus_error"] == \
        pytest.approx(0.01)
    assert tuned["versus"] == 0
    assert compute_ratio(table, 2.0) == pytest.approx(100.0)
