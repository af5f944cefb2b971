"""Property tests of the `NAME:key=value,...` method specs that the command line and the server share: any spec
builds a method or raises a one-line ValueError, never another exception."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttalign.hooks import AlignmentMethod
from ttalign.methods import METHODS, method_from_spec

VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "shapes_soft",
            "jpeg_compressibility",
            "nope",
            "@os:system",
            "@math:inf",
            "true",
            "no",
            "16x16",
            "0:0.05;10:0.5",
            "1:2:3",
            "nan",
            "inf",
            "-1",
            "0",
            "1e400",
            "cat+dog",
            "x;y",
        ]
    ),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True).map(str),
)


def _options(name):
    import dataclasses

    keys = [f.name for f in dataclasses.fields(METHODS[name]) if f.init] + ["bogus"]
    return st.lists(st.tuples(st.sampled_from(keys), VALUES), max_size=4)


SPECS = st.one_of(
    st.text(max_size=60),
    st.sampled_from(sorted(METHODS)).flatmap(
        lambda name: _options(name).map(
            lambda opts: name + (":" + ",".join(f"{k}={v}" for k, v in opts) if opts else "")
        )
    ),
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub reward named in a spec fails at once


@settings(max_examples=400, deadline=None)
@given(SPECS)
def test_any_spec_builds_a_method_or_raises_a_one_line_value_error(spec):
    for allow_imports in (False, True):
        try:
            method = method_from_spec(spec, allow_imports=allow_imports and "@os:" not in spec)
        except ValueError as err:
            assert str(err) and "\n" not in str(err)
        else:
            assert isinstance(method, AlignmentMethod)


def test_requests_cannot_import_and_names_are_limited():
    with pytest.raises(ValueError, match="`@module:attribute` values are not accepted"):
        method_from_spec("attend_and_excite:tokens=@ttalign.shapes.world:subject_words", allow_imports=False)
    assert method_from_spec("attend_and_excite:tokens=@ttalign.shapes.world:subject_words").tokens.__name__ == (
        "subject_words"
    )
    with pytest.raises(ValueError, match="'seed_search' is not allowed here; allowed: best_of_n"):
        method_from_spec("seed_search:reward=shapes_soft", allowed={"best_of_n"})
    with pytest.raises(ValueError, match="given twice"):
        method_from_spec("best_of_n:n=2,n=3,reward=shapes_soft")
    with pytest.raises(ValueError, match="token_indices must be token positions"):
        method_from_spec("attend_and_excite:token_indices=abc")


def test_an_option_that_is_a_switch_or_a_mode_takes_either():
    """`NoiseOptimization.gradient_checkpointing` is `bool | str`: on / off words give the bool, a mode its word."""
    spec = "noise_optimization:reward=shapes_soft,gradient_checkpointing="
    assert method_from_spec(spec + "false").gradient_checkpointing is False
    assert method_from_spec(spec + "yes").gradient_checkpointing is True
    assert method_from_spec(spec + "blocks").gradient_checkpointing == "blocks"
    with pytest.raises(ValueError, match="gradient_checkpointing must be True, False or 'blocks', got 'layers'"):
        method_from_spec(spec + "layers")
    with pytest.raises(ValueError, match="Bad value 'blocks' for option 'keep_images'"):
        method_from_spec("noise_optimization:reward=shapes_soft,keep_images=blocks")
