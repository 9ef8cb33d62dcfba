"""`metaprune bench metanet`: fair rows, paired statistics, the best classic row, resuming."""

import gzip
import json
import math

import pytest
import torch

from metaprune import zoo
from metaprune.bench.metanet_rows import NullMetanet, sparse_learning
from metaprune.bench.metanet_stats import best_classic, paired, row_means
from metaprune.formats import save_model
from metaprune.pruning import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny forward passes


def _run(method, model, seed, accuracy, family="cnn1d", budget=1, speedup=3.0):
    return {"kind": "run", "method": method, "model": model, "seed": seed,
            "accuracy": accuracy, "family": family, "budget": budget, "speedup": speedup}


def _small_model(seed=0):
    torch.manual_seed(seed)
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10,
                                widths=[12, 16], kernel_sizes=[3, 3], head="gap", hidden=[])
    return zoo.build("cnn1d", config).eval(), (torch.randn(2, 1, 40),)


def _loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 40, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def test_paired_difference_pairs_model_and_seed_and_gives_a_lower_bound():
    runs = [_run("metanet", "a", 0, 0.82), _run("l2/global", "a", 0, 0.80),
            _run("metanet", "a", 1, 0.74), _run("l2/global", "a", 1, 0.70),
            _run("metanet", "b", 0, 0.49), _run("l2/global", "b", 0, 0.50),
            _run("metanet", "c", 0, 0.99)]  # no baseline for c: left out
    mean, error, low, models = paired(runs, 3.0, 1, "metanet", "l2/global")
    assert models == 2
    assert mean == pytest.approx((0.03 - 0.01) / 2)  # a: mean of +0.02, +0.04; b: -0.01
    assert error == pytest.approx(0.02)
    assert low == pytest.approx(mean - 6.3138 * error, abs=1e-4)  # t(0.95, 1 df)
    assert math.isnan(paired(runs, 2.0, 1, "metanet", "l2/global")[0])


def test_best_classic_is_the_best_classic_row_that_covers_every_model():
    runs = [_run("l2/global", "a", 0, 0.8), _run("l2/global", "b", 0, 0.6),
            _run("l1/uniform", "a", 0, 0.9), _run("l1/uniform", "b", 0, 0.65),
            _run("bn_scale/global", "a", 0, 0.99),  # misses model b: not eligible
            _run("metanet", "a", 0, 1.0), _run("metanet", "b", 0, 1.0)]  # not classic
    assert best_classic(runs, 3.0, 1) == "l1/uniform"
    table = row_means(runs, 3.0, 1)
    assert table["l2/global"] == pytest.approx((0.7, 0.1, 2))
    assert list(table)[0] == "metanet"  # learned rows first


