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


# Test modules (or single tests, "module::test") that start Ray clusters, gRPC servers with
# worker processes, or train for several epochs. `make test` (CI) runs everything;
# `make test-fast` (`-m "not slow"`) skips these for the inner loop. Tests may also carry
# `@pytest.mark.slow` themselves.
SLOW = {
    "test_bench_metanet", "test_corpus", "test_metanet_default", "test_metanet_eval",
    "test_metatrain", "test_policy_head", "test_prune_finetune", "test_ray_token",
    "test_serving_auth", "test_serving_e2e", "test_serving_hostile", "test_serving_load",
    "test_serving_node", "test_serving_ray", "test_serving_restart", "test_serving_storage",
    "test_serving_streams",
    "test_tune::test_cli_tune_runs_trials_on_ray_and_writes_a_recipe_that_applies",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem
        if module in SLOW or f"{module}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
