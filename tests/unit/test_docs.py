"""The docs name the tests behind their claims (docs/security.md): every test they name exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_the_threat_model_names_exists() -> None:
    text = (REPO / "docs" / "security.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`", text)
    assert refs, "docs/security.md names no tests"
    current = ""
    for path, name, bare in refs:
        if path:
            current = path
            assert (REPO / path).is_file(), f"docs/security.md names {path}, which does not exist"
        name = name or bare
        if name:
            assert current, f"::{name} follows no test file"
            assert re.search(rf"^(async )?def {name}\(", (REPO / current).read_text(), re.M), \
                f"docs/security.md names {current}::{name}, which does not exist"
