"""Offline preference training: Diffusion-DPO (Wallace et al. 2023, https://arxiv.org/abs/2311.12908) on preference
pairs and Diffusion-KTO (Li et al. 2024, https://arxiv.org/abs/2404.04465) on binary feedback, with noise targets
(SD 1.x/2.x, SDXL) or flow matching's velocity (SD3, FLUX: `FlowDPOTrainer`, `FlowKTOTrainer`).

The reference model is the same denoiser with its LoRA adapters disabled (no second copy). Training images are
encoded by the VAE and prompts by the text encoders once, before the first step. Families with size conditioning
(SDXL) condition each image on its original size and crop, as diffusers' `train_diffusion_dpo_sdxl.py` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .losses import diffusion_dpo_loss, diffusion_kto_loss, per_sample_mse
from .noising import draw_noise_and_timesteps, noised_and_target
from .trainer import LoRATrainer, TrainingConfig, crop_geometry, image_to_tensor


def _is_flow(pipe) -> bool:
    """Whether the pipeline's family declares flow matching (velocity targets) in the registry."""
    from ttalign.pipelines import family_for

    return "flow_matching" in family_for(pipe).features


@dataclass
class DPOConfig(TrainingConfig):
    """Settings of :class:`DiffusionDPOTrainer`: those of :class:`TrainingConfig`, and

    Args:
        beta (`float`, defaults to 5000): DPO's KL weight in `-logsigmoid(-0.5 * beta * (model_diff - ref_diff))`
            (diffusers' `train_diffusion_dpo.py` `beta_dpo` is half of it: its 2500 is this 5000).
    """

    beta: float = 5000.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}.")


@dataclass
class KTOConfig(TrainingConfig):
    """Settings of :class:`DiffusionKTOTrainer`: those of :class:`TrainingConfig`, and

    Args:
        beta (`float`, defaults to 5000): the scale in `sigmoid(sign * beta * (g - kl))`, same convention as DPO.
        lambda_desirable, lambda_undesirable (`float`, defaults to 1.0): weights of the two kinds of feedback.
    """

    beta: float = 5000.0
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.lambda_desirable < 0 or self.lambda_undesirable < 0:
            raise ValueError(
                f"Bad KTO weights: beta={self.beta}, lambdas {self.lambda_desirable}, {self.lambda_undesirable}."
            )


def load_feedback(path: str) -> list[tuple[str, object, bool]]:
    """Binary feedback records for KTO from a folder with `feedback.jsonl` (`{"prompt", "image", "label"}` per line,
    `label` true when the image is desirable, image paths relative to the folder). A malformed record raises
    `ValueError` naming the file and line."""
    from PIL import Image

    from ttalign.rewards.evaluation import iter_jsonl

    file = os.path.join(path, "feedback.jsonl")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no feedback.jsonl.")
    records = []
    for where, record in iter_jsonl(file):
        if not isinstance(record, dict) or not {"prompt", "image", "label"} <= set(record):
            raise ValueError(f"{where}: a record needs prompt, image and label, got {record!r:.200}.")
        if not isinstance(record["label"], bool):
            raise ValueError(f"{where}: label must be true or false, got {record['label']!r}.")
        image = os.path.join(path, record["image"])
        if not os.path.isfile(image):
            raise ValueError(f"{where}: image file {record['image']!r} does not exist.")
        records.append((record["prompt"], Image.open(image).convert("RGB"), record["label"]))
    return records


