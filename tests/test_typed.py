"""One reading of option and recipe values (`hf.typed.coerce`) and one check of mixer option names."""

import pytest

from linearize import LinearizeError
from linearize.hf.mixers import check_option_names
from linearize.hf.typed import coerce

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    "value, hint, expected",
    [
        ("4", int, 4),
        (4, float, 4.0),
        ("1e-4", float, 1e-4),
        ("yes", bool, True),
        ("0", bool, False),
        ("none", int | None, None),
        ("none", str | None, "none"),
        (None, str | None, None),
        ([1, "2"], list[int], [1, 2]),
        ({"a": 1}, dict[str, int], {"a": 1}),
    ],
)
def test_values_are_read_as_the_declared_type(value, hint, expected):
    got = coerce(value, hint, "x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value, hint, message",
    [
        ("four", int, "x must be a int, got 'four'"),
        (True, int, "x must be a int, got True"),
        ("maybe", bool, "x must be true or false, got 'maybe'"),
        (3, str, "x must be a str, got 3"),
        (None, int, "x must be a int, got None"),
        ("a", list[int], "x must be a list, got 'a'"),
        ([1, "b"], list[int], "x[1] must be a int, got 'b'"),
        ([1], dict[str, int], "x must be a mapping, got [1]"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(value, hint, message):
    with pytest.raises(LinearizeError) as info:
        coerce(value, hint, "x")
    assert str(info.value) == message


def test_option_names_are_checked_against_the_mixer():
    check_option_names("gla", {"window": 4, "gate_normalizer": 8})
    with pytest.raises(LinearizeError) as info:
        check_option_names("gla", {"windw": 4, "d_state": 16})
    assert str(info.value) == "mixer 'gla' does not take option(s) d_state, windw; it takes: gate_normalizer, window"
    with pytest.raises(LinearizeError, match="it takes: no options"):
        check_option_names("attention", {"window": 4})
    with pytest.raises(LinearizeError, match="unknown mixer 'glaa'; did you mean 'gla'?"):
        check_option_names("glaa", {})
