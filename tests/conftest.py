"""Tests marked ``slow`` (the full-size sampling-exactness runs) run only when asked for by
a marker expression that names them: ``pytest -m slow``."""

import pytest


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="full size: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
