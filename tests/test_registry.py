"""The methods' registry: names, summaries and the one validation every entry point uses."""

import pytest

from nextrap.core.errors import NextrapError
from nextrap.core.registry import FITTED, METHODS, REGISTRY, SUMMARY, check_method, check_methods


def test_every_method_has_a_summary_and_an_implementation():
    from nextrap.methods import _modules

    assert set(METHODS) == set(_modules()) == set(SUMMARY)
    assert all(m.summary and "\n" not in m.summary for m in REGISTRY)
    for name in METHODS:  # a method that learns has the whole life cycle, the others only jump
        module = _modules()[name]
        wanted = ("jump", "fit", "save", "saved_in", "load") if name in FITTED else ("jump",)
        assert all(callable(getattr(module, f, None)) for f in wanted), name


def test_a_name_is_checked_in_one_place_with_the_option_named():
    assert check_method("auto") == "auto" and check_method("linear", auto=False) == "linear"
    with pytest.raises(NextrapError, match=r"^--jump-method nope: use one of next, .* or auto$"):
        check_method("nope", "--jump-method")
    with pytest.raises(NextrapError, match="use one of"):
        check_method("auto", auto=False)
    assert check_methods(["linear", "next"]) == ("linear", "next")
    for bad in ([], ["linear", "bogus"]):
        with pytest.raises(NextrapError, match=r"^--methods .*: choose from next, next-paper"):
            check_methods(bad)


def test_extend_help_lists_every_method_with_its_summary():
    import inspect

    from nextrap.cli.extend import extend

    text = inspect.signature(extend).parameters["method"].default.help
    assert all(f"{m.name} ({m.summary})" in text for m in REGISTRY)
