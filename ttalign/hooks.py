"""The hook system: alignment methods act at fixed stages of a pipeline call.

A generation is the fixed sequence of stages of diffusers' own `__call__`. An :class:`AlignmentMethod` declares
the stages it acts at and implements one handler per stage; the aligned pipeline calls the handlers of every
method at each stage, in the order the user listed the methods. All per-call data lives in a
:class:`GenerationState`, never on the pipeline or on the method.

| stage          | when                                             | handler            |
|----------------|--------------------------------------------------|--------------------|
| `prompt`       | before `encode_prompt`                           | `on_prompt`        |
| `conditioning` | after `encode_prompt`                            | `on_conditioning`  |
| `init_latents` | after `prepare_latents`                          | `on_init_latents`  |
| `attention`    | once, before the denoising loop                  | `on_attention`     |
| `step_start`   | before the denoiser at step i                    | `on_step_start`    |
| `noise_pred`   | after the CFG combination, before the scheduler  | `on_noise_pred`    |
| `step_end`     | after `scheduler.step`                           | `on_step_end`      |
| `output`       | after the VAE decode, before post-processing     | `on_output`        |

Every method also has `setup` (before any stage, after `validate`) and `teardown` (always, in `finally`).
Whatever a method changes on a registered component (attention processors, train/eval mode, `requires_grad`)
is restored by the pipeline after the call, also when a method raises.
"""

from __future__ import annotations

import contextlib
import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch


class Stage(str, enum.Enum):
    """The stages of a pipeline call at which an alignment method can act."""

    PROMPT = "prompt"
    CONDITIONING = "conditioning"
    ATTENTION = "attention"
    INIT_LATENTS = "init_latents"
    STEP_START = "step_start"
    NOISE_PRED = "noise_pred"
    STEP_END = "step_end"
    OUTPUT = "output"


HANDLERS: dict[Stage, str] = {stage: f"on_{stage.value}" for stage in Stage}


