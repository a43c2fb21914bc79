"""GUI test fixtures: a throw-away settings file per test, so nothing touches the user's."""

from __future__ import annotations

import pytest

from app.__main__ import SETTINGS_ENV, make_settings


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path, monkeypatch):
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "settings.ini"))


@pytest.fixture
def settings(tmp_path):
    return make_settings(str(tmp_path / "settings.ini"))
