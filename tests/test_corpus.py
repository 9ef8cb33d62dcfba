"""The corpus pipeline: planning, storing, resuming, and one build through a local Ray."""

import json

import pytest
import torch

from metaprune.cli.main import main as cli_main
from metaprune.data import load_dataset
from metaprune.errors import DatasetUnavailableError
from metaprune.finetune import evaluate
from metaprune.formats import load_model
from metaprune.training.corpus import build_corpus, build_model, start_ray
from metaprune.training.corpus_plan import SAMPLERS, plan_corpus
from metaprune.training.corpus_store import finished_metadata, read_manifest


def _tiny_tasks(count=2, **options):
    # MLPs on sklearn digits, 2 to 4 epochs: about a second each on one core.
    return plan_corpus(["mlp"], ["digits"], count=count, epochs=4, seed=7, **options)


def test_plan_is_deterministic_and_fits_families_to_input_ranks():
    families = ["mlp", "cnn1d", "resnet", "vit", "vgg"]
    first = plan_corpus(families, ["mnist1d", "fashion-mnist"], count=30, epochs=4, seed=3)
    again = plan_corpus(families, ["mnist1d", "fashion-mnist"], count=30, epochs=4, seed=3)
    assert [t.to_dict() for t in first] == [t.to_dict() for t in again]
    assert len({t.model_id for t in first}) == 30
    pairs = {(t.family, t.dataset) for t in first}
    assert ("cnn1d", "fashion-mnist") not in pairs and ("vgg", "mnist1d") not in pairs
    assert ("cnn1d", "mnist1d") in pairs and ("vgg", "fashion-mnist") in pairs
    # A larger count extends the plan without changing the models already in it.
    longer = plan_corpus(families, ["mnist1d", "fashion-mnist"], count=40, epochs=4, seed=3)
    assert [t.to_dict() for t in longer[:30]] == [t.to_dict() for t in first]
    # Every 5th model of each pair is held out; another seed gives other ids and configs.
    assert all(t.held_out == (t.index % 5 == 4) for t in first)
    other = plan_corpus(families, ["mnist1d", "fashion-mnist"], count=30, epochs=4, seed=4)
    assert {t.model_id for t in other}.isdisjoint({t.model_id for t in first})
    assert all(1 <= t.recipe["epochs"] <= 4 for t in first)
    assert {t.recipe["optimizer"] for t in first} == {"sgd", "adamw"}


def test_unseen_held_out_models_are_wider_or_deeper_than_any_training_model():
    tasks = plan_corpus(["resnet"], ["mnist1d"], count=25, epochs=2, unseen_held_out=True)
    seen = [t for t in tasks if not t.held_out]
    unseen = [t for t in tasks if t.held_out]
    assert unseen and all(t.unseen for t in unseen)
    assert max(t.config["depth"] for t in seen) < min(t.config["depth"] for t in unseen)
    assert max(t.config["stage_widths"][0] for t in seen) < min(
        t.config["stage_widths"][0] for t in unseen)


def test_unknown_family_or_dataset_is_refused_with_the_known_ones(capsys):
    code = cli_main(["zoo", "build", "--families", "mlp,lenet", "--count", "2",
                     "--out", "unused"])
    assert code == 2
    assert "unknown corpus family 'lenet'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="none of the families"):
        plan_corpus(["cnn1d"], ["fashion-mnist"], count=1, epochs=1)
    assert set(SAMPLERS) == {"mlp", "cnn1d", "resnet", "vit", "vgg", "mobilenetv2", "densenet"}


def test_models_are_stored_loadable_and_resumed_without_retraining(tmp_path):
    torch.set_num_threads(1)
    tasks = _tiny_tasks()
    for task in tasks:
        meta, trained = build_model(task, tmp_path)
        assert trained and 0.0 <= meta["accuracy"] <= 1.0
    test_loader = load_dataset("digits").loaders(64)[1]
    for task in tasks:
        model, example_inputs = load_model(tmp_path / f"{task.model_id}.safetensors")
        meta = json.loads((tmp_path / f"{task.model_id}.meta.json").read_text())
        assert meta["family"] == "mlp" and meta["dataset"] == "digits"
        assert meta["config"]["hidden"] == task.config["hidden"]
        assert meta["macs"] > 0 and meta["params"] == sum(p.numel() for p in model.parameters())
        assert model(*example_inputs).shape == (2, 10)
        # The stored weights are the evaluated ones: the loaded model scores the recorded accuracy.
        assert evaluate(model, test_loader) == pytest.approx(meta["accuracy"])
    weights = tmp_path / f"{tasks[0].model_id}.safetensors"
    stamp = weights.stat().st_mtime_ns
    # Finished models are skipped: nothing is trained, no file rewritten.
    again = [build_model(task, tmp_path) for task in tasks]
    assert [trained for _, trained in again] == [False, False]
    assert weights.stat().st_mtime_ns == stamp
    # A model killed after its weights but before its metadata is trained again.
    (tmp_path / f"{tasks[1].model_id}.meta.json").unlink()
    assert set(finished_metadata(tmp_path)) == {tasks[0].model_id}
    meta, trained = build_model(tasks[1], tmp_path)
    assert trained and (tmp_path / f"{tasks[1].model_id}.meta.json").is_file()


def test_ray_build_skips_finished_models_and_writes_the_manifest(tmp_path):
    torch.set_num_threads(1)
    tasks = _tiny_tasks(count=3, initial_prune=1.3)
    build_model(tasks[0], tmp_path)  # finished before the build: must be skipped
    lines = []
    start_ray(2, None)  # the same start as the CLI's; build_corpus reuses a running Ray
    import ray

    try:
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
        summary = build_corpus(tasks, tmp_path, workers=2, log=lines.append)
    finally:
        ray.shutdown()
    assert addresses == {"127.0.0.1"}
    assert summary["trained"] == 2 and summary["skipped"] == 1 and summary["failed"] == []
    assert sum(line.startswith("[") for line in lines) == 2  # one progress line per model
    assert any(line.startswith("digits") and "mlp" in line and "3 (0 held out)" in line
               for line in lines)  # the closing per-family summary counts skipped models too
    manifest = read_manifest(tmp_path)
    assert manifest["count"] == 3
    assert [m["model_id"] for m in manifest["models"]] == sorted(t.model_id for t in tasks)
    for meta in manifest["models"][1:]:
        pruning = meta["initial_pruning"]
        assert meta["accuracy"] == pytest.approx(pruning["accuracy_after"])
        assert pruning["flops_after"] < pruning["flops_before"]
        assert abs(pruning["speedup"] / pruning["target"] - 1) <= 0.02
        model, _ = load_model(tmp_path / meta["weights"])
        assert sum(p.numel() for p in model.parameters()) == meta["params"]


def test_a_missing_dataset_or_no_workers_fails_before_ray_starts(tmp_path, capsys):
    import ray

    tasks = plan_corpus(["mlp"], ["fashion-mnist"], count=1, epochs=1)  # not in the test cache
    with pytest.raises(DatasetUnavailableError, match="metaprune data fetch fashion-mnist"):
        build_corpus(tasks, tmp_path)
    assert not ray.is_initialized()
    code = cli_main(["zoo", "build", "--datasets", "digits", "--count", "1", "--workers", "0",
                     "--out", str(tmp_path)])
    assert code == 2 and "workers must be at least 1" in capsys.readouterr().err
