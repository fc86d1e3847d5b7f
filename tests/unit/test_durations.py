"""ambit.durations: the one grammar of durations in flags, Gateway API specs and the mesh config."""

from __future__ import annotations

import pytest

from ambit.durations import parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("500ms", 0.5), ("1h30m", 5400.0), ("1.5s", 1.5), ("2d", 172800.0), ("30", 30.0),
    (" 10s ", 10.0), ("1m1s1ms", 61.001),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10", "1.5s", "1d", "123456s", "1h1h1h1h1h", " 10s", "10s\n"])
def test_gateway_api_form_is_strict(text: str) -> None:
    # GEP-2257: whole numbers of at most five digits, a unit always, at most four parts, no days
    with pytest.raises(ValueError, match="Gateway API duration"):
        parse_duration(text, strict=True)


@pytest.mark.parametrize("text", ["", "10x", "s10", "10s junk", "-5s", None, 5])
def test_bad_durations_name_the_input(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_strict_accepts_what_the_api_server_does() -> None:
    assert parse_duration("1h30m10s500ms", strict=True) == pytest.approx(5410.5)


def test_a_flag_too_long_is_an_error_naming_it_not_a_traceback() -> None:
    import argparse

    from ambit.args import duration

    assert duration("1h30m").total_seconds() == 5400
    for bad in ("99999999999d", "9" * 400, "0s", "soon"):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            duration(bad)
        assert bad[:10] in str(e.value)
