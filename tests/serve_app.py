"""`ttalign serve` in a process of its own, with test methods registered that misbehave on purpose:

- `fail_on:word=boom` raises a RuntimeError at the output stage when the prompt contains the word (after processors
  were installed, so the test also sees that the pipeline is restored);
- `oom_above:images=1` raises `torch.OutOfMemoryError` in a call of more images, holding a tensor in its frame; a call
  that starts while the tensor of the last failure is still alive raises a RuntimeError (the worker must free it);
- `hang:seconds=3` sleeps at the first step of a call without a denoiser evaluation (a stuck call);
- `die` raises SystemExit in the worker's thread (a dead worker).

Usage: `python tests/serve_app.py [ttalign serve arguments]`.
"""

import sys
import time
import weakref
from dataclasses import dataclass

import torch

from ttalign.cli import main
from ttalign.hooks import AlignmentMethod, Stage
from ttalign.methods import METHODS
from ttalign.serve.policy import REQUEST_OPTIONS, Choice, Float, Int


@dataclass(eq=False)
class FailOn(AlignmentMethod):
    word: str = "boom"
    stages = (Stage.ATTENTION, Stage.OUTPUT)

    def on_attention(self, state):
        from ttalign.attention import attention_control

        attention_control(state)  # installs the control processors, which the pipeline must restore

    def on_output(self, state):
        if any(self.word in p for p in state.prompt):
            raise RuntimeError(f"the prompt contains {self.word!r}")


_LAST_FAILURE = [lambda: None]


@dataclass(eq=False)
class OOMAbove(AlignmentMethod):
    images: int = 1
    stages = (Stage.INIT_LATENTS,)

    def setup(self, state):
        if _LAST_FAILURE[0]() is not None:
            raise RuntimeError("the tensors of the failed call are still alive")

    def on_init_latents(self, state):
        if state.batch_size > self.images:
            held = torch.zeros(1 << 20)  # what a failed call leaves in its frames
            _LAST_FAILURE[0] = weakref.ref(held)
            raise torch.OutOfMemoryError(f"out of memory: {state.batch_size} images above {self.images}")


@dataclass(eq=False)
class Hang(AlignmentMethod):
    seconds: float = 3.0
    stages = (Stage.STEP_START,)

    def on_step_start(self, state):
        if state.step_index == 0:
            time.sleep(self.seconds)


@dataclass(eq=False)
class Die(AlignmentMethod):
    stages = (Stage.OUTPUT,)

    def on_output(self, state):
        raise SystemExit("the worker's thread ends here")


METHODS.update(fail_on=FailOn, oom_above=OOMAbove, hang=Hang, die=Die)
REQUEST_OPTIONS.update(
    fail_on={"word": Choice(("boom", "bang"))},
    oom_above={"images": Int(1, 16)},
    hang={"seconds": Float(0.0, 30.0)},
    die={},
)

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