class _OfflineTrainer(LoRATrainer):
    """Denoising-loss training on fixed images: shared noise and timesteps, LoRA model against adapters disabled."""

    @property
    def flow(self) -> bool:
        """Whether the family trains on flow matching's velocity (its registry features)."""
        return "flow_matching" in self.model.features

    @torch.no_grad()
    def _encode_images(self, images) -> torch.Tensor:
        """Training images -> latents `[N, ...]`, 16 at a time."""
        device = self.accelerator.device
        latents = []
        for start in range(0, len(images), 16):
            batch = torch.stack([image_to_tensor(im, self.size) for im in images[start : start + 16]]).to(device)
            latents.append(self.model.encode_images(batch))
        return torch.cat(latents)

    @torch.no_grad()
    def _conditioning(self, prompts, images):
        """The conditional branch of each prompt, conditioned on its image's original size and crop."""
        from ttalign.pipelines.family import Conditioning

        device, parts = self.accelerator.device, []
        for start in range(0, len(prompts), 16):
            geometry = [crop_geometry(im, self.size) for im in images[start : start + 16]]
            parts.append(
                self.model.training_conditioning(
                    prompts[start : start + 16],
                    device,
                    image_sizes=[g[0] for g in geometry],
                    crops=[g[1] for g in geometry],
                    size=self.size,
                    **self.config.encode_options,
                )
            )
        return Conditioning.cat(parts)

    def _mse(self, latents, cond, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample denoising MSE `[B]` of the LoRA model and of the reference (adapters disabled), on the family's
        training target (:func:`~ttalign.training.noising.noised_and_target`)."""
        noisy, target = noised_and_target(self.noise_scheduler, latents, noise, timesteps, self.flow)
        model_mse = per_sample_mse(self.model.forward(noisy, timesteps, cond, cfg=False), target)
        with torch.no_grad(), self.reference_mode():
            ref_mse = per_sample_mse(self.model.forward(noisy, timesteps, cond, cfg=False), target)
        return model_mse, ref_mse

    def _noise_and_timesteps(self, like: torch.Tensor, generator: torch.Generator):
        """Noise and a timestep per image (:func:`~ttalign.training.noising.draw_noise_and_timesteps`; on flow
        matching sigma is logit-normal with the config's `logit_mean`, `logit_std`)."""
        c = self.config
        total = self.noise_scheduler.config.num_train_timesteps
        logit = dict(logit_mean=c.logit_mean, logit_std=c.logit_std) if self.flow else {}
        return draw_noise_and_timesteps(like, generator, total, self.flow, **logit)


@dataclass
class FlowDPOConfig(DPOConfig):
    """Settings of :class:`FlowDPOTrainer`: those of :class:`DPOConfig`, and

    Args:
        beta (`float`, defaults to 100): the same convention as Diffusion-DPO's
            `-logsigmoid(-0.5 * beta * (model_diff - ref_diff))`, on velocity errors. flow_grpo's SD3.5-M recipe uses
            100 in this form; about 2000 is suggested for FLUX. Diffusion-DPO's 5000 (epsilon targets) does not
            transfer: velocity errors are larger and differ more between the models.
        logit_mean (`float`, defaults to 0.0), logit_std (`float`, defaults to 1.0): sigma is drawn logit-normal
            (`sigmoid(N(logit_mean, logit_std^2))`), SD3's training distribution.
    """

    beta: float = 100.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std!r}.")


@dataclass
class FlowKTOConfig(KTOConfig):
    """Settings of :class:`FlowKTOTrainer`: those of :class:`KTOConfig`, and

    Args:
        beta (`float`, defaults to 100): the scale in `sigmoid(sign * beta * (g - kl))` on velocity errors; the
            default is Flow-DPO's scale (:class:`FlowDPOConfig`), not a published KTO recipe.
        logit_mean (`float`, defaults to 0.0), logit_std (`float`, defaults to 1.0): sigma is drawn logit-normal.
    """

    beta: float = 100.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std!r}.")


