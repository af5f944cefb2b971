import os

import pytest
import torch

from ttalign.testing import get_tiny_components


@pytest.fixture(autouse=True)
def _threads():
    # one thread a pytest-xdist worker (`make test` runs one a core); in a serial run TTALIGN_TEST_THREADS=1 leaves the
    # other core to a job running beside the tests
    default = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
    torch.set_num_threads(int(os.environ.get("TTALIGN_TEST_THREADS", default)))


@pytest.fixture(scope="session")
def tiny_components():
    """Tiny seeded components shared by the session; tests must not modify them (the hook system restores them)."""
    return get_tiny_components()


@pytest.fixture
def pipes(tiny_components):
    """A diffusers `StableDiffusionPipeline` and an `AlignedStableDiffusionPipeline` on the very same modules."""
    from diffusers import StableDiffusionPipeline

    from ttalign import AlignedStableDiffusionPipeline

    reference = StableDiffusionPipeline(**tiny_components)
    aligned = AlignedStableDiffusionPipeline.from_pipe(reference)
    for pipe in (reference, aligned):
        pipe.set_progress_bar_config(disable=True)
    return reference, aligned
