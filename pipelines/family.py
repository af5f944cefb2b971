"""The model-family interface: all that alignment methods, samplers and trainers may know of a model.

Each pipeline family (SD 1.x/2.x, SDXL, ...) implements :class:`ModelFamily` next to its aligned pipeline in this
package. A method reaches its call's family as `state.family`; a trainer or a sampler outside a call asks
:func:`family_for` for the family of a pipeline. None of them names the denoiser, its keyword arguments or a pipeline
class: adding a family is one file here (the aligned pipeline and its family), its tiny components and its tests.

What the interface gives:

- modules: `denoiser` (the UNet or transformer), `scheduler`, `vae`, `text_encoders`, `tokenizer`;
- conditioning: :class:`Conditioning` (the token embeddings plus the family's other inputs, per image and branch),
  `encode_prompt`, `training_conditioning`;
- the denoiser's call: `denoise(latents, timestep, cond, guidance_scale)`, one forward pass with the full
  conditioning, classifier-free guidance included;
- model output: `prediction_type`, `predict_x0`;
- latents: `latents_shape`, `decode`, `encode_images`;
- attention: `features`, `install_attention_control`, `cross_attention_resolutions`, `text_streams`, `token_spans`,
  `prompt_length`, `attention_defaults`;
- LoRA: `lora_target_modules`, `save_lora` (in the format the family's diffusers pipeline loads).

The registry (:data:`FAMILIES`, filled by :func:`register_family`) maps each family's short key to its diffusers
pipeline class, its aligned class, its denoiser kind and its capabilities (`features`); `ttalign.align`, loading, the
server, the trainers and the tests read it, and nothing decides on a class name.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch


def _select(value, rows):
    if isinstance(value, (list, tuple)):
        return [v[rows] for v in value]
    return value[rows]


def _concat(negative, positive):
    if isinstance(positive, (list, tuple)):
        return [torch.cat([n, p]) for n, p in zip(negative, positive)]
    return torch.cat([negative, positive])


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, per image of the call, for the conditional and the unconditional branch.

    Args:
        prompt_embeds (`Tensor [N, L, D]`): the token embeddings the denoiser attends to (conditional branch).
        negative_prompt_embeds (`Tensor [N, L, D]`, *optional*): the unconditional branch's (`None` without CFG).
        added (`dict`): the family's other per-image inputs of the conditional branch, each `[N, ...]` or a list of
            such tensors (SDXL: `text_embeds` `[N, 1280]`, `time_ids` `[N, 6]`; IP-Adapter `image_embeds`; an
            LCM UNet's `timestep_cond`).
        negative_added (`dict`): the same for the unconditional branch.
        cross_attention_kwargs (`dict`, *optional*): call-wide keyword arguments of the attention processors
            (`joint_attention_kwargs` for the transformer families).
        shared (`dict`): call-wide inputs that are not per image (FLUX's `txt_ids` and `img_ids`, the image size).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    added: dict[str, Any] = field(default_factory=dict)
    negative_added: dict[str, Any] = field(default_factory=dict)
    cross_attention_kwargs: dict[str, Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def select(self, rows) -> Conditioning:
        """The conditioning of the images `rows` (a list or index tensor; repeats allowed), in that order."""
        if not torch.is_tensor(rows):
            rows = torch.as_tensor(list(rows), dtype=torch.long)
        rows = rows.to(self.prompt_embeds.device)
        return replace(
            self,
            prompt_embeds=self.prompt_embeds[rows],
            negative_prompt_embeds=None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[rows],
            added={k: _select(v, rows) for k, v in self.added.items()},
            negative_added={k: _select(v, rows) for k, v in self.negative_added.items()},
        )

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The conditionings of several batches, one after the other."""
        first = parts[0]

        def join(values):
            if isinstance(values[0], (list, tuple)):
                return [torch.cat(column) for column in zip(*values)]
            return torch.cat(values)

        negatives = [p.negative_prompt_embeds for p in parts]
        return replace(
            first,
            prompt_embeds=torch.cat([p.prompt_embeds for p in parts]),
            negative_prompt_embeds=None if negatives[0] is None else torch.cat(negatives),
            added={k: join([p.added[k] for p in parts]) for k in first.added},
            negative_added={k: join([p.negative_added[k] for p in parts]) for k in first.negative_added},
        )

    def positive(self) -> Conditioning:
        """The conditional branch alone (no classifier-free guidance)."""
        return replace(self, negative_prompt_embeds=None, negative_added={})

    def batch(self, cfg: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """The denoiser's batch: `(embeds, added)`, the unconditional rows first when `cfg` (`[2N, ...]`)."""
        if not cfg:
            return self.prompt_embeds, dict(self.added)
        if self.negative_prompt_embeds is None:
            raise ValueError("Classifier-free guidance needs the unconditional branch's embeddings.")
        added = {k: _concat(self.negative_added[k], v) for k, v in self.added.items()}
        return torch.cat([self.negative_prompt_embeds, self.prompt_embeds]), added


@dataclass(frozen=True)
class TextStream:
    """One text encoder's part of the token embeddings: its `tokenizer`, the call argument its prompt comes from
    (`"prompt"`, or `"prompt_2"` / `"prompt_3"` when the call gives one), the feature columns it fills (`features`)
    and the sequence positions it fills (`positions`: all of them, or SD3's T5 tokens after the 77 CLIP ones)."""

    tokenizer: Any
    prompt_key: str
    features: slice
    positions: slice = field(default_factory=lambda: slice(None))


class ModelFamily:
    """Base class of the model families (see the module docstring). Bound to one pipeline; `replace` gives a view with
    another denoiser (a trainer's accelerate-wrapped one) or scheduler."""

    #: Short name, used in error messages ("Stable Diffusion XL").
    name: ClassVar[str] = "model"
    #: The diffusers pipeline class whose pipelines (and subclasses) belong to this family.
    pipeline_class: ClassVar[type | None] = None
    #: The attribute of the pipeline holding the denoiser.
    denoiser_attribute: ClassVar[str] = "unet"
    #: Modules of the denoiser that get LoRA adapters.
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    #: The family's capabilities, which methods (`required_features`), trainers and the server read:
    #: `"cross_attention"` (image queries attend to text keys whose maps and logits the attention control reaches: a
    #: UNet's cross-attention, or the text view of joint attention), `"joint_attention"` (one attention over the
    #: concatenated image and text tokens), `"flow_matching"` (velocity output on a flow-matching schedule; otherwise
    #: noise / v prediction on a diffusion schedule), `"stochastic_steps"` (a stochastic sampler step with its
    #: log-probability: DDIM with eta, or the flow SDE), `"packed_latents"` (latents packed into tokens).
    features: ClassVar[frozenset[str]] = frozenset()
    #: Family defaults of attention-method settings: `normalize_eot` (leave end and padding tokens out of maps),
    #: `from_where` (the parts of the denoiser whose maps are recorded) and `parts` (all of its parts).
    attention_defaults: ClassVar[dict[str, Any]] = {
        "normalize_eot": False,
        "from_where": ("up", "down", "mid"),
        "parts": ("up", "down", "mid"),
    }

    def __init__(self, pipe, denoiser=None, scheduler=None):
        self.pipe = pipe
        self._denoiser, self._scheduler = denoiser, scheduler

    def replace(self, denoiser=None, scheduler=None) -> ModelFamily:
        """The same family with another denoiser module (for example accelerate's wrapper) or scheduler."""
        view = copy.copy(self)
        view._denoiser = denoiser if denoiser is not None else self._denoiser
        view._scheduler = scheduler if scheduler is not None else self._scheduler
        return view

    # --- modules ------------------------------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module:
        return self._denoiser if self._denoiser is not None else getattr(self.pipe, self.denoiser_attribute)

    @property
    def base_denoiser(self) -> torch.nn.Module:
        """The pipeline's registered denoiser (never a training wrapper)."""
        return getattr(self.pipe, self.denoiser_attribute)

    @property
    def scheduler(self):
        return self._scheduler if self._scheduler is not None else self.pipe.scheduler

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def tokenizer(self):
        """The tokenizer whose token positions index the denoiser's text keys."""
        raise NotImplementedError

    @property
    def text_streams(self) -> list[TextStream]:
        raise NotImplementedError

    # --- conditioning ---------------------------------------------------------------------------------------------

    def encode_prompt(
        self,
        prompts: list[str],
        device,
        negative_prompt=None,
        do_cfg: bool = False,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        clip_skip: int | None = None,
        **options,
    ) -> Conditioning:
        """Encodes `prompts` as a call of the family's pipeline would; `N = len(prompts) * num_images_per_prompt`.
        `options` are the call's family-specific settings (`GenerationState.encode_options`: SD3's and FLUX's
        `max_sequence_length`, FLUX's embedded `guidance`)."""
        raise NotImplementedError

    def training_conditioning(
        self,
        prompts: list[str],
        device,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        crops: Sequence[tuple[int, int]] | None = None,
        size: int | None = None,
        **options,
    ) -> Conditioning:
        """The conditional branch for training on one image per prompt: its original size `(h, w)`, the top-left
        corner `(top, left)` of the square taken from it, and the square's `size` (families with size conditioning use
        them; the others ignore them). `options` go to :meth:`encode_prompt`."""
        return self.encode_prompt(prompts, device, **options)

    # --- the denoiser -----------------------------------------------------------------------------------------------

    def denoise(
        self, latents: torch.Tensor, timestep, cond: Conditioning, guidance_scale: float = 1.0, cfg: bool | None = None
    ) -> torch.Tensor:
        """The denoiser's output for `latents` `[N, ...]` (already scaled by the scheduler's `scale_model_input`) at
        `timestep` (the scheduler's) with `cond`. With classifier-free guidance (`cfg`, by default when `cond` has
        negatives and `guidance_scale > 1`), both branches run in one batch and are combined:
        `uncond + guidance_scale * (cond - uncond)`."""
        if cfg is None:
            cfg = cond.has_negative and guidance_scale > 1
        out = self.forward(torch.cat([latents] * 2) if cfg else latents, timestep, cond, cfg)
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        return out

    def forward(self, latents: torch.Tensor, timestep, cond: Conditioning, cfg: bool) -> torch.Tensor:
        """One forward pass of the denoiser on the batch `latents` (`[2N, ...]` with `cfg`, unconditional first)."""
        raise NotImplementedError

    # --- model output and latents -----------------------------------------------------------------------------------

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def predict_x0(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """The denoiser's estimate of the clean latents from its (guided) output."""
        from ttalign.sampling import predict_x0

        return predict_x0(self.scheduler, model_output, timestep, sample)

    def set_timesteps(
        self,
        num_inference_steps: int,
        device,
        height: int | None = None,
        width: int | None = None,
        timesteps=None,
        sigmas=None,
        mu: float | None = None,
    ) -> torch.Tensor:
        """Sets the scheduler's schedule as the family's pipeline does for a call of this size and these schedule
        arguments (custom `timesteps` / `sigmas`; flow matching: the shift `mu`), and returns the timesteps."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        return retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)[0]

    def latents_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def default_image_size(self) -> int:
        """The image size (px) the pipeline generates by default."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """What an image's height and width must be a multiple of (the VAE's factor, times the patch size)."""
        return self.pipe.vae_scale_factor

    def decode(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Latents -> images `[N, 3, H, W]` in about `[-1, 1]` (not clamped); packed latents (FLUX) need the size."""
        raise NotImplementedError

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The latents as an image-shaped `[N, C, h, w]` tensor (FLUX packs them into tokens; others are already)."""
        return latents

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` of the latent image of a `height x width` image (before any patching or packing)."""
        factor = self.pipe.vae_scale_factor
        return height // factor, width // factor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images `[N, 3, H, W]` in `[-1, 1]` -> latents as the denoiser sees them (the posterior mean)."""
        raise NotImplementedError

    # --- attention --------------------------------------------------------------------------------------------------

    def install_attention_control(self, control) -> None:
        """Puts the :class:`~ttalign.attention.AttentionControl`'s processors on every attention layer of the
        denoiser (the pipeline's component snapshot restores the originals after the call)."""
        raise NotImplementedError

    def cross_attention_resolutions(self, latent_height: int, latent_width: int) -> list[tuple[int, int]]:
        """The feature-map sizes at which the denoiser attends to text, for latents of this size."""
        raise NotImplementedError

    def token_spans(self, prompt: str, words: list[str], tokenizer=None) -> list[list[int]]:
        """The key positions (start token at 0) of each word or phrase of `words` in `prompt`."""
        from ttalign.attention import token_spans

        return token_spans(tokenizer or self.tokenizer, prompt, words)

    def prompt_length(self, prompt: str) -> int:
        """The number of token positions `prompt` fills, start and end token included."""
        return len(self.tokenizer(prompt).input_ids)

    def attention_token_positions(self, prompt: str, exclude_padding: bool) -> list[int]:
        """The text key positions among which Attend-and-Excite normalizes a pixel's attention: the prompt's tokens
        without the start token; without `exclude_padding`, every position but the first and the last (the
        reference's `[1:-1]` of CLIP's 77)."""
        if exclude_padding:
            return list(range(1, self.prompt_length(prompt) - 1))
        return list(range(1, self.tokenizer.model_max_length - 1))

    # --- LoRA --------------------------------------------------------------------------------------------------------

    def aligned_pipeline(self):
        """An aligned pipeline of this family on the same modules (`from_pipe`: nothing is copied)."""
        raise NotImplementedError

    def save_lora(self, directory: str, denoiser_layers: dict[str, torch.Tensor]) -> None:
        """Saves the denoiser's LoRA layers (peft state dict) in the format the family's diffusers pipeline loads with
        `load_lora_weights(directory)`."""
        raise NotImplementedError


#: Every capability a family may declare in `features`.
CAPABILITIES = frozenset({"cross_attention", "joint_attention", "flow_matching", "stochastic_steps", "packed_latents"})


@dataclass(frozen=True)
class FamilyEntry:
    """A model family in the registry: its key (`"sd"`, `"sdxl"`, ...), its :class:`ModelFamily` and the aligned
    pipeline class that wraps its diffusers pipeline class."""

    key: str
    family: type[ModelFamily]
    aligned_class: type

    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class."""
        return self.family.pipeline_class

    @property
    def denoiser_kind(self) -> str:
        """`"unet"` or `"transformer"`: diffusers names a pipeline's denoiser by its kind."""
        return self.family.denoiser_attribute

    @property
    def capabilities(self) -> frozenset[str]:
        return self.family.features


#: The registry of model families, by key, in the order they were registered.
FAMILIES: dict[str, FamilyEntry] = {}


def register_family(key: str, aligned_class: type):
    """Class decorator of a :class:`ModelFamily`: registers it under `key` with the aligned pipeline class that wraps
    its `pipeline_class`."""

    def register(cls: type[ModelFamily]) -> type[ModelFamily]:
        unknown = sorted(set(cls.features) - CAPABILITIES)
        if unknown:
            raise ValueError(f"{cls.__name__} declares unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}.")
        if cls.pipeline_class is None or not issubclass(aligned_class, cls.pipeline_class):
            raise ValueError(f"{aligned_class.__name__} must subclass {cls.__name__}.pipeline_class.")
        if key in FAMILIES and FAMILIES[key].family is not cls:
            raise ValueError(f"A model family is already registered as {key!r}: {FAMILIES[key].family.__name__}.")
        FAMILIES[key] = FamilyEntry(key, cls, aligned_class)
        return cls

    return register


def family_entry(pipe) -> FamilyEntry | None:
    """The registry entry of a pipeline or pipeline class (diffusers' or aligned), or `None`."""
    cls = pipe if isinstance(pipe, type) else type(pipe)
    return next((e for e in FAMILIES.values() if issubclass(cls, e.pipeline_class)), None)


def family_for(pipe, denoiser=None, scheduler=None) -> ModelFamily:
    """The :class:`ModelFamily` of a diffusers pipeline (or of an aligned one); `TypeError` naming the supported
    pipelines otherwise. An object that is already a family is returned as it is."""
    if isinstance(pipe, ModelFamily):
        return pipe.replace(denoiser, scheduler) if denoiser is not None or scheduler is not None else pipe
    own = getattr(pipe, "family", None)
    if isinstance(own, ModelFamily):
        return own.replace(denoiser, scheduler) if denoiser is not None or scheduler is not None else own
    entry = family_entry(pipe)
    if entry is not None:
        return entry.family(pipe, denoiser, scheduler)
    supported = ", ".join(sorted(e.pipeline_class.__name__ for e in FAMILIES.values()))
    raise TypeError(f"ttalign has no model family for {type(pipe).__name__}; supported pipelines: {supported}.")
