"""The aligned `__call__`s are copies of diffusers' parents: each records the parent's source fingerprint, and this
test fails, saying what to re-check, when the installed diffusers' parent differs from the one it mirrors."""

import pytest

from ttalign.pipelines import FAMILIES


@pytest.mark.parametrize("key", list(FAMILIES))
def test_each_copy_mirrors_the_installed_parent(key):
    parent, aligned = FAMILIES[key].pipeline_class, FAMILIES[key].aligned_class
    assert aligned.parent_call is not None, f"{aligned.__name__} records no parent_call"
    problem = aligned.parent_call.changed(parent, aligned)
    assert problem is None, problem


def test_a_changed_parent_is_reported_with_what_to_do():
    from diffusers import StableDiffusionPipeline

    from ttalign.pipelines import AlignedStableDiffusionPipeline
    from ttalign.pipelines.base import ParentCall

    stale = ParentCall("0.40.0", "0" * 64)
    message = stale.changed(StableDiffusionPipeline, AlignedStableDiffusionPipeline)
    assert "StableDiffusionPipeline.__call__ is not the one AlignedStableDiffusionPipeline.__call__ mirrors" in message
    assert "(diffusers 0.40.0)" in message and ParentCall.fingerprint(StableDiffusionPipeline) in message
