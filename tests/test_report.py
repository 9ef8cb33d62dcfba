"""Reports on disk and the `metaprune prune` command (in-process)."""

import json

import pytest
import torch

from metaprune.cli.main import main
from metaprune.report import REPORT_KEYS, build_report, plot_sparsity, write_report
from test_prune import _one_thread, tiny_model  # noqa: F401  (autouse fixture: one torch thread)


def _report(**changes):
    fields = dict(version="0.1.0", macs_before=2000, macs_after=1000, params_before=50,
                  params_after=30,
                  kept={"conv1": [8, 16], "fc": [10, 10]}, accuracy_before=0.9,
                  accuracy_after=0.88, latency_ms_before=2.0, latency_ms_after=1.2,
                  finetune=None, finetune_skipped_reason="no data", method="l2",
                  criterion="l2", allocation="global", seconds={"prune": 0.5})
    fields.update(changes)
    return build_report(**fields)


def test_report_keys_speedup_and_json_round_trip(tmp_path):
    report = _report(accuracy_before=torch.tensor(0.9))
    assert tuple(report) == REPORT_KEYS
    assert report["speedup"] == 2.0
    # flops_* stay one release as deprecated aliases of macs_*
    assert (report["flops_before"], report["flops_after"]) == (2000, 1000)
    path = write_report(report, tmp_path / "sub" / "r.json")
    assert json.loads(path.read_text()) == report


def test_sparsity_plot_is_a_png(tmp_path):
    path = plot_sparsity(_report(), tmp_path / "sparsity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_command_writes_model_report_and_chart(tmp_path, capsys):
    from metaprune.formats import load_model, save_model

    model, example_inputs = tiny_model("resnet")
    save_model(model, example_inputs, tmp_path / "dense.pt2")
    code = main(["prune", str(tmp_path / "dense.pt2"), "--out", str(tmp_path / "small.pt2"),
                 "--speedup", "2", "--criterion", "l1"])
    assert code == 0
    report = json.loads((tmp_path / "small.report.json").read_text())
    assert abs(report["speedup"] / 2 - 1) <= 0.02 and report["criterion"] == "l1"
    assert (tmp_path / "small.sparsity.png").is_file()
    pruned, _ = load_model(tmp_path / "small.pt2")
    assert pruned(*example_inputs).shape == (2, 10)
    assert "speed-up" in capsys.readouterr().out


def test_prune_command_reports_bad_targets_and_missing_service(tmp_path, capsys):
    from metaprune.formats import save_model

    model, example_inputs = tiny_model("mlp")
    save_model(model, example_inputs, tmp_path / "dense.pt2")
    code = main(["prune", str(tmp_path / "dense.pt2"), "--out", str(tmp_path / "o.pt2"),
                 "--speedup", "0.5"])
    assert code == 2 and "above 1" in capsys.readouterr().err
    code = main(["prune", str(tmp_path / "missing.pt2"), "--out", str(tmp_path / "o.pt2"),
                 "--speedup", "2"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", str(tmp_path / "dense.pt2"), "--out", "o.pt2", "--speedup", "2",
              "--params-ratio", "0.5"])


def test_prune_command_round_trips_a_zoo_model_in_safetensors(tmp_path):
    from metaprune.formats import load_model, save_model

    model, example_inputs = tiny_model("vgg")
    save_model(model, example_inputs, tmp_path / "dense.safetensors")
    code = main(["prune", str(tmp_path / "dense.safetensors"), "--out",
                 str(tmp_path / "small.safetensors"), "--params-ratio", "0.5"])
    assert code == 0
    pruned, inputs = load_model(tmp_path / "small.safetensors")
    dense_params = sum(p.numel() for p in model.parameters())
    assert abs(sum(p.numel() for p in pruned.parameters()) / dense_params / 0.5 - 1) <= 0.02
    assert pruned(*example_inputs).shape == (2, 10)