@dataclass(eq=False)
class GenerationState:
    """Everything one pipeline call knows, handed to every handler. Handlers read and replace its tensors.

    Tensor fields follow diffusers' names. `latents` is `[N, C, h, w]` with `N = len(prompt) * num_images_per_prompt`
    (FLUX: packed into tokens, `[N, L, 4C]`; `family.unpack_latents` gives the image-shaped view).
    `family` is the model family (:class:`~ttalign.pipelines.family.ModelFamily`): all a method knows of the model.
    `conditioning` (a :class:`~ttalign.pipelines.family.Conditioning`, from the `conditioning` stage on) holds what
    the denoiser is conditioned on per image; `prompt_embeds` is its conditional batch `[N, L, D]` and
    `negative_prompt_embeds` the unconditional one (or `None` without classifier-free guidance).
    `extra_prompts` holds the family's further prompts as the call gave them (SDXL: `prompt_2`, `negative_prompt_2`).
    `guidance_scale` is the classifier-free guidance scale the family's denoiser call combines branches with (FLUX:
    `true_cfg_scale`; its embedded guidance is part of the conditioning).
    `decoded` is the VAE output in `[-1, 1]` at the `output` stage. `eta` is the call's DDIM noise scale.
    """

    pipe: Any
    family: Any
    prompt: list[str] | None
    negative_prompt: str | list[str] | None
    num_images_per_prompt: int
    height: int
    width: int
    guidance_scale: float
    eta: float
    num_inference_steps: int
    generator: torch.Generator | list[torch.Generator] | None
    device: torch.device
    output_type: str
    user_latents: torch.Tensor | None = None
    do_classifier_free_guidance: bool = False
    clip_skip: int | None = None
    extra_prompts: dict[str, Any] = field(default_factory=dict)
    #: The call's family-specific encoding settings, for methods that encode prompts like the call (SD3 / FLUX:
    #: `max_sequence_length`; FLUX: the embedded `guidance`).
    encode_options: dict[str, Any] = field(default_factory=dict)
    #: The call's schedule arguments (custom `timesteps` / `sigmas`; SD3: `mu`), for methods that set the scheduler
    #: as the call does (:meth:`~ttalign.pipelines.family.ModelFamily.set_timesteps`).
    schedule_options: dict[str, Any] = field(default_factory=dict)
    conditioning: Any = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    step_index: int = -1
    timestep: torch.Tensor | None = None
    noise_pred: torch.Tensor | None = None
    decoded: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    #: Indices into the sampled batch of the images that are returned (set by selection methods).
    selected: torch.Tensor | None = None
    traces: dict[str, Any] = field(default_factory=dict)
    #: Compute spent so far; see :meth:`compute`.
    denoiser_calls: int = 0
    denoiser_evals: int = 0
    vae_decodes: int = 0
    reward_calls: int = 0
    start_time: float = field(default_factory=time.perf_counter)
    #: Per-method scratch space, keyed by the method object.
    scratch: dict[Any, Any] = field(default_factory=dict)
    #: The call's :class:`AlignmentRunner` (set by its `session`): a search that renders candidates runs the other
    #: methods' per-step handlers through it.
    runner: Any = None
    #: `True` while a search renders candidates through the other methods' `step_start` handlers: they act on the
    #: latents as in the pipeline's loop and leave their traces alone.
    searching: bool = False

    @property
    def prompt_embeds(self) -> torch.Tensor | None:
        return None if self.conditioning is None else self.conditioning.prompt_embeds

    @prompt_embeds.setter
    def prompt_embeds(self, value: torch.Tensor) -> None:
        self.conditioning.prompt_embeds = value

    @property
    def negative_prompt_embeds(self) -> torch.Tensor | None:
        return None if self.conditioning is None else self.conditioning.negative_prompt_embeds

    @negative_prompt_embeds.setter
    def negative_prompt_embeds(self, value: torch.Tensor | None) -> None:
        self.conditioning.negative_prompt_embeds = value

    @property
    def batch_size(self) -> int:
        """The number of latents sampled in this call (after any method enlarged the batch)."""
        return len(self.prompt) * self.num_images_per_prompt

    @property
    def image_prompts(self) -> list[str]:
        """The prompt of each sampled image, in batch order (diffusers repeats each prompt consecutively)."""
        if self.prompt is None:
            raise ValueError("This method needs text prompts, but the call passed only `prompt_embeds`.")
        return [p for p in self.prompt for _ in range(self.num_images_per_prompt)]

    @property
    def images(self) -> torch.Tensor:
        """The decoded images as float `[N, 3, H, W]` in `[0, 1]` (what rewards take)."""
        if self.decoded is None:
            raise RuntimeError("Images exist only at the `output` stage.")
        return (self.decoded / 2 + 0.5).clamp(0, 1)

    def keep_best(self, scores: torch.Tensor, reward: str) -> torch.Tensor:
        """Keeps, of each image's `k` consecutive candidates (`scores` `[N, k]`), the one with the highest finite
        score: shrinks `latents` and `decoded` to `N`, divides `num_images_per_prompt` by `k`, and sets `rewards` and
        `selected`. Non-finite scores are ignored with a warning; an image with none finite raises `ValueError`
        naming the `reward`. Returns the winners' indices among their candidates, `[N]`."""
        import warnings

        k = scores.shape[1]
        finite = torch.isfinite(scores)
        if not finite.all():
            if not finite.any(dim=1).all():
                raise ValueError(f"Reward {reward} returned no finite score for some image.")
            warnings.warn(
                f"Reward {reward} returned {int((~finite).sum())} non-finite scores; ignoring them.", stacklevel=3
            )
        best = torch.where(finite, scores, torch.full_like(scores, float("-inf"))).argmax(dim=1)  # [N]
        selected = torch.arange(scores.shape[0], device=best.device) * k + best  # [N]
        self.latents = self.latents[selected.to(self.latents.device)]
        self.decoded = self.decoded[selected.to(self.decoded.device)]
        self.num_images_per_prompt //= k
        self.rewards = scores.gather(1, best[:, None]).squeeze(1)  # [N]
        self.selected = selected
        return best

    def derived_generator(self, salt: int, row: int | None = None) -> torch.Generator:
        """A CPU generator for a method's own draws, derived from the call's generator (fresh entropy without one),
        so that a seeded call is reproducible; `salt` tells methods apart. With diffusers' per-image generator list,
        `row` picks the image whose generator it derives from (without `row`, all of them)."""
        if isinstance(self.generator, torch.Generator):
            base = self.generator.initial_seed()
        elif isinstance(self.generator, list):
            chosen = self.generator if row is None else [self.generator[row]]
            base = 0
            for g in chosen:
                base = (base * 1_000_033 + g.initial_seed()) % (2**63)
        else:
            base = secrets.randbits(62)
        return torch.Generator().manual_seed((base * 1_000_003 + salt) % (2**63))

    def check_generators(self) -> None:
        """Raises `ValueError` when diffusers' per-image generator list does not hold one generator per image."""
        if isinstance(self.generator, list) and len(self.generator) != self.batch_size:
            raise ValueError(
                f"Got a list of {len(self.generator)} generators for {self.batch_size} images; pass one "
                "per image (len(prompt) * num_images_per_prompt)."
            )

    def expand_generators(self, k: int) -> None:
        """For a method that draws `k` consecutive samples per image: with diffusers' per-image generator list
        (one per image), makes it one per sample, the first of each image its own generator and the others derived
        from it, so each image's samples derive from its own generator alone. A single generator is left alone."""
        self.check_generators()
        if not isinstance(self.generator, list):
            return
        expanded = []
        for g in self.generator:
            expanded.append(g)
            for c in range(1, k):
                seed = (g.initial_seed() * 1_000_003 + 7919 * c) % (2**63)
                expanded.append(torch.Generator(device=g.device).manual_seed(seed))
        self.generator = expanded

    def randn(self, shape, generator: torch.Generator | list[torch.Generator], dtype=torch.float32) -> torch.Tensor:
        """Standard normal noise `shape` on the call's device: from one generator, or one per row from a list."""
        if isinstance(generator, list):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}.")
            rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in generator]
            return torch.stack(rows).to(self.device)
        return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(self.device)

    def method_generators(self, salt: int) -> torch.Generator | list[torch.Generator]:
        """The generator(s) of a method's own per-image draws: one derived from the call's generator, or with a
        per-image generator list, one per image derived from that image's generator (pass to :meth:`randn`)."""
        if isinstance(self.generator, list):
            return [self.derived_generator(salt, row=r) for r in range(len(self.generator))]
        return self.derived_generator(salt)

    def __post_init__(self):
        if torch.device(self.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def compute(self) -> dict[str, float]:
        """Compute spent by this call: denoiser forward passes (`denoiser_calls`), denoiser evaluations summed
        over the latents in the batch (`nfe`: a CFG pair counts once), VAE decodes, reward calls, wall time and peak
        memory (`peak_memory_mb`: CUDA memory allocated during the call on a GPU; on a CPU, the process's peak
        resident memory so far)."""
        if torch.device(self.device).type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            try:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            except ImportError:  # not on Windows
                peak = float("nan")
        return {
            "denoiser_calls": self.denoiser_calls,
            "nfe": self.denoiser_evals,
            "vae_decodes": self.vae_decodes,
            "reward_calls": self.reward_calls,
            "wall_time_s": time.perf_counter() - self.start_time,
            "peak_memory_mb": peak,
        }


class AlignmentMethod:
    """Base class of every alignment method.

    A subclass lists the stages it acts at in `stages` and implements the matching `on_<stage>(state)` handlers.
    It may override `validate` to refuse combinations with other methods before any compute, and `setup` /
    `teardown` for per-call preparation. A method object holds configuration only: per-call data goes into
    `state.scratch[self]` or `state.traces`.
    """

    #: The stages this method acts at.
    stages: tuple[Stage, ...] = ()
    #: Whether two instances of this method may be used in one call.
    allow_multiple: bool = False
    #: Whether the method enlarges the sampled batch (at most one such method per call).
    changes_batch: bool = False
    #: What the method needs of the model family (see `ModelFamily.features`), checked before any compute.
    required_features: frozenset[str] = frozenset()
    #: Whether the method draws (or optimizes) the noise that stochastic sampler steps inject: at most one such
    #: method per call.
    owns_step_noise: bool = False
    #: The options whose larger values cost more compute (candidates, particles, passes): the compute declarations
    #: below grow with each, and a server names them when a request is over its budget.
    costly_options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__

    def validate(self, methods: list[AlignmentMethod]) -> None:
        """Raises `ValueError` if this method cannot run together with `methods` (which includes itself)."""

    def check_prompts(self, prompts: list[str], family=None) -> None:
        """Raises `ValueError` for a prompt this method cannot take, before any compute (the server asks before it
        merges requests); `family`, when given, is the model family the prompts are for (its tokenizers). The default
        asks the method's `reward` field, where it has one (every built-in method keeps its reward there), through
        the reward's own `check_prompts`."""
        from ttalign.rewards.base import check_reward_prompts

        reward = getattr(self, "reward", None)
        if reward is not None:
            check_reward_prompts(reward, prompts)

    # --- compute declarations: an upper bound of what a call spends, known before it runs (see `price_image_steps`)

    def renders_per_image(self, num_inference_steps: int) -> float:
        """Full denoising passes this method spends per returned image: its candidates, particles or optimization
        passes (a backward pass through the sampler counting as two, a checkpoint's replay as one more). Default 1."""
        return 1.0

    def extra_evaluations_per_render(self, num_inference_steps: int) -> float:
        """Denoiser evaluations this method adds to each render of one image beyond its `num_inference_steps`
        steps (a backward pass counting as two; a VAE decode with a reward call as one). Default 0."""
        return 0.0

    def setup(self, state: GenerationState) -> None:
        """Called once per call before any stage; may enlarge the batch (`state.num_images_per_prompt`)."""

    def teardown(self, state: GenerationState) -> None:
        """Called once per call in `finally`, also when the call failed."""

    def __repr__(self) -> str:
        return f"{self.name}()"


def price_image_steps(methods: list[AlignmentMethod], num_inference_steps: int) -> float:
    """The compute of one returned image under `methods`, in image-steps (one denoiser evaluation of one image at the
    model's native resolution): the product of the methods' renders per image times the steps plus every method's
    extra evaluations per render. An upper bound for adaptive methods (early stopping, refinement that ends when its
    threshold is met); exact for the others, as `out.traces["compute"]["nfe"]` counts them."""
    renders = 1.0
    per_render = float(num_inference_steps)
    for method in methods:
        renders *= method.renders_per_image(num_inference_steps)
        per_render += method.extra_evaluations_per_render(num_inference_steps)
    return renders * per_render


def _as_method_list(alignment) -> list[AlignmentMethod]:
    if alignment is None:
        return []
    if isinstance(alignment, AlignmentMethod):
        return [alignment]
    if not isinstance(alignment, (list, tuple)):
        raise TypeError(f"`alignment` must be an AlignmentMethod or a list of them, got {type(alignment).__name__}.")
    for method in alignment:
        if not isinstance(method, AlignmentMethod):
            raise TypeError(f"`alignment` entries must be AlignmentMethod instances, got {method!r}.")
    return list(alignment)


class AlignmentRunner:
    """Runs the handlers of a list of methods at each stage, in the order given.

    Construction checks the combination (unknown stages, missing handlers, duplicates, more than one method that
    enlarges the batch, each method's own `validate`) so that a bad combination fails before any compute.
    """

    def __init__(self, alignment=None):
        self.methods = _as_method_list(alignment)
        self.by_stage: dict[Stage, list[AlignmentMethod]] = {stage: [] for stage in Stage}
        for method in self.methods:
            for stage in method.stages:
                stage = Stage(stage)
                if not callable(getattr(method, HANDLERS[stage], None)):
                    raise TypeError(f"{method.name} declares stage {stage.value!r} but has no {HANDLERS[stage]}().")
                self.by_stage[stage].append(method)
        for method in self.methods:
            if not method.allow_multiple and sum(type(m) is type(method) for m in self.methods) > 1:
                raise ValueError(f"{method.name} is listed more than once in `alignment`; give it once.")
        batch_changers = [m.name for m in self.methods if m.changes_batch]
        if len(batch_changers) > 1:
            raise ValueError(f"Only one method may enlarge the batch, got {batch_changers}.")
        noise_owners = [m.name for m in self.methods if m.owns_step_noise]
        if len(noise_owners) > 1:
            raise ValueError(
                f"{' and '.join(noise_owners)} each draw the noise the sampler's steps inject; use one of them."
            )
        for method in self.methods:
            method.validate(self.methods)

    def __bool__(self) -> bool:
        return bool(self.methods)

    def has(self, stage: Stage) -> bool:
        return bool(self.by_stage[stage])

    def run(self, stage: Stage, state: GenerationState) -> None:
        handler = HANDLERS[stage]
        for method in self.by_stage[stage]:
            getattr(method, handler)(state)

    @contextlib.contextmanager
    def session(self, state: GenerationState):
        """Sets the methods up, and in `finally` tears them down and restores every registered component."""
        if not self.methods:
            yield
            return
        features = getattr(state.family, "features", frozenset())
        for method in self.methods:
            missing = sorted(set(method.required_features) - set(features))
            if missing:
                raise ValueError(
                    f"{method.name} cannot run on the {state.family.name} family: it needs "
                    f"{', '.join(missing)}, which this family does not provide."
                )
        state.runner = self
        snapshot = ComponentSnapshot(state.pipe)
        started: list[AlignmentMethod] = []
        # Attention hooks read per-step Python state that a compiled denoiser would guard on and recompile for at
        # every step: a call with them runs the compiled modules eagerly (the same images, no recompilation).
        eager = self.has(Stage.ATTENTION) and compiled(state.family.denoiser)
        stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        try:
            with stance:
                for method in self.methods:
                    started.append(method)
                    method.setup(state)
                yield
        finally:
            try:
                for method in reversed(started):
                    method.teardown(state)
            finally:
                snapshot.restore()


def compiled(module: torch.nn.Module) -> bool:
    """Whether `module` or any of its submodules was compiled in place (`module.compile()`, as diffusers'
    `compile_repeated_blocks` does)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module | None):
    """Turns `requires_grad` off on the parameters of `modules` (`None` skipped) for gradients taken through them with
    respect to their inputs only (latents, noise): autograd then keeps no layer input for a weight's gradient (a
    linear layer's input, for one), and a backward writes no parameter's `.grad`. The flags are put back on exit,
    also on error.

    A method that backpropagates through a registered component to its inputs runs that pass inside this, so the
    pass costs the memory of the activations the input gradient needs, whether or not the user's model was loaded
    with trainable weights (diffusers leaves them trainable)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def block_checkpointing(module: torch.nn.Module, function=None):
    """diffusers' own gradient-checkpointing switches of `module`'s blocks (each submodule with a
    `gradient_checkpointing` attribute; compiled ones are left alone), on for the forwards made inside the block, with
    `function(block, *args)` as the checkpoint (by default `torch.utils.checkpoint.checkpoint`, non-reentrant): a
    forward whose backward is taken keeps only each block's inputs, and the backward recomputes one block at a time.
    Yields whether `module` has such switches. The user's own settings are restored on exit, also on error."""
    if function is None:

        def function(block, *args):
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    compiled_type = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    modules = [
        m for m in module.modules() if hasattr(m, "gradient_checkpointing") and not isinstance(m, compiled_type)
    ]
    absent = object()
    saved = [(m, m.gradient_checkpointing, vars(m).get("_gradient_checkpointing_func", absent)) for m in modules]
    for m in modules:
        m.gradient_checkpointing, m._gradient_checkpointing_func = True, function
    try:
        yield bool(modules)
    finally:
        for m, flag, func in saved:
            m.gradient_checkpointing = flag
            if func is absent:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


class ComponentSnapshot:
    """Records the mutable state of a pipeline's registered modules and puts it back.

    Covers attention processors (of every module that has them), train/eval mode, and `requires_grad` of every
    parameter. Restoring re-installs only what changed, so an untouched pipeline costs nothing to restore.
    """

    def __init__(self, pipe):
        self.modules: dict[str, torch.nn.Module] = {
            name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
        }
        self.training = {name: [m.training for m in module.modules()] for name, module in self.modules.items()}
        self.requires_grad = {
            name: [p.requires_grad for p in module.parameters()] for name, module in self.modules.items()
        }
        self.processors = {
            name: dict(module.attn_processors)
            for name, module in self.modules.items()
            if hasattr(module, "attn_processors") and hasattr(module, "set_attn_processor")
        }

    def restore(self) -> None:
        for name, module in self.modules.items():
            for m, mode in zip(module.modules(), self.training[name]):
                m.training = mode
            for p, flag in zip(module.parameters(), self.requires_grad[name]):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        for name, saved in self.processors.items():
            module = self.modules[name]
            current = module.attn_processors
            if current.keys() != saved.keys() or any(current[k] is not saved[k] for k in saved):
                module.set_attn_processor(saved)
