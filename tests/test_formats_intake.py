"""Strict `.pt2` intake: hostile or broken archives give a clear ModelFormatError, nothing runs."""

import json
import os
import pickle
import zipfile

import pytest
import torch
from fixtures_formats import SmallMLP, edit_json, rewrite_archive, seeded, torch_saved

from metaprune.errors import MetaPruneError, ModelFormatError
from metaprune.formats import IntakeLimits, load_model, save_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A genuine archive written by torch.export.save (via save_model)."""
    path = tmp_path_factory.mktemp("intake") / "good.pt2"
    torch.manual_seed(0)
    save_model(seeded(SmallMLP()), (torch.randn(2, 20),), path)
    return path


class _TouchMarker:
    """Unpickling this runs `touch marker` — exactly what a hostile client would send."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_refused(path, match, **kwargs):
    with pytest.raises(ModelFormatError, match=match):
        load_model(path, **kwargs)


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_pickle_payload_in_sample_inputs_is_refused_and_never_runs(good, tmp_path, container):
    marker = tmp_path / "pwned"
    payload = _TouchMarker(marker)
    blob = torch_saved(payload) if container == "torch.save" else pickle.dumps(payload)
    bad = tmp_path / "evil.pt2"
    rewrite_archive(good, bad, replace={"data/sample_inputs/model.pt": blob})
    _assert_refused(bad, "sample_inputs")
    assert not marker.exists()
    # and the full-pickle fallback inside torch.export.load never saw the member either
    assert not marker.exists()


@pytest.mark.parametrize("evil", [
    "__import__('os').system('touch {marker}')",   # sympify evals this: code execution
    "Symbol('s0').func.__globals__",
    "9**9**9**9",                                  # exact big-integer work: denial of service
    "1 << 99999999999",
    "Pow(9, 999999999)",
    "123456789012345678901234567890",
])
def test_sympy_expression_injection_is_refused(good, tmp_path, evil):
    marker = tmp_path / "pwned"
    text = zipfile.ZipFile(good).read(f"{_root(good)}/models/model.json").decode()
    assert "expr_str" in text

    def inject(model):
        _first_expr(model)["expr_str"] = evil.format(marker=marker)

    bad = tmp_path / "expr.pt2"
    rewrite_archive(good, bad, replace={"models/model.json": edit_json(inject)})
    _assert_refused(bad, "symbolic size expression")
    assert not marker.exists()


def test_guard_code_is_stripped(good, tmp_path):
    marker = tmp_path / "pwned"

    def inject(model):
        model["guards_code"] = [f"__import__('os').system('touch {marker}')"]

    path = tmp_path / "guards.pt2"
    rewrite_archive(good, path, replace={"models/model.json": edit_json(inject)})
    module, example_inputs = load_model(path)
    module(*example_inputs)
    assert not marker.exists()


def test_non_aten_node_target_is_refused(good, tmp_path):
    def retarget(model):
        model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.load"

    bad = tmp_path / "target.pt2"
    rewrite_archive(good, bad, replace={"models/model.json": edit_json(retarget)})
    _assert_refused(bad, "only ATen operators")


def test_use_pickle_true_is_refused(good, tmp_path):
    def flag(config):
        next(iter(config["config"].values()))["use_pickle"] = True

    bad = tmp_path / "pickled.pt2"
    rewrite_archive(good, bad, replace={"model_weights_config.json": edit_json(flag)})
    _assert_refused(bad, "use_pickle")


def test_member_size_mismatch_is_refused(good, tmp_path):
    bad = tmp_path / "short.pt2"
    rewrite_archive(good, bad, replace={"data/weights/weight_0": lambda data: data[:-4]})
    _assert_refused(bad, "tensor_meta needs")


@pytest.mark.parametrize("member", ["extra/notes.txt", "data/constants/custom_obj_0",
                                    "data/constants/model.pt", "../escape"])
def test_unexpected_member_is_refused(good, tmp_path, member):
    bad = tmp_path / "extra.pt2"
    rewrite_archive(good, bad, add={member: b"x"})
    _assert_refused(bad, "unexpected member|two roots")


def test_zip_bomb_member_is_refused(good, tmp_path):
    bad = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data/weights/weight_0"):
                data = bytes(16 * 2**20)  # 16 MiB of zeros deflate ~1000:1
            zout.writestr(info.filename, data)
    _assert_refused(bad, "compression ratio")


def test_total_size_and_member_limits(good):
    _assert_refused(good, "expand to", limits=IntakeLimits(max_total_bytes=1000))
    _assert_refused(good, "members", limits=IntakeLimits(max_members=3))
    _assert_refused(good, "parameters, more than the limit", max_params=100)
    _assert_refused(good, "elements, more than the limit", limits=IntakeLimits(max_activation_numel=10))
    _assert_refused(good, "stored elements", limits=IntakeLimits(max_state_numel=10))


