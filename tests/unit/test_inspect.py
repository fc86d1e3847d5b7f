"""Pure parts of the inspection CLI: filtering and formatting of flow records, errors."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from agent.cli import main
from agent.inspect import flow_rows, human_age, human_bytes

FLOWS: list[dict[str, Any]] = [
    {"source_pod": "shop/frontend", "destination_pod": "shop/backend", "verdict": "allow",
     "bytes_sent": 2048, "bytes_received": 10, "rtt_us": 1500, "age_seconds": 75,
     "source_identity": "spiffe://cluster.local/ns/shop/sa/frontend", "security": "mutual_tls"},
    {"source_pod": "legacy/client", "destination_pod": "shop/backend", "verdict": "deny",
     "policy": "shop/allow-frontend", "security": "none"},
]


def ns(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"denied": False, "pod": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_flow_rows_format_and_filter() -> None:
    rows = flow_rows(FLOWS, ns())
    assert rows[0]["sent"] == "2.0KiB" and rows[0]["rtt"] == "1.50ms" and rows[0]["age"] == "1m"
    assert [r["source"] for r in flow_rows(FLOWS, ns(denied=True))] == ["legacy/client"]
    assert [r["source"] for r in flow_rows(FLOWS, ns(pod="shop/frontend"))] == ["shop/frontend"]
    assert len(flow_rows(FLOWS, ns(pod="shop/backend"))) == 2


def test_humanize() -> None:
    assert human_bytes(512) == "512B" and human_bytes(3 * 1024 * 1024) == "3.0MiB"
    assert human_bytes(None) == "-" and human_age(7200) == "2.0h" and human_age("x") == "-"


def test_policy_check_rejects_malformed_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", "--from", "shop", "--to", "shop/backend:80"]) == 1
    assert "--from NS/SERVICEACCOUNT --to NS/POD:PORT" in capsys.readouterr().err


def test_unreachable_agent_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    # nothing listens on the agent's admin port of this test machine's loopback
    status = main(["flows"])
    err = capsys.readouterr().err
    if status == 0:
        pytest.skip("an ambit agent is running on this machine")
    assert status == 1 and "cannot reach the agent admin endpoint" in err