class DiffusionDPOTrainer(_OfflineTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA on preference pairs by Diffusion-DPO.

    Args:
        pipe: a pipeline of a supported family (SD 1.x/2.x, SDXL; diffusers' or an aligned one); its denoiser gets the
            LoRA adapter.
        config (:class:`DPOConfig`).
        train_dataset: a list of `ttalign.rewards.evaluation.PreferencePair` (`prompt`, `image_0`, `image_1`,
            `label`: 0 when image 0 is preferred), or a path read by `load_pairs` (a folder with `pairs.jsonl`, or a
            `datasets` dataset in the Pick-a-Pic / HPDv2 layout). Ties are skipped.

    Example:

    ```py
    >>> from ttalign.shapes import load_pipeline
    >>> from ttalign.shapes.pairs import make_shapes_preference_set
    >>> from ttalign.training import DiffusionDPOTrainer, DPOConfig
    >>> pipe = load_pipeline()
    >>> make_shapes_preference_set("pairs", 64)
    >>> trainer = DiffusionDPOTrainer(pipe, DPOConfig(max_steps=10, output_dir="dpo"), train_dataset="pairs")
    >>> trainer.train()
    >>> trainer.save_lora("dpo/lora")  # then pipe.load_lora_weights("dpo/lora"), in diffusers too
    ```
    """

    name = "dpo"

    def __init__(self, pipe, config: DPOConfig, train_dataset):
        from ttalign.rewards.evaluation import load_pairs

        self._check_pipeline(pipe)
        pairs = load_pairs(train_dataset) if isinstance(train_dataset, str) else list(train_dataset)
        self.pairs = [p for p in pairs if p.label in (0.0, 1.0)]
        if not self.pairs:
            raise ValueError("DiffusionDPOTrainer needs at least one preference pair that is not a tie.")
        super().__init__(pipe, config)
        self.noise_scheduler = type(self.model.scheduler).from_config(self.model.scheduler.config)
        self.winners = self._encode_images([p.image_1 if p.label else p.image_0 for p in self.pairs])
        self.losers = self._encode_images([p.image_0 if p.label else p.image_1 for p in self.pairs])
        # one conditioning per pair, shared by winner and loser (size conditioning from image 0, as diffusers' script)
        self.cond = self._conditioning([p.prompt for p in self.pairs], [p.image_0 for p in self.pairs])

    def _check_pipeline(self, pipe) -> None:
        if _is_flow(pipe):
            raise ValueError(
                "DiffusionDPOTrainer trains on noise targets; for a flow-matching pipeline (SD3, FLUX) "
                "use FlowDPOTrainer, its velocity form."
            )

    def training_step(self, generator):
        indices = torch.randint(0, len(self.pairs), (self.config.train_batch_size,), generator=generator)
        winners, losers = self.winners[indices], self.losers[indices]
        noise, timesteps = self._noise_and_timesteps(winners, generator)  # shared by winner and loser
        model_mse, ref_mse = self._mse(
            torch.cat([winners, losers]),
            self.cond.select(indices.repeat(2)),
            torch.cat([noise, noise]),
            timesteps.repeat(2),
        )
        n = len(indices)
        loss, accuracy = diffusion_dpo_loss(model_mse[:n], model_mse[n:], ref_mse[:n], ref_mse[n:], self.config.beta)
        return loss, {"implicit_accuracy": accuracy.item()}


class DiffusionKTOTrainer(_OfflineTrainer):
    """Fine-tunes a pipeline's denoiser with LoRA on binary feedback (desirable / undesirable images) by Diffusion-KTO.

    Args:
        pipe, config (:class:`KTOConfig`).
        train_dataset: a list of `(prompt, PIL image, desirable: bool)`, a folder with `feedback.jsonl` (see
            :func:`load_feedback`), or preference pairs (a list or a `load_pairs` path): each winner is desirable and
            each loser undesirable.

    Example:

    ```py
    >>> from ttalign.training import DiffusionKTOTrainer, KTOConfig
    >>> trainer = DiffusionKTOTrainer(pipe, KTOConfig(max_steps=10, output_dir="kto"), train_dataset="feedback")
    >>> trainer.train()
    ```
    """

    name = "kto"

    def __init__(self, pipe, config: KTOConfig, train_dataset):
        from ttalign.rewards.evaluation import PreferencePair, load_pairs

        self._check_pipeline(pipe, config)
        if isinstance(train_dataset, str):
            if os.path.isfile(os.path.join(train_dataset, "feedback.jsonl")):
                train_dataset = load_feedback(train_dataset)
            else:
                train_dataset = load_pairs(train_dataset)
        records = []
        for item in train_dataset:
            if isinstance(item, PreferencePair):
                if item.label in (0.0, 1.0):
                    win, lose = (item.image_1, item.image_0) if item.label else (item.image_0, item.image_1)
                    records += [(item.prompt, win, True), (item.prompt, lose, False)]
            else:
                records.append(tuple(item))
        if not records:
            raise ValueError("DiffusionKTOTrainer needs at least one feedback record.")
        self.records = records
        super().__init__(pipe, config)
        self.noise_scheduler = type(self.model.scheduler).from_config(self.model.scheduler.config)
        self.latents = self._encode_images([r[1] for r in records])
        self.cond = self._conditioning([r[0] for r in records], [r[1] for r in records])
        self.desirable = torch.tensor([bool(r[2]) for r in records])

    def _check_pipeline(self, pipe, config) -> None:
        if _is_flow(pipe):
            raise ValueError(
                "DiffusionKTOTrainer trains on noise targets; for a flow-matching pipeline (SD3, FLUX) "
                "use FlowKTOTrainer, its velocity form."
            )

    def training_step(self, generator):
        indices = torch.randint(0, len(self.records), (self.config.train_batch_size,), generator=generator)
        latents = self.latents[indices]
        noise, timesteps = self._noise_and_timesteps(latents, generator)
        model_mse, ref_mse = self._mse(latents, self.cond.select(indices), noise, timesteps)
        c = self.config
        loss = diffusion_kto_loss(
            model_mse,
            ref_mse,
            self.desirable[indices].to(latents.device),
            c.beta,
            c.lambda_desirable,
            c.lambda_undesirable,
        )
        return loss, {"desirable_share": self.desirable[indices].float().mean().item()}


class FlowDPOTrainer(DiffusionDPOTrainer):
    """Flow-DPO: Diffusion-DPO's objective on a flow-matching pipeline (SD3, FLUX) with velocity errors
    (Liu et al. 2025, https://arxiv.org/abs/2505.05470, whose official code is unreleased; flow_grpo's SD3 DPO script).

    For a pair, the winner and the loser are noised with the same noise and sigma, `x_t = (1 - sigma) x0 + sigma eps`
    with sigma logit-normal, and each model's error is `||v - u||^2` with `u = eps - x0`, averaged over the latent
    dimensions: `loss = -logsigmoid(-0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l)))`. The reference is the
    transformer with its LoRA disabled. `beta` defaults to 100 (see :class:`FlowDPOConfig`).

    Args:
        pipe: an SD3 or FLUX pipeline (diffusers' or an aligned one).
        config (:class:`FlowDPOConfig`).
        train_dataset: as :class:`DiffusionDPOTrainer`'s.

    Example:

    ```py
    >>> from ttalign.training import FlowDPOConfig, FlowDPOTrainer
    >>> trainer = FlowDPOTrainer(load_pipeline("flow"), FlowDPOConfig(max_steps=10, output_dir="flow-dpo"), "pairs")
    >>> trainer.train()
    ```
    """

    name = "flow-dpo"

    def __init__(self, pipe, config: FlowDPOConfig, train_dataset):
        if not isinstance(config, FlowDPOConfig):
            raise TypeError(f"FlowDPOTrainer takes a FlowDPOConfig (beta 100), got {type(config).__name__}.")
        super().__init__(pipe, config, train_dataset)

    def _check_pipeline(self, pipe) -> None:
        if not _is_flow(pipe):
            raise ValueError(
                "FlowDPOTrainer trains flow-matching pipelines (SD3, FLUX); use DiffusionDPOTrainer for "
                f"{type(pipe).__name__}."
            )


class FlowKTOTrainer(DiffusionKTOTrainer):
    """Flow-KTO: Diffusion-KTO's objective on a flow-matching pipeline (SD3, FLUX) with velocity errors, noised as
    :class:`FlowDPOTrainer` noises (`x_t = (1 - sigma) x0 + sigma eps`, sigma logit-normal, error
    `||v - (eps - x0)||^2` averaged over the latent dimensions); the reference is the transformer with its LoRA
    disabled.

    Args:
        pipe: an SD3 or FLUX pipeline.
        config (:class:`FlowKTOConfig`).
        train_dataset: as :class:`DiffusionKTOTrainer`'s.

    Example:

    ```py
    >>> from ttalign.training import FlowKTOConfig, FlowKTOTrainer
    >>> FlowKTOTrainer(load_pipeline("flow"), FlowKTOConfig(max_steps=10, output_dir="flow-kto"), "feedback").train()
    ```
    """

    name = "flow-kto"

    def _check_pipeline(self, pipe, config) -> None:
        if not isinstance(config, FlowKTOConfig):
            raise TypeError(f"FlowKTOTrainer takes a FlowKTOConfig (beta 100), got {type(config).__name__}.")
        if not _is_flow(pipe):
            raise ValueError(
                "FlowKTOTrainer trains flow-matching pipelines (SD3, FLUX); use DiffusionKTOTrainer for "
                f"{type(pipe).__name__}."
            )
