"""The rule for privileged tests: skip when not root only while CI is unset; fail under CI=true."""

from __future__ import annotations

import pytest

from tests.conftest import require_root


def test_not_root_without_ci_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_root()


@pytest.mark.parametrize("value", ["true", "1", "yes"])
def test_not_root_under_ci_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        require_root()


def test_root_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setenv("CI", "true")
    require_root()  # neither skips nor fails