def test_absurd_size_argument_is_refused(tmp_path):
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, stride=2)).eval()
    save_model(conv, (torch.randn(2, 1, 8, 8),), tmp_path / "conv.pt2")

    def enlarge(model):
        _first_key(model, "as_ints")["as_ints"] = [100_000, 100_000, 100]

    bad = tmp_path / "huge.pt2"
    rewrite_archive(tmp_path / "conv.pt2", bad, replace={"models/model.json": edit_json(enlarge)})
    _assert_refused(bad, "describes more than")


def test_truncated_random_empty_and_plain_pickle(good, tmp_path):
    data = good.read_bytes()
    cases = {
        "truncated.pt2": data[: len(data) // 2],
        "random.pt2": os.urandom(4096),
        "empty.pt2": b"",
        "pickle.pt2": pickle.dumps({"weight": [1.0, 2.0]}),
        "torchsave.pt2": torch_saved({"weight": torch.ones(3)}),
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ModelFormatError) as info:
            load_model(path)
        assert "invalid .pt2 archive" in str(info.value), name


def test_nan_weights_are_refused(tmp_path):
    model = seeded(SmallMLP())
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    save_model(model, (torch.randn(2, 20),), tmp_path / "nan.pt2")
    _assert_refused(tmp_path / "nan.pt2", "fc2.weight.*NaN")


def test_graph_without_tensor_input_is_refused(tmp_path):
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self):
            return self.w * 2

    program = torch.export.export(Constant(), ())
    torch.export.save(program, tmp_path / "const.pt2")
    _assert_refused(tmp_path / "const.pt2", "no tensor input")


def test_suffix_and_missing_file(tmp_path):
    _assert_refused(tmp_path / "model.pth", "suffix")
    _assert_refused(tmp_path / "missing.pt2", "cannot read")
    with pytest.raises(ModelFormatError, match="suffix"):
        save_model(SmallMLP(), (torch.randn(2, 20),), tmp_path / "model.pkl")


def test_every_error_is_a_metaprune_error(good, tmp_path):
    # a config that is not JSON at all
    bad = tmp_path / "json.pt2"
    rewrite_archive(good, bad, replace={"model_weights_config.json": b"{not json"})
    with pytest.raises(MetaPruneError, match="not valid JSON"):
        load_model(bad)


def _root(path):
    return zipfile.ZipFile(path).namelist()[0].split("/")[0]


def _first_key(obj, key):
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError(f"no {key!r} in model.json")


def _first_expr(obj):
    return _first_key(obj, "expr_str")


def test_fixture_archive_is_what_torch_writes(good):
    names = {n.split("/", 1)[1] for n in zipfile.ZipFile(good).namelist()}
    assert {"models/model.json", "data/sample_inputs/model.pt",
            "data/weights/model_weights_config.json"} <= names
    config = json.loads(zipfile.ZipFile(good).read(f"{_root(good)}/data/weights/model_weights_config.json"))
    assert all(entry["use_pickle"] is False for entry in config["config"].values())


def _mutate(obj, rng):
    """Replace one random value somewhere in a JSON document with a value of another shape."""
    places, stack = [], [obj]
    while stack:
        item = stack.pop()
        keys = item.keys() if isinstance(item, dict) else range(len(item)) if isinstance(item, list) else ()
        for key in keys:
            places.append((item, key))
            stack.append(item[key])
    holder, key = rng.choice(places)
    holder[key] = rng.choice([None, -1, 0, 10**12, "x", [], {}, True, 3.5, [1, 2, 3],
                              "torch.ops.aten.add.Tensor"])


def test_mutated_metadata_never_leaks_a_raw_exception(good, tmp_path):
    import random

    rng = random.Random(0)
    members = ["models/model.json", "model_weights_config.json", "model_constants_config.json"]
    for attempt in range(30):
        path = tmp_path / f"mutant{attempt}.pt2"

        def mutate(obj):
            _mutate(obj, rng)

        rewrite_archive(good, path, replace={rng.choice(members): edit_json(mutate)})
        try:
            module, example_inputs = load_model(path)
            module(*example_inputs)  # a harmless mutation (e.g. metadata) still gives a model
        except MetaPruneError:
            pass


def test_missing_sample_inputs_are_rebuilt_from_input_specs(good, tmp_path):
    path = tmp_path / "no_samples.pt2"
    rewrite_archive(good, path, drop=("data/sample_inputs/model.pt",))
    module, example_inputs = load_model(path)
    assert len(example_inputs) == 1 and example_inputs[0].shape == (2, 20)  # batch from the size hint
    assert example_inputs[0].dtype == torch.float32
    assert module(*example_inputs).shape == (2, 4)
