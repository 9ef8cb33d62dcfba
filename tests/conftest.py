"""Shared test set-up: a private cache folder, so tests never touch the user's cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's cache; datasets generated offline land here once per run."""
    if "METAPRUNE_CACHE" not in os.environ:
        os.environ["METAPRUNE_CACHE"] = str(tmp_path_factory.mktemp("metaprune-cache"))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run many small ops: on a shared 2-core machine, one torch thread is several
    times faster than two fighting for it. Use with ``pytestmark = pytest.mark.usefixtures``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
