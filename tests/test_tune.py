"""Policy search with Ray Tune: the Pareto front, the recipe's round trip through load_policy and
prune, a trial's equivalence with `prune(..., finetune_epochs=E)`, and one `metaprune tune` run
through a local Ray with 2 CPUs on a small MNIST-1D CNN."""

import json
import math

import pytest
import torch

import metaprune
from metaprune import zoo
from metaprune.cli.main import main as cli_main
from metaprune.data import load_dataset
from metaprune.errors import InvalidTargetError
from metaprune.finetune import train
from metaprune.pruning import load_policy
from metaprune.pruning.training_bridge import DATA_BATCH_SIZE
from metaprune.seeding import seed_everything
from metaprune.training.tune import (
    DATA_SEED,
    TuneSettings,
    _search_algorithm,
    best_trial,
    prunable_groups,
    recipe_document,
    run_trial,
    search_space,
)
from metaprune.training.tune_pareto import pareto_front, plot_trials


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    """A CNN1d (widths 16, 32) trained one epoch on MNIST-1D, saved as .safetensors + spec."""
    torch.set_num_threads(1)
    data = load_dataset("mnist1d")
    seed_everything(0)
    model = zoo.build("cnn1d", {"input_shape": list(data.input_shape),
                                "num_classes": data.num_classes, "widths": [16, 32]})
    train(model, data.loaders(DATA_BATCH_SIZE, seed=0)[0], epochs=1,
          config={"optimizer": "adamw", "lr": 3e-3}, progress=False)
    path = tmp_path_factory.mktemp("tune-model") / "cnn.safetensors"
    metaprune.save_model(model.eval(), data.example_inputs(batch=2), path)
    return path


def _points(*pairs):
    return [{"accuracy": accuracy, "macs": macs} for accuracy, macs in pairs]


def test_pareto_front_keeps_exactly_the_non_dominated_trials_cheapest_first():
    trials = _points((0.90, 500), (0.85, 300), (0.80, 400), (0.95, 900), (0.70, 100),
                     (0.90, 600), (0.85, 300))
    # (0.80, 400) loses to (0.85, 300); (0.90, 600) to (0.90, 500); the second (0.85, 300)
    # duplicates the first
    assert pareto_front(trials) == [4, 1, 0, 3]
    # failed trials (None, NaN) take no part; a lone usable trial is the front
    assert pareto_front(_points((None, 100), (math.nan, 50), (0.5, math.nan), (0.6, 700))) == [3]
    assert pareto_front([]) == [] and pareto_front([{}]) == []
    # same MACs: only the most accurate; same accuracy: only the cheapest
    assert pareto_front(_points((0.7, 200), (0.8, 200), (0.8, 100))) == [2]


def test_pareto_front_matches_a_brute_force_check():
    generator = torch.Generator().manual_seed(3)
    accuracy = torch.rand(60, generator=generator).round(decimals=1).tolist()
    macs = torch.randint(1, 20, (60,), generator=generator).tolist()
    trials = _points(*zip(accuracy, macs))

    def dominated(i):
        return any(t["accuracy"] >= trials[i]["accuracy"] and t["macs"] <= trials[i]["macs"]
                   and (t["accuracy"], t["macs"]) != (trials[i]["accuracy"], trials[i]["macs"])
                   for t in trials)

    front = pareto_front(trials)
    points = {(trials[i]["accuracy"], trials[i]["macs"]) for i in range(60) if not dominated(i)}
    assert {(trials[i]["accuracy"], trials[i]["macs"]) for i in front} == points
    assert len(front) == len(points)
    assert [trials[i]["macs"] for i in front] == sorted(trials[i]["macs"] for i in front)


def test_best_trial_is_the_most_accurate_complete_one_meeting_the_target(tmp_path):
    trials = [
        {"status": "complete", "meets_target": True, "accuracy": 0.80, "macs": 90},
        {"status": "complete", "meets_target": False, "accuracy": 0.95, "macs": 200},
        {"status": "stopped early", "meets_target": True, "accuracy": 0.99, "macs": 90},
        {"status": "complete", "meets_target": True, "accuracy": 0.80, "macs": 80},
    ]
    assert best_trial(trials) == 3  # equal accuracy: fewer MACs
    assert best_trial(trials[1:3]) is None
    figure = plot_trials(trials, [3, 1], tmp_path / "trials.png", best=3, target_macs=100)
    assert figure.stat().st_size > 0


def test_settings_refuse_what_cannot_run():
    for wrong, message in [({"speedup": 1.0}, "above 1"), ({"objectives": ("flops",)}, "acc"),
                           ({"scheduler": "asha", "objectives": ("acc", "flops")}, "single"),
                           ({"search": "grid"}, "random, optuna"), ({"samples": 0}, "samples")]:
        with pytest.raises(InvalidTargetError, match=message):
            TuneSettings(**{"model": "m.pt2", "dataset": "mnist1d", "speedup": 2.0, **wrong})


