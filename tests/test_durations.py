"""One reading of durations for every option that takes one: optimize's --time-budget, loadtest's --duration, drift's --window."""
import pytest

from compress.durations import seconds
from compress.drift_check import parse_window
from compress.errors import CompressError
from compress.loadtest import parse_duration


@pytest.mark.parametrize("text,value", [("90", 90), ("90s", 90), ("500ms", 0.5), ("20m", 1200), ("20min", 1200), ("1.5h", 5400),
                                        ("1d", 86400), (" 2 H ", 7200), (".5s", 0.5)])
def test_durations_read_as_people_write_them(text, value):
    assert seconds(text) == pytest.approx(value)
    assert parse_duration(text) == parse_window(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["soon", "", "1y", "-5s", "m", "5 s s"])
def test_what_is_not_a_duration_is_refused_in_each_callers_words(text):
    with pytest.raises(ValueError, match="is not a duration"):
        seconds(text)
    with pytest.raises(CompressError, match=r"is not a duration.*") as info:
        parse_duration(text)
    assert "500ms" in info.value.fix
    with pytest.raises(CompressError, match=r"--window '.*' is not a duration"):
        parse_window(text)


def test_zero_is_no_window_and_no_load():
    with pytest.raises(CompressError, match="must be positive"):
        parse_duration("0s")
    with pytest.raises(CompressError, match="is not a duration"):
        parse_window("0h")
