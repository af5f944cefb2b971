"""The hook system: stage order, composition checks, and restoring components, also on error."""

from dataclasses import dataclass, field

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from ttalign.hooks import AlignmentMethod, AlignmentRunner, Stage
from ttalign.methods import BestOfN, TraceLatents


@dataclass(eq=False)
class Recorder(AlignmentMethod):
    """Records every stage it sees, in order."""

    log: list = field(default_factory=list)
    tag: str = "r"
    stages = tuple(Stage)
    allow_multiple = True

    def setup(self, state):
        self.log.append((self.tag, "setup"))

    def teardown(self, state):
        self.log.append((self.tag, "teardown"))

    def on_prompt(self, state):
        self.log.append((self.tag, "prompt"))

    def on_conditioning(self, state):
        assert state.prompt_embeds.shape[0] == state.batch_size
        self.log.append((self.tag, "conditioning"))

    def on_init_latents(self, state):
        self.log.append((self.tag, "init_latents"))

    def on_attention(self, state):
        self.log.append((self.tag, "attention"))

    def on_step_start(self, state):
        self.log.append((self.tag, f"step_start {state.step_index}"))

    def on_noise_pred(self, state):
        assert state.noise_pred.shape == state.latents.shape
        self.log.append((self.tag, f"noise_pred {state.step_index}"))

    def on_step_end(self, state):
        self.log.append((self.tag, f"step_end {state.step_index}"))

    def on_output(self, state):
        assert state.images.min() >= 0 and state.images.max() <= 1
        self.log.append((self.tag, "output"))


@dataclass(eq=False)
class Breaker(AlignmentMethod):
    """Changes every kind of component state, then raises at a chosen stage."""

    at: Stage = Stage.STEP_START
    stages = (Stage.ATTENTION, Stage.STEP_START, Stage.NOISE_PRED)

    def on_attention(self, state):
        unet = state.pipe.unet
        unet.set_attn_processor(AttnProcessor())
        unet.train()
        state.pipe.text_encoder.requires_grad_(False)
        state.pipe.vae.decoder.requires_grad_(False)
        if self.at == Stage.ATTENTION:
            raise RuntimeError("boom at attention")

    def on_step_start(self, state):
        if self.at == Stage.STEP_START:
            raise RuntimeError("boom at step_start")

    def on_noise_pred(self, state):
        if self.at == Stage.NOISE_PRED:
            raise RuntimeError("boom at noise_pred")


def test_stages_run_in_order_for_each_method(pipes):
    _, aligned = pipes
    log = []
    aligned("a cat", num_inference_steps=2, output_type="np", alignment=[Recorder(log, "a"), Recorder(log, "b")])
    stages = ["prompt", "conditioning", "attention", "init_latents"]
    for i in range(2):
        stages += [f"step_start {i}", f"noise_pred {i}", f"step_end {i}"]
    stages.append("output")
    expected = [("a", "setup"), ("b", "setup")]
    expected += [(tag, s) for s in stages for tag in ("a", "b")]
    expected += [("b", "teardown"), ("a", "teardown")]
    assert log == expected


@pytest.mark.parametrize("at", [Stage.ATTENTION, Stage.STEP_START, Stage.NOISE_PRED])
def test_components_restored_when_a_method_raises(pipes, at):
    _, aligned = pipes
    unet, text_encoder, vae = aligned.unet, aligned.text_encoder, aligned.vae
    processors = dict(unet.attn_processors)
    grads = {
        name: [p.requires_grad for p in m.parameters()]
        for name, m in aligned.components.items()
        if hasattr(m, "parameters")
    }
    modes = [m.training for m in unet.modules()]
    log = []
    with pytest.raises(RuntimeError, match="boom"):
        aligned("a cat", num_inference_steps=2, alignment=[Recorder(log), Breaker(at=at)])
    assert log[-1] == ("r", "teardown")
    now = unet.attn_processors
    assert now.keys() == processors.keys() and all(now[k] is processors[k] for k in processors)
    assert [m.training for m in unet.modules()] == modes
    for name, flags in grads.items():
        assert [p.requires_grad for p in aligned.components[name].parameters()] == flags
    assert text_encoder is aligned.text_encoder and vae is aligned.vae


def test_components_restored_after_a_successful_call(pipes):
    reference, aligned = pipes
    processors = dict(aligned.unet.attn_processors)
    aligned("a cat", num_inference_steps=2, alignment=[Breaker(at=Stage.OUTPUT)], output_type="np")
    assert all(aligned.unet.attn_processors[k] is v for k, v in processors.items())
    assert not aligned.unet.training
    # and the pipeline still gives diffusers' images afterwards
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = aligned("a cat", num_inference_steps=2, output_type="np", generator=gen()).images
    b = reference("a cat", num_inference_steps=2, output_type="np", generator=gen()).images
    assert abs(a - b).max() <= 1e-6


