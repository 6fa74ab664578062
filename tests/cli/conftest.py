"""Fixtures of the CLI tests."""

import pytest

from cli.helpers import cached_default_model


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> str:
    return cached_default_model(tmp_path_factory)
