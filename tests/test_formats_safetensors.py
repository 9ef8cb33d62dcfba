"""`.safetensors` + spec round trips (pruned zoo models too), spec errors, ONNX export."""

import json

import pytest
import torch
import torch_pruning as tp
from fixtures_formats import SmallCNN, seeded

from metaprune import zoo
from metaprune.errors import ModelFormatError
from metaprune.formats import load_model, save_model


def _cnn1d():
    torch.manual_seed(0)
    config = zoo.default_config("cnn1d", input_shape=(1, 40), num_classes=4, widths=[8, 16])
    return seeded(zoo.build("cnn1d", config)), (torch.randn(3, 1, 40),)


def test_roundtrip_writes_spec_and_gives_equal_outputs(tmp_path):
    model, inputs = _cnn1d()
    save_model(model, inputs, tmp_path / "m.safetensors")
    spec = json.loads((tmp_path / "m.json").read_text())
    assert spec["format"] == 1 and spec["family"] == "cnn1d" and spec["input_shape"] == [1, 40]
    again, example_inputs = load_model(tmp_path / "m.safetensors")
    torch.testing.assert_close(again(*inputs), model(*inputs))
    assert example_inputs[0].shape[1:] == (1, 40)


def test_pruned_zoo_model_roundtrips_through_config_of(tmp_path):
    model, inputs = _cnn1d()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    tp.pruner.MagnitudePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                              pruning_ratio=0.5, ignored_layers=[head]).step()
    save_model(model, inputs, tmp_path / "p.safetensors", family="cnn1d")
    spec = json.loads((tmp_path / "p.json").read_text())
    assert spec["config"] == zoo.config_of("cnn1d", model)
    again, _ = load_model(tmp_path / "p.safetensors")
    torch.testing.assert_close(again(*inputs), model(*inputs))
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_non_zoo_module_cannot_be_saved_as_safetensors(tmp_path):
    with pytest.raises(ModelFormatError, match="not a zoo model"):
        save_model(SmallCNN(), (torch.randn(2, 3, 8, 8),), tmp_path / "x.safetensors")


@pytest.fixture
def saved(tmp_path):
    model, inputs = _cnn1d()
    save_model(model, inputs, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def _spec(path):
    return json.loads(path.with_suffix(".json").read_text())


def test_corrupt_safetensors(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:8] + b"{garbage" + data[16:])
    with pytest.raises(ModelFormatError, match="not a valid safetensors file"):
        load_model(saved)
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="not a valid safetensors file"):
        load_model(saved)


def test_spec_errors(saved):
    spec_file = saved.with_suffix(".json")
    spec = _spec(saved)
    spec_file.write_text(json.dumps({**spec, "family": "transformer-xxl"}))
    with pytest.raises(ModelFormatError, match="unknown zoo family"):
        load_model(saved)
    spec_file.write_text("{'format': 1,")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(saved)
    spec_file.write_text(json.dumps({**spec, "format": 7}))
    with pytest.raises(ModelFormatError, match="'format' must be 1"):
        load_model(saved)
    spec_file.write_text(json.dumps({**spec, "input_shape": [0, -3]}))
    with pytest.raises(ModelFormatError, match="input_shape"):
        load_model(saved)
    wider = dict(spec["config"], widths=[8, 32])
    spec_file.write_text(json.dumps({**spec, "config": wider}))
    with pytest.raises(ModelFormatError, match="does not match"):
        load_model(saved)
    spec_file.unlink()
    with pytest.raises(ModelFormatError, match="needs its spec file"):
        load_model(saved)


def test_nan_weights_in_safetensors_are_refused(tmp_path):
    model, inputs = _cnn1d()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("inf"))
    save_model(model, inputs, tmp_path / "inf.safetensors")
    with pytest.raises(ModelFormatError, match="NaN or Inf"):
        load_model(tmp_path / "inf.safetensors")


def test_onnx_export_of_small_cnn_passes_checker(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = seeded(SmallCNN())
    save_model(model, (torch.randn(2, 3, 8, 8),), tmp_path / "cnn.onnx")
    assert (tmp_path / "cnn.onnx").stat().st_size > 0
    onnx.checker.check_model(str(tmp_path / "cnn.onnx"))
    with pytest.raises(ModelFormatError, match="suffix"):
        load_model(tmp_path / "cnn.onnx")