def test_null_metanetwork_is_the_budget_split_with_an_identity_rewrite():
    model, inputs = _small_model()
    copied = NullMetanet().transform(model, inputs)
    assert copied is not model
    for a, b in zip(copied.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # exact identity
    loaders = (_loader(), _loader())
    common = {"speedup": 2.0, "data": loaders, "finetune": {"bn_recalibration": False},
              "latency": False}
    # the whole budget follows pruning, as for the classic rows
    report = prune(model, inputs, method="metanet", metanet=NullMetanet(), finetune_epochs=2,
                   **common).report
    spent = report["finetune"]
    assert (spent["epochs_after_metanet"], spent["epochs_after_prune"]) == (0, 2)
    # the choice among the non-learned candidates only: the null head is untrained
    assert {c["source"] for c in report["metanet"]["allocation_choice"]["candidates"]} == {
        "uniform", "measured"}


def test_logged_metanet_runs_name_their_budget_split_and_old_ones_get_the_old_default():
    from metaprune.bench.metanet import _with_split, run_key

    old = {"kind": "run", "model": "m", "speedup": 3.0, "budget": 4, "method": "metanet",
           "seed": 0, "checkpoint": "abc", "key": "run|m|3|4|metanet|0|abc"}
    assert _with_split(old)["key"] == run_key("m", 3.0, 4, "metanet", 0, "abc", 2)
    assert _with_split(old)["epochs_after_metanet"] == 2  # half, the engine's old default
    new = run_key("m", 3.0, 4, "metanet", 0, "abc", 0)
    assert new != _with_split(old)["key"]  # a changed split is a new run
    classic = {**old, "method": "l2/global", "checkpoint": None, "key": "run|m|3|4|l2/global|0|"}
    assert _with_split(classic) == classic  # classic rows spend everything after pruning


def test_sparse_learning_shrinks_weak_groups_more_than_strong_ones():
    model, inputs = _small_model()
    loader = _loader()
    plain = sparse_learning(model, inputs, (loader, loader), epochs=2, seed=0, reg=0.0)
    sparse = sparse_learning(model, inputs, (loader, loader), epochs=2, seed=0, reg=1.0)
    norms = {name: module.weight.flatten(1).norm(dim=1) for name, module in
             plain.named_modules() if isinstance(module, torch.nn.Conv1d)}
    shrunk = {name: module.weight.flatten(1).norm(dim=1) for name, module in
              sparse.named_modules() if isinstance(module, torch.nn.Conv1d)}
    first = next(iter(norms))
    ratio = shrunk[first] / norms[first]
    assert bool((ratio < 1).all())  # the penalty shrinks every group of the first conv
    weakest, strongest = norms[first].argmin(), norms[first].argmax()
    assert ratio[weakest] < ratio[strongest]  # and the weak ones the most (alpha scaling)


def test_bench_runs_on_held_out_models_resumes_and_writes_its_page(tmp_path):
    from metaprune.cli.main import main

    folder = tmp_path / "held-out"
    folder.mkdir()
    model, inputs = _small_model()
    save_model(model, inputs, folder / "m-cnn1d-0.safetensors", family="cnn1d")
    (folder / "m-cnn1d-0.meta.json").write_text(json.dumps({
        "model_id": "m-cnn1d-0", "family": "cnn1d", "dataset": "mnist1d", "held_out": True,
        "weights": "m-cnn1d-0.safetensors", "train_subset": 512}))
    arguments = ["bench", "metanet", "--held-out", str(folder), "--speedups", "2",
                 "--budgets", "0,1", "--seeds", "0", "--criteria", "l2",
                 "--allocations", "global", "--runs", str(tmp_path / "runs.jsonl.gz"),
                 "--out", str(tmp_path / "page" / "metanet.md")]
    assert main(arguments) == 0
    def lines():
        with gzip.open(tmp_path / "runs.jsonl.gz", "rt") as stream:
            return stream.read().splitlines()

    records = [json.loads(line) for line in lines()]
    runs = [r for r in records if r["kind"] == "run"]
    assert {r["method"] for r in runs} == {"metanet", "null-metanet", "sparse-learning",
                                           "l2/global"}
    assert {r["optimizer_steps"] for r in runs if r["budget"] == 1} == {4}  # 512 // 128
    assert [r["kind"] for r in records].count("guard") == 1
    page = (tmp_path / "page" / "metanet.md").read_text()
    assert "metanet − null metanet" in page and "Rewrite alone" in page
    assert "## Which candidate the choice took" in page  # each metanet-path run's choice
    assert all(r["choice"] for r in runs if r["method"] in ("metanet", "null-metanet"))
    assert (tmp_path / "page" / "metanet.png").stat().st_size > 0
    notes = tmp_path / "notes.md"
    notes.write_text("2x was not run.")
    assert main(arguments + ["--notes", str(notes)]) == 0  # resumed: nothing runs twice
    assert len(lines()) == len(records)
    assert "## Notes\n\n2x was not run." in (tmp_path / "page" / "metanet.md").read_text()


def test_bench_refuses_a_folder_with_models_that_training_may_have_seen(tmp_path):
    from metaprune.bench.metanet import held_out_models

    (tmp_path / "a.meta.json").write_text(json.dumps({"model_id": "a", "family": "mlp",
                                                       "held_out": False}))
    with pytest.raises(SystemExit, match="not marked held-out"):
        held_out_models([tmp_path], [], None)
