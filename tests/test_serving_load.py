"""16 concurrent clients each prune a small model: all succeed, and the server process (which
never imports torch; workers do) stays under 1 GiB resident memory throughout."""

import subprocess
import sys

import pytest

from metaprune.serving.load_bench import run_load

pytestmark = pytest.mark.timeout(300)


def test_sixteen_concurrent_clients(tmp_path):
    # safetensors keeps each job short (no torch.export); the benchmark also runs .pt2
    figures = run_load(tmp_path, clients=16, workers=2, suffix=".safetensors")
    assert figures["succeeded"] == 16
    assert figures["server_peak_rss_mib"] < 1024, figures


def test_server_modules_do_not_import_torch():
    # the server process leaves torch to the workers (other CLI modules may still load it)
    code = ("import sys, metaprune.serving.server, metaprune.serving.client;"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'numpy', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
