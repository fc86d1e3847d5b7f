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
    KernelPod,
    Retry,
    WriteSettings,
    adopt,
    orphans,
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


def kp(**kw: object) -> KernelPod:
    base: dict[str, object] = dict(cgroup_id=7, enrolled=True, mode="STRICT", port_exceptions=(), ip="10.1.0.2",
                                   port_modes=((8080, "PERMISSIVE"),), attached=True)
    base.update(kw)
    return KernelPod(**base)  # type: ignore[arg-type]


def test_a_restarted_agent_adopts_the_kernels_state() -> None:
    got = adopt({"ns/p": d()}, {"ns/p": 7}, {7: kp()})
    assert got == {"ns/p": a(mode="STRICT", port_modes=((8080, "PERMISSIVE"),))}
    # nothing to adopt: no cgroup yet, no kernel entry, or another cgroup's entry
    assert adopt({"ns/p": d(cgroup=None)}, {}, {7: kp()}) == {}
    assert adopt({"ns/p": d()}, {"ns/p": 8}, {7: kp()}) == {}


def test_a_label_removed_while_no_agent_ran_is_unenrolled_after_adoption() -> None:
    actual = adopt({"ns/p": d(enrolled=False)}, {"ns/p": 7}, {7: kp()})
    acts = plan({"ns/p": d(enrolled=False)}, actual)
    assert acts[0] == WriteSettings("ns/p", CG, "10.1.0.2", False, "STRICT", (), ((8080, "PERMISSIVE"),))
    assert Detach("ns/p", CG) in acts and Forget("ns/p", (7,), "10.1.0.2") in acts


def test_orphans_are_kernel_entries_of_pods_that_are_gone() -> None:
    actual = {"ns/p": a()}
    # a pod deleted while no agent ran: its cgroup entry and its address
    assert orphans(actual, [7, 9], {"10.1.0.2": 7, "10.1.0.9": 9}) == [
        Forget("orphan/cgroup-9", (9,), None), Forget("orphan/10.1.0.9", (), "10.1.0.9")]
    # a live pod whose address changed: the old address goes, never the live pod's cgroup entry
    assert orphans({"ns/p": a(ip="10.1.0.3")}, [7], {"10.1.0.2": 7, "10.1.0.3": 7}) == [
        Forget("orphan/10.1.0.2", (), "10.1.0.2")]
    assert orphans(actual, [7], {"10.1.0.2": 7}) == []
