"""The name -> function Registry behind every algorithm family."""

import pytest

from rlhf.algo import Registry, UnknownNameError


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    reg.register("a")(lambda: 1)
    assert reg.get("b") is b and reg.get("a")() == 1
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg


def test_unknown_name_is_a_key_error_listing_known_names():
    reg = Registry("widget")
    reg.register("x")(print)
    reg.register("y")(print)
    with pytest.raises(UnknownNameError) as err:
        reg.get("z")
    assert isinstance(err.value, KeyError)
    assert str(err.value) == "unknown widget 'z'; known: x, y"


def test_registering_a_name_twice_is_an_error():
    reg = Registry("widget")
    reg.register("x")(print)
    with pytest.raises(ValueError, match="widget 'x' is already registered"):
        reg.register("x")(repr)