def test_optuna_is_told_an_infeasible_trial_failed_and_a_complete_one_completed():
    import optuna

    settings = TuneSettings(model="m.pt2", dataset="mnist1d", speedup=2.0, search="optuna",
                            objectives=("acc", "flops"))
    searcher = _search_algorithm(settings)
    searcher.set_search_properties(None, None, search_space(["conv1", "conv2"], settings))
    assert set(searcher.suggest("a")["keep"]) == {"conv1", "conv2"}
    searcher.suggest("b")
    searcher.on_trial_complete("a", {"accuracy": math.nan, "macs": math.nan,
                                     "infeasible": "cannot be met"})
    searcher.on_trial_complete("b", {"accuracy": 0.9, "macs": 1000})
    states = [trial.state for trial in searcher._ot_study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


def test_recipe_round_trips_through_load_policy_and_prune(cnn_file, tmp_path):
    model, example_inputs = metaprune.load_model(cnn_file)
    groups = prunable_groups(model, example_inputs)
    assert groups == ["features.0.unit.conv", "features.1.unit.conv"]  # not the classifier
    trial = {"trial": "t0", "policy": dict(zip(groups, (0.9, 0.3))), "target_speedup": 2.0,
             "accuracy": 0.5, "macs": 1000, "params": 100, "speedup": 2.0}
    settings = TuneSettings(model=str(cnn_file), dataset="mnist1d", speedup=2.0,
                            out_dir=str(tmp_path))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(recipe_document(trial, settings)))
    assert load_policy(recipe) == trial["policy"]
    assert load_policy({"conv": 0.5}) == {"conv": 0.5}  # a plain policy still reads as before
    with pytest.raises(InvalidTargetError, match="non-empty"):
        load_policy({"policy": {}, "speedup": 2.0})
    from_recipe = metaprune.prune(model, example_inputs, policy=str(recipe), speedup=2.0)
    from_dict = metaprune.prune(model, example_inputs, policy=trial["policy"], speedup=2.0)
    assert from_recipe.report["kept"] == from_dict.report["kept"]
    assert from_recipe.report["speedup"] == pytest.approx(2.0, rel=0.02)
    kept = from_recipe.report["kept"]
    # the policy's shape survives the rescaling: the 0.3 layer keeps the smaller share
    assert kept[groups[1]][0] / kept[groups[1]][1] < kept[groups[0]][0] / kept[groups[0]][1]


def test_a_trial_scores_what_prune_with_finetuning_scores(cnn_file):
    model, example_inputs = metaprune.load_model(cnn_file)
    policy = dict(zip(prunable_groups(model, example_inputs), (0.7, 0.4)))
    data = load_dataset("mnist1d")
    reports = []
    metrics = run_trial(model, example_inputs, data.loaders(DATA_BATCH_SIZE, seed=DATA_SEED),
                        policy, 1.8, finetune_epochs=2, report=reports.append)
    assert [r["epoch"] for r in reports] == [1, 2] and metrics == reports[-1]
    engine = metaprune.prune(model, example_inputs, policy=policy, speedup=1.8,
                             data=data.loaders(DATA_BATCH_SIZE, seed=DATA_SEED),
                             finetune_epochs=2).report
    assert metrics["accuracy"] == pytest.approx(engine["accuracy_after"], abs=1e-9)
    assert metrics["macs"] == engine["flops_after"]


def test_cli_tune_runs_trials_on_ray_and_writes_a_recipe_that_applies(cnn_file, tmp_path,
                                                                      capsys):
    out = tmp_path / "tune-out"
    code = cli_main(["tune", str(cnn_file), "--dataset", "mnist1d", "--speedup", "1.5",
                     "--samples", "4", "--finetune-epochs", "1", "--workers", "2",
                     "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    for name in ("recipe.json", "trials.json", "trials.csv", "trials.png"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "trials.json").read_text())
    assert len(summary["trials"]) == 4
    assert all(t["status"] in ("complete", "infeasible") for t in summary["trials"])
    assert len((out / "trials.csv").read_text().splitlines()) == 5
    best = summary["best"]
    assert best["status"] == "complete" and best["speedup"] == pytest.approx(1.5, rel=0.02)
    assert best["accuracy"] == max(t["accuracy"] for t in summary["trials"]
                                   if t["status"] == "complete")
    assert "best policy: trial " + best["trial"] in printed
    assert all(f"{name}  keep {ratio:.3f}" in printed for name, ratio in best["policy"].items())
    assert "Pareto front" in printed and "[4/4]" in printed
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["policy"] == best["policy"] and recipe["speedup"] == 1.5
    pruned = tmp_path / "pruned.safetensors"
    code = cli_main(["prune", str(cnn_file), "--out", str(pruned), "--policy",
                     str(out / "recipe.json"), "--speedup", "1.5", "--dataset", "mnist1d",
                     "--finetune-epochs", "1"])
    assert code == 0
    report = json.loads((tmp_path / "pruned.report.json").read_text())
    assert report["flops_after"] == best["macs"]
    # same pruning, same batches and seed: only thread-count rounding could move it
    assert report["accuracy_after"] == pytest.approx(best["accuracy"], abs=0.01)


def test_a_latency_target_recipe_applies_with_the_latency_flags(cnn_file, tmp_path):
    settings = TuneSettings(model=str(cnn_file), dataset="mnist1d", speedup=1.5,
                            target_kind="latency_speedup", latency_batch=32,
                            out_dir=str(tmp_path))
    trial = {"trial": "t0", "policy": {"features.0.unit.conv": 0.5}, "target_speedup": 1.5,
             "accuracy": 0.5, "macs": 1000, "params": 100, "speedup": 1.52}
    recipe = recipe_document(trial, settings)
    assert "--latency-speedup 1.5 --latency-batch 32" in recipe["command"]
    assert "--speedup" not in recipe["command"].replace("--latency-speedup", "")
    assert recipe["speedup"] is None and recipe["tuned"]["latency_speedup_target"] == 1.5
    with pytest.raises(InvalidTargetError, match="target_kind"):
        TuneSettings(model=str(cnn_file), dataset="mnist1d", speedup=1.5, target_kind="fast")
