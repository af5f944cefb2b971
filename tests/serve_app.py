"""`ttalign serve` in a process of its own, with one test method registered that fails on purpose: `fail_on:word=x`
raises a RuntimeError at the output stage when the prompt contains `x` (after processors were installed, so the test
also sees that the pipeline is restored). Usage: `python tests/serve_app.py [ttalign serve arguments]`."""

import sys
from dataclasses import dataclass

from ttalign.cli import main
from ttalign.hooks import AlignmentMethod, Stage
from ttalign.methods import METHODS


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


METHODS["fail_on"] = FailOn

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
