"""Shared test set-up: a private cache folder, so tests never touch the user's cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never touch the user's cache; datasets generated offline land here once per run."""
    if "METAPRUNE_CACHE" not in os.environ:
        os.environ["METAPRUNE_CACHE"] = str(tmp_path_factory.mktemp("metaprune-cache"))
    yield
