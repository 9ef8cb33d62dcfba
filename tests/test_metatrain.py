"""Meta-training: the loss step, learning, checkpoint resume, selection, and Ray Train with 2
workers on a tiny corpus of digits MLPs built here."""

import dataclasses
import json

import pytest
import torch

from metaprune.cli.main import main as cli_main
from metaprune.errors import InvalidTargetError
from metaprune.metanet import MetaNetwork, load_metanet
from metaprune.training.corpus import build_model
from metaprune.training.corpus_plan import plan_corpus
from metaprune.training.metatrain import (
    METRICS_FILE,
    MetaTrainConfig,
    checkpoint_paths,
    select_best,
    train_locally,
    train_with_ray,
)
from metaprune.training.metatrain_tasks import CorpusTasks, meta_loss


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three digits MLPs (about a second each), the last one held out."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("corpus")
    tasks = plan_corpus(["mlp"], ["digits"], count=3, epochs=2, seed=11)
    tasks[-1] = dataclasses.replace(tasks[-1], held_out=True)
    for task in tasks:
        build_model(task, folder)
    return folder


def _config(corpus, out_dir, **overrides):
    settings = {"epochs": 1, "steps_per_epoch": 4, "batch_size": 32, "hidden": 16,
                "num_layers": 2}
    settings.update(overrides)
    return MetaTrainConfig(corpus=str(corpus), out_dir=str(out_dir), **settings)


def test_corpus_is_split_into_training_and_held_out_models(corpus):
    tasks = CorpusTasks(corpus)
    assert len(tasks.train_ids) == 2 and len(tasks.held_out_ids) == 1
    with pytest.raises(InvalidTargetError, match="no corpus model"):
        CorpusTasks(corpus, families=["vit"])


def test_loss_is_differentiable_and_the_regulariser_is_normalised(corpus):
    tasks = CorpusTasks(corpus, batch_size=32)
    torch.manual_seed(0)
    metanet = MetaNetwork(hidden=16, num_layers=2)
    loss, task_loss, reg, pruned_loss = meta_loss(metanet, tasks, tasks.train_ids[0], 2.0,
                                                  lam=0.5, prune_weight=2.0)
    # near-identity untrained metanetwork: the regulariser is ~ its value on the original weights
    assert reg.item() == pytest.approx(1.0, abs=0.05)
    # zeroing 29 % of every layer's channels (a 2x uniform prune) costs accuracy
    assert pruned_loss.item() > task_loss.item()
    assert loss.item() == pytest.approx(
        task_loss.item() + 0.5 * reg.item() + 2.0 * pruned_loss.item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in metanet.parameters() if p.grad is not None]
    assert len(grads) > len(list(metanet.parameters())) // 2
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in tasks.task(tasks.train_ids[0]).model.parameters())


def test_a_few_steps_lower_the_regulariser(corpus, tmp_path):
    # A strong regulariser weight, a large lr and a larger residual scale: the group lasso must
    # fall within a few steps (with the default near-identity scale it moves ~1e-3 per step).
    # The pruned-network loss pulls elsewhere, so it is off here.
    config = _config(corpus, tmp_path, steps_per_epoch=12, lam=5.0, lr=1e-2,
                     residual_scale=0.05, prune_weight=0.0)
    train_locally(config)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["reg"] < records[0]["reg"] - 0.01
    assert all(r["seconds"] > 0 for r in records)


def test_checkpoints_resume_and_the_best_is_selected(corpus, tmp_path):
    config = _config(corpus, tmp_path / "run")
    train_locally(config)
    first = checkpoint_paths(config.out_dir)
    assert [p.name for p in first] == ["epoch-001.safetensors"]
    # the same folder, two epochs: resumes at epoch 2 with the step count carried on
    train_locally(dataclasses.replace(config, epochs=2))
    saved = checkpoint_paths(config.out_dir)
    assert [p.name for p in saved] == ["epoch-001.safetensors", "epoch-002.safetensors"]
    assert load_metanet(saved[-1]).training_metadata["step"] == 8
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, 9))
    # nothing more to do: a re-run trains no step
    train_locally(dataclasses.replace(config, epochs=2))
    assert len((tmp_path / "run" / METRICS_FILE).read_text().splitlines()) == 8
    selection = select_best(config, tmp_path / "best.safetensors")
    assert len(selection["validated"]) == 2
    assert all(0.0 <= r["score"] <= 1.0 for r in selection["validated"])
    assert selection["best"]["score"] == max(r["score"] for r in selection["validated"])
    best = load_metanet(tmp_path / "best.safetensors")
    assert best.training_metadata["epoch"] in (1, 2)
    # the scope is what it trained on; unrestricted by family, so universal
    assert best.document["scope"] == {"families": ["mlp"], "datasets": ["digits"],
                                      "universal": True}
    assert len(best.training_metadata["models"]) == 2


def test_cli_reports_an_empty_model_selection_as_a_user_error(corpus, tmp_path, capsys):
    code = cli_main(["metanet", "train", "--corpus", str(corpus), "--families", "vit",
                     "--out", str(tmp_path / "m.safetensors"), "--no-ray"])
    assert code == 2
    assert "no corpus model" in capsys.readouterr().err


def test_ray_train_with_two_workers_writes_a_loadable_checkpoint(corpus, tmp_path):
    config = _config(corpus, tmp_path, steps_per_epoch=3)
    result = train_with_ray(config, workers=2)
    assert result.error is None
    saved = checkpoint_paths(tmp_path)
    assert [p.name for p in saved] == ["epoch-001.safetensors"]
    loaded = load_metanet(saved[0])
    assert loaded.training_metadata["workers"] == 2
    assert loaded.training_metadata["step"] == 3
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert len(records) == 3 and all(r["workers"] == 2 for r in records)
    # Ray Train's own record of the reported checkpoint holds the same files
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as folder:
        load_metanet(f"{folder}/epoch-001.safetensors")
