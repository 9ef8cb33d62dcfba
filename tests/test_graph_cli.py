"""`metaprune inspect` and the docstring example of `to_graph`."""

import doctest
import json

import torch

from metaprune.cli.main import main


def test_inspect_zoo_family_text(capsys):
    code = main(["inspect", "--family", "resnet", "--config", '{"depth": 8}',
                 "--input-shape", "3", "16", "16"])
    out = capsys.readouterr().out
    assert code == 0
    for expected in ("parameters: 78,042", "MACs (batch 1)", "graph: 461 nodes",
                     "coupled groups", "stages.0.0:add#1", "[norm: stem.bn]"):
        assert expected in out


def test_inspect_model_file_json(tmp_path, capsys):
    from metaprune import zoo
    from metaprune.formats import save_model
    from metaprune.graph import to_graph

    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=10)
    model = zoo.build("cnn1d", config).eval()
    inputs = zoo.example_inputs(config, batch=1)
    path = tmp_path / "cnn.safetensors"
    save_model(model, inputs, path)
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    graph = to_graph(model, inputs)
    assert report["graph"]["nodes"] == graph.num_nodes
    assert report["graph"]["edges"] == graph.num_edges
    assert report["params"] == sum(p.numel() for p in model.parameters())
    assert report["macs"] > 0
    assert [layer["name"] for layer in report["layers"]] == [l.name for l in graph.layers]
    assert report["coupled_groups"]


def test_inspect_without_model_is_a_clear_error(capsys):
    assert main(["inspect"]) == 2
    assert "give either a model file INPUT or --family" in capsys.readouterr().err


def test_to_graph_docstring_example():
    import metaprune.graph.convert as convert

    torch.manual_seed(0)
    result = doctest.testmod(convert, extraglobs={"nn": torch.nn, "torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_bench_graph_reports_resnet56(capsys):
    assert main(["bench", "graph", "--models", "resnet56"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("resnet56"))
    fields = line.split()
    assert fields[1] == "855,770" and fields[3] == "99,472" and fields[-1] == "True"
