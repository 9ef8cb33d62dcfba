"""A plain in-process prune stays light (issue #15 item 4): `metaprune prune tiny.pt2 --out
x.pt2 --speedup 2` writes its chart without importing matplotlib, and a classic criterion never
imports torch-geometric (only the metanetwork needs it). Timings live in `metaprune bench
startup`; this test asserts what is imported."""

import subprocess
import sys

import torch

import metaprune
from metaprune import zoo

CHECK = """
import sys
from metaprune.cli.main import main
assert main(["prune", "tiny.pt2", "--out", "x.pt2", "--speedup", "2"]) == 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"matplotlib", "torch_geometric"})
assert not heavy, f"a plain prune imported {heavy}"
"""


def test_a_plain_prune_imports_neither_matplotlib_nor_torch_geometric(tmp_path):
    """Before: the chart imported matplotlib (~0.5-1 s), and the engine torch-geometric (~3 s)."""
    torch.manual_seed(0)
    model = zoo.build("cnn1d", {"input_shape": [1, 40], "num_classes": 10,
                                "widths": [32, 64, 64]})  # the model of `bench startup`
    metaprune.save_model(model.eval(), (torch.randn(2, 1, 40),), tmp_path / "tiny.pt2")
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    png = (tmp_path / "x.sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "x.report.json").is_file()
