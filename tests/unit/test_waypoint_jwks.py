"""The waypoint's JWK Set files (`jwksUri: file://...`): read, re-read on change, refused when unsafe."""

from __future__ import annotations

import json
import os
from pathlib import Path

from joserfc.jwk import ECKey

from ambit.policy import JwtRule
from waypoint import jwks as jwks_mod
from waypoint.jwks import JwksFiles

KEY = ECKey.generate_key("P-256", parameters={"kid": "k1"})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rule(path: Path) -> JwtRule:
    return JwtRule(policy="ns/ra", index=0, issuer="https://idp", jwks_uri=f"file://{path}", jwks_path=str(path))


def write_set(path: Path, *keys: ECKey) -> None:
    path.write_text(json.dumps({"keys": [k.as_dict(private=False) for k in keys]}))


def test_reads_the_file_and_picks_up_a_replacement(tmp_path: Path) -> None:
    f = tmp_path / "idp.json"
    write_set(f, KEY)
    clock = Clock()
    files = JwksFiles(clock)
    got = files.resolve(rule(f))
    assert got is not None and [k.kid for k in got.keys] == ["k1"]
    f.write_text("not json")
    os.utime(f, (1, 1))  # a new mtime
    assert files.resolve(rule(f)) is got  # not looked at again within RECHECK
    clock.now += jwks_mod.RECHECK
    assert files.resolve(rule(f)) is None  # unusable now: its tokens are refused


def test_a_missing_file_gives_no_keys(tmp_path: Path) -> None:
    assert JwksFiles(Clock()).resolve(rule(tmp_path / "absent.json")) is None


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "jwks.fifo"
    os.mkfifo(fifo)
    assert JwksFiles(Clock()).resolve(rule(fifo)) is None  # returns at once: nothing opened it


def test_a_device_is_not_read() -> None:
    assert JwksFiles(Clock()).resolve(rule(Path("/dev/zero"))) is None


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "big.json"
    doc = json.dumps({"keys": [KEY.as_dict(private=False)]})
    f.write_text(doc + " " * (jwks_mod.MAX_BYTES + 1 - len(doc)))
    assert JwksFiles(Clock()).resolve(rule(f)) is None