def test_bad_combinations_fail_before_any_compute(pipes):
    _, aligned = pipes
    calls = []
    handle = aligned.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="listed more than once"):
            aligned("a cat", num_inference_steps=2, alignment=[TraceLatents(), TraceLatents()])

        @dataclass(eq=False)
        class Enlarger(AlignmentMethod):
            stages = ()
            changes_batch = True

        with pytest.raises(ValueError, match="Only one method may enlarge the batch"):
            aligned(
                "a cat", num_inference_steps=2, alignment=[BestOfN(reward=lambda i, p: i.mean((1, 2, 3))), Enlarger()]
            )
        with pytest.raises(TypeError, match="AlignmentMethod instances"):
            aligned("a cat", num_inference_steps=2, alignment=["best_of_n"])
    finally:
        handle.remove()
    assert calls == []


def test_declared_stage_without_handler_is_refused():
    class Incomplete(AlignmentMethod):
        stages = (Stage.NOISE_PRED,)

    with pytest.raises(TypeError, match="has no on_noise_pred"):
        AlignmentRunner([Incomplete()])


def test_declared_capabilities_decide_combinations():
    """Composition reads what methods declare, never their class names: any two methods that draw the injected
    step noise are refused together, and a method that does not is not."""
    from ttalign.methods import NoiseOptimization, ParticleSteering

    def reward(images, prompts):
        return images.mean(dim=(1, 2, 3))

    reward.differentiable = True

    class OwnNoise(AlignmentMethod):
        owns_step_noise = True

    with pytest.raises(ValueError, match="OwnNoise and ParticleSteering each draw the noise"):
        AlignmentRunner([OwnNoise(), ParticleSteering(reward=reward)])
    with pytest.raises(ValueError, match="each draw the noise"):
        AlignmentRunner([OwnNoise(), NoiseOptimization(reward=reward, optimize="all-noises")])
    AlignmentRunner([OwnNoise(), NoiseOptimization(reward=reward)])  # the initial noise only


def test_method_validate_can_refuse_a_combination(pipes):
    _, aligned = pipes

    class Loner(AlignmentMethod):
        stages = ()

        def validate(self, methods):
            if len(methods) > 1:
                raise ValueError("Loner works alone")

    with pytest.raises(ValueError, match="Loner works alone"):
        aligned("a cat", num_inference_steps=2, alignment=[Loner(), TraceLatents()])


def test_methods_can_modify_tensors_at_each_stage(pipes):
    reference, aligned = pipes

    @dataclass(eq=False)
    class ZeroNoise(AlignmentMethod):
        stages = (Stage.INIT_LATENTS,)

        def on_init_latents(self, state):
            state.latents = torch.zeros_like(state.latents)

    out = aligned(
        "a cat",
        num_inference_steps=2,
        output_type="latent",
        alignment=[ZeroNoise()],
        generator=torch.Generator().manual_seed(0),
    ).images
    expected = reference(
        "a cat", num_inference_steps=2, output_type="latent", latents=torch.zeros(1, 4, 32, 32)
    ).images
    assert torch.allclose(out, expected, atol=1e-6)


def test_frozen_keeps_no_weight_inputs_and_restores_the_flags():
    from ttalign.hooks import frozen

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    net[1].weight.requires_grad_(False)  # a user's own frozen weight stays frozen
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.randn(4, 8, requires_grad=True)

    def saved_bytes():
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            y = net(x).sum()
        return sum(total), y

    trainable, y = saved_bytes()
    (expected,) = torch.autograd.grad(y, x)
    with frozen(net, None):
        assert not any(p.requires_grad for p in net.parameters())
        lean, y = saved_bytes()
        (grad,) = torch.autograd.grad(y, x)
    assert lean < trainable  # the first layer's input is not kept for its weight's gradient
    assert torch.equal(grad, expected)
    assert [p.requires_grad for p in net.parameters()] == flags
    with pytest.raises(RuntimeError, match="boom"), frozen(net):
        raise RuntimeError("boom")
    assert [p.requires_grad for p in net.parameters()] == flags


def test_block_checkpointing_switches_diffusers_blocks_and_restores_them():
    from ttalign.hooks import block_checkpointing
    from ttalign.testing import get_tiny_vae

    vae = get_tiny_vae()
    decoder = vae.decoder
    own = object()
    decoder._gradient_checkpointing_func = own  # a user's own function stays theirs
    seen = []

    def function(block, *args):
        seen.append(type(block).__name__)
        return block(*args)

    z = torch.randn(1, vae.config.latent_channels, 4, 4, requires_grad=True)
    with block_checkpointing(vae, function) as switched:
        assert switched and decoder.gradient_checkpointing
        vae.decode(z)
    assert seen  # the decoder's blocks went through the checkpoint function
    assert not decoder.gradient_checkpointing and decoder._gradient_checkpointing_func is own
    with pytest.raises(RuntimeError, match="boom"), block_checkpointing(vae):
        raise RuntimeError("boom")
    assert not vae.encoder.gradient_checkpointing and "_gradient_checkpointing_func" not in vars(vae.encoder)
    with block_checkpointing(torch.nn.Linear(2, 2)) as switched:
        assert not switched
