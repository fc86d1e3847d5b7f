"""The last good compiled policies on disk, so that no restart forgets them.

Whoever compiles policies (the agent for its node, a waypoint for itself) keeps
the last good version of an object whose edit is invalid
(`ambit.snapshot.build_snapshot` with the previous snapshot). Kept only in
memory, that version would be lost on a restart: an invalid edit of a STRICT
PeerAuthentication would leave the pod PERMISSIVE, an invalid edit of an ALLOW
policy would open its workload. So the compiled policies in force are written
(in the snapshot wire form) whenever they change, and a restarted process
starts from them. The agent keeps them on its node (`--state-dir`, by default
/var/lib/ambit/<node>), not in the cluster. Shared I/O: never imported by the
pure core.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from ambit.policy import CompiledPolicy, PolicySet
from ambit.snapshot import Snapshot
from ambit.wire.snapshot import POLICY, WireError, decode_policies, encode_value

log = logging.getLogger("ambit.lastgood")

FILE_NAME = "last-good-policies.json"


class LastGood:
    """Reads and writes `<dir>/last-good-policies.json`."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self._written: str | None = None

    def load(self) -> list[CompiledPolicy]:
        """The policies saved by an earlier agent; [] when there are none or they cannot be read
        (logged: the cluster's current objects then decide, as on a first start)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.error("cannot read the last good policies in %s: %s", self.path, e)
            return []
        try:
            doc = json.loads(text)
            objects = {(POLICY, str(p.get("namespace", "")), str(k)): p for k, p in doc["policies"].items()}
            policies = decode_policies(objects)
        except (ValueError, KeyError, TypeError, AttributeError, WireError) as e:
            log.error("the last good policies in %s are damaged (%s); starting from the cluster's objects",
                      self.path, e)
            return []
        self._written = text
        log.info("loaded %d last good polic%s from %s", len(policies), "y" if len(policies) == 1 else "ies",
                 self.path)
        return policies

    def seed(self, node: str, trust_domain: str, root_namespace: str) -> Snapshot:
        """An empty snapshot carrying the saved policies: the `previous` of the first build."""
        empty = Snapshot.empty(node, trust_domain, root_namespace)
        return dataclasses.replace(empty, policies=PolicySet.build(self.load(), root_namespace=root_namespace))

    def save(self, snap: Snapshot) -> bool:
        """Write the snapshot's policies if they changed since the last write; True when written.
        Atomic (a temporary file renamed over the old one), so a crash leaves one or the other."""
        policies = {p.key: encode_value(p) for p in snap.policies.compiled}
        text = json.dumps({"node": snap.node, "policies": policies}, sort_keys=True)
        if text == self._written:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._written = text
        return True
