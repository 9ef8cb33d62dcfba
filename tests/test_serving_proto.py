"""The committed stubs are exactly what proto/ generates (the proto is the source of truth)."""

from pathlib import Path

from metaprune.serving import generate_stubs


def test_committed_stubs_match_the_proto(tmp_path):
    for generated in generate_stubs.generate(tmp_path):
        committed = Path(generate_stubs.__file__).parent / generated.name
        assert committed.read_text() == generated.read_text(), f"run `make proto`: {generated.name} is stale"


def test_stub_imports_are_package_relative():
    text = (Path(generate_stubs.__file__).parent / "pruning_pb2_grpc.py").read_text()
    assert "from . import pruning_pb2" in text and "from metaprune.v1" not in text
