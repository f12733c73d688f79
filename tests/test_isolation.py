"""The test suite writes nothing into the user's run index: every fixture, whatever its scope, sees an index
of the test session (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def module_index():
    """What a module fixture (a run made once for several tests) would record its runs in."""
    from qreason.pipeline.plan import default_index

    return default_index().path


def test_a_module_fixture_records_runs_in_the_sessions_index(module_index, tmp_path_factory):
    base = tmp_path_factory.getbasetemp().resolve()
    assert module_index.resolve().is_relative_to(base), module_index


def test_a_test_records_runs_in_its_own_index(tmp_path):
    from qreason.pipeline.plan import default_index

    assert default_index().path.resolve().is_relative_to(tmp_path.resolve())
