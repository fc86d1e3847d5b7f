"""Test tiers and the root rule.

Markers: `unit` (no sockets), `integration` (loopback), `netns` (root: network
namespaces, cgroups, eBPF), `e2e` (a whole local cluster). A test that needs
root skips when not root only while `CI` is unset; under `CI=true` it fails.
"""

from __future__ import annotations

import os

import pytest


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_root() -> None:
    """Call at the start of a privileged test or fixture."""
    if os.geteuid() == 0:
        return
    if _in_ci():
        pytest.fail("this test needs root, and CI is set: run the suite as root")
    pytest.skip("needs root (set CI=true to make this a failure)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        for tier in ("unit", "integration", "netns", "e2e"):
            if f"/tests/{tier}/" in path and tier not in item.keywords:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _root_for_privileged(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") or request.node.get_closest_marker("e2e"):
        require_root()
