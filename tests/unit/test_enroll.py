"""enroll.plan: a table of desired/actual pairs and the actions they must produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.enroll import (
    Action,
    Actual,
    Annotate,
    Attach,
    Desired,
    Detach,
    Forget,
    Retry,
    WriteSettings,
    plan,
)

CG = Path("/cg/pod")
CG2 = Path("/cg/pod-new")


def d(**kw: object) -> Desired:
    base: dict[str, object] = dict(key="ns/p", ip="10.1.0.2", cgroup=CG, enrolled=True)
    base.update(kw)
    return Desired(**base)  # type: ignore[arg-type]


def a(**kw: object) -> Actual:
    base: dict[str, object] = dict(
        key="ns/p", cgroup=CG, cgroup_ids=(7,), ip="10.1.0.2", attached=True, enrolled=True,
        mode="PERMISSIVE", port_exceptions=(),
    )
    base.update(kw)
    return Actual(**base)  # type: ignore[arg-type]


W = WriteSettings
CASES: list[tuple[str, Desired | None, Actual | None, list[Action]]] = [
    ("new enrolled pod", d(), None,
     [W("ns/p", CG, "10.1.0.2", True, "PERMISSIVE", ()), Attach("ns/p", CG), Annotate("ns/p", "enabled")]),
    ("in sync", d(annotated=True), a(), []),
    ("in sync, annotation missing", d(), a(), [Annotate("ns/p", "enabled")]),
    ("no cgroup yet", d(cgroup=None), None, [Retry("ns/p", "the pod's cgroup does not exist yet")]),
    ("no IP yet: redirect outbound, retry for inbound", d(ip=None), None,
     [W("ns/p", CG, None, True, "PERMISSIVE", ()), Attach("ns/p", CG),
      Retry("ns/p", "the pod has no IP yet: inbound capture waits for it")]),
    ("mode changes to STRICT", d(mode="STRICT", annotated=True), a(),
     [W("ns/p", CG, "10.1.0.2", True, "STRICT", ())]),
    ("exceptions change", d(port_exceptions=(53,), annotated=True), a(),
     [W("ns/p", CG, "10.1.0.2", True, "PERMISSIVE", (53,))]),
    ("detached by someone: reattach", d(annotated=True), a(attached=False), [Attach("ns/p", CG)]),
    ("unenrolled by label", d(enrolled=False, annotated=True), a(),
     [W("ns/p", CG, "10.1.0.2", False, "PERMISSIVE", ()), Detach("ns/p", CG), Forget("ns/p", (7,), "10.1.0.2"),
      Annotate("ns/p", None)]),
    ("pod deleted", None, a(),
     [W("ns/p", CG, "10.1.0.2", False, "PERMISSIVE", ()), Detach("ns/p", CG), Forget("ns/p", (7,), "10.1.0.2")]),
    ("never enrolled", d(enrolled=False), None, []),
    ("IP changed: forget the old one", d(ip="10.1.0.9", annotated=True), a(),
     [W("ns/p", CG, "10.1.0.9", True, "PERMISSIVE", ()), Forget("ns/p", (), "10.1.0.2")]),
    ("recreated under a new cgroup: new first, then old away", d(cgroup=CG2, annotated=True), a(),
     [W("ns/p", CG2, "10.1.0.2", True, "PERMISSIVE", ()), Attach("ns/p", CG2),
      Detach("ns/p", CG), Forget("ns/p", (7,), None)]),
]


@pytest.mark.parametrize(("name", "desired", "actual", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plan(name: str, desired: Desired | None, actual: Actual | None, expected: list[Action]) -> None:
    got = plan({"ns/p": desired} if desired else {}, {"ns/p": actual} if actual else {})
    assert got == expected


def test_unenroll_order_clears_flag_before_detaching() -> None:
    acts = plan({}, {"ns/p": a()})
    kinds = [type(x).__name__ for x in acts]
    assert kinds.index("WriteSettings") < kinds.index("Detach") < kinds.index("Forget")


def test_many_pods_sorted_and_independent() -> None:
    desired = {"b/x": d(key="b/x", annotated=True), "a/y": d(key="a/y", cgroup=None)}
    actual = {"b/x": a(key="b/x")}
    assert plan(desired, actual) == [Retry("a/y", "the pod's cgroup does not exist yet")]
