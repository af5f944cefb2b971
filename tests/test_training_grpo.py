"""Flow-GRPO (GRPO on SD3 / FLUX, and on DDIM pipelines) and Flow-DPO on tiny components: every loss against its
formula in REFERENCES.md on fixed tensors, the recorded log-probabilities recomputed exactly before any update, the
Fast window, training steps, LoRAs that load in diffusers, and the errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from ttalign.rewards.evaluation import PreferencePair
from ttalign.sampling import (
    flow_sde_step_with_logprob,
    flow_sde_transition,
    gaussian_log_prob,
    stochastic_transition,
)
from ttalign.testing import (
    Redness,
    get_tiny_flux_components,
    get_tiny_flux_pipeline,
    get_tiny_pipeline,
    get_tiny_sd3_components,
    get_tiny_sd3_pipeline,
)
from ttalign.training import (
    DiffusionDPOTrainer,
    DPOConfig,
    FlowDPOConfig,
    FlowDPOTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
    FlowKTOConfig,
    FlowKTOTrainer,
    GRPOConfig,
    GRPOTrainer,
    gaussian_kl,
    group_advantages,
    normalize_advantages,
)

FAMILIES = {
    "sd3": (get_tiny_sd3_pipeline, lambda: StableDiffusion3Pipeline(**get_tiny_sd3_components())),
    "flux": (
        lambda: get_tiny_flux_pipeline(guidance_embeds=True),
        lambda: FluxPipeline(**get_tiny_flux_components(guidance_embeds=True)),
    ),
}
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _flow_scheduler(steps=10, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


# --- the formulas -----------------------------------------------------------------------------------------------


def test_group_advantages_use_the_group_mean_and_the_global_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    prompts = ["a"] * 4 + ["b"] * 4
    std = np.std(rewards.numpy())  # population std over the whole batch, as flow_grpo's numpy tracker
    expected = np.concatenate([(rewards[:4].numpy() - 2.5) / (std + 1e-4), np.zeros(4)])
    assert np.allclose(group_advantages(rewards, prompts).numpy(), expected, atol=1e-6)
    # DDPO's per-prompt statistics differ: a flat group is not blown up by its own tiny std
    flat = torch.tensor([1.0, 1.0, 1.0, 1.001, 0.0, 5.0, 0.0, 5.0])
    assert group_advantages(flat, prompts)[:4].abs().max() < 0.01
    assert normalize_advantages(flat, prompts)[:4].abs().max() > 1.0
    assert group_advantages(torch.tensor([0.0, 100.0]), ["a", "a"], clip=5.0).abs().max() <= 5.0 + 1e-6


def test_gaussian_kl_and_log_prob_are_the_gaussian_formulas():
    torch.manual_seed(0)
    mean, mean_ref, x = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    std = torch.tensor(0.3)
    normal, normal_ref = torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std)
    kl = torch.distributions.kl_divergence(normal, normal_ref).mean(dim=(1, 2, 3))
    assert torch.allclose(gaussian_kl(mean, mean_ref, std), kl, atol=1e-6)
    assert torch.allclose(gaussian_log_prob(x, mean, std), normal.log_prob(x).mean(dim=(1, 2, 3)), atol=1e-6)


def test_flow_transition_keeps_the_step_size_and_matches_the_step():
    scheduler = _flow_scheduler()
    torch.manual_seed(0)
    x, v, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for index in (0, 4, 8):
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        mean, std = flow_sde_transition(scheduler, index, v, x, a=0.7)
        std_t = 0.7 * (sigma / (1 - (sigma if sigma < 1 else float(scheduler.sigmas[1])))) ** 0.5
        assert torch.isclose(std, torch.tensor(std_t * (sigma - sigma_next) ** 0.5))  # std_t sqrt(-dt)
        dt = sigma_next - sigma
        assert torch.allclose(mean, x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, atol=1e-6)
        prev, log_prob = flow_sde_step_with_logprob(scheduler, index, v, x, a=0.7, noise=noise)
        assert torch.allclose(prev, mean + std * noise) and torch.equal(log_prob, gaussian_log_prob(prev, mean, std))
        # stochastic_transition dispatches to it
        same = stochastic_transition(scheduler, index, v, x, 0.7)
        assert torch.equal(same[0], mean) and torch.equal(same[1], std)
    with pytest.raises(ValueError, match="sigma 0"):
        flow_sde_transition(scheduler, 9, v, x, a=0.7)


# --- GRPO -------------------------------------------------------------------------------------------------------


def _grpo(pipe, tmp_path, **kwargs):
    settings = dict(
        num_inference_steps=4,
        guidance_scale=3.0,
        train_batch_size=4,
        group_size=2,
        max_steps=2,
        resolution=32,
        learning_rate=1e-2,
        clip_range=0.2,
        kl_weight=0.04,
        output_dir=str(tmp_path / "o"),
    )
    settings.update(kwargs)
    return GRPOTrainer(pipe, GRPOConfig(**settings), Redness(), PROMPTS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flow_grpo_recomputes_the_recorded_log_probabilities_exactly(family, tmp_path):
    torch.manual_seed(0)
    trainer = _grpo(FAMILIES[family][0](), tmp_path)
    traj = trainer.sample(torch.Generator().manual_seed(0))
    # groups: each prompt twice, consecutive; 4 steps, the last one (to sigma 0) deterministic
    assert traj.prompts[0] == traj.prompts[1] and traj.prompts[2] == traj.prompts[3]
    assert traj.steps == [0, 1, 2] and traj.log_probs.shape == (3, 4)
    assert torch.equal(traj.next_latents[0], traj.latents[1]) and torch.equal(traj.next_latents[1], traj.latents[2])
    assert torch.allclose(traj.advantages, group_advantages(traj.rewards, traj.prompts))
    # the recorded transition is a draw from the step's Gaussian and its log-density is recorded
    scheduler, model = trainer.sampler_pipe.scheduler, trainer.model.replace(scheduler=trainer.sampler_pipe.scheduler)
    with torch.no_grad():
        out = model.denoise(traj.latents[1], scheduler.timesteps[1], traj.conditioning, 3.0)
        mean, std = stochastic_transition(scheduler, 1, out, traj.latents[1], 0.7)
    assert torch.equal(gaussian_log_prob(traj.next_latents[1].float(), mean, std), traj.log_probs[1])
    # before any update the policy is the one that sampled: ratio exactly 1, KL 0, loss = -mean(advantage)
    loss, metrics = trainer.policy_loss(traj, [0, 1, 2])
    assert metrics["ratio"] == 1.0 and metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0
    assert torch.isclose(loss, -traj.advantages.mean(), atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flow_grpo_trains_and_its_lora_loads_in_diffusers(family, tmp_path):
    aligned, parent = FAMILIES[family]
    torch.manual_seed(0)
    trainer = _grpo(aligned(), tmp_path)
    metrics = trainer.train()
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"]) and metrics["kl"] >= 0
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items())
    trainer.save_lora(str(tmp_path / "lora"))
    reference = parent()
    reference.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}
    before = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    reference.load_lora_weights(str(tmp_path / "lora"))
    after = reference("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(after - before).max() > 0


def test_after_an_update_the_ratio_moves_and_the_kl_is_positive(tmp_path):
    torch.manual_seed(0)
    trainer = _grpo(get_tiny_sd3_pipeline(), tmp_path, max_steps=1, learning_rate=5e-2)
    traj = trainer.sample(torch.Generator().manual_seed(3))
    trainer.train()
    _, metrics = trainer.policy_loss(traj, [0, 1, 2])
    assert metrics["ratio"] != 1.0 and metrics["kl"] > 0


def test_flow_grpo_resumes_from_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = _grpo(get_tiny_sd3_pipeline(), tmp_path, max_steps=1, checkpointing_steps=1)
    first.train()
    saved = {k: v.clone() for k, v in first.lora_state().items()}
    torch.manual_seed(0)
    second = _grpo(get_tiny_sd3_pipeline(), tmp_path, max_steps=2, checkpointing_steps=1)
    second.load_checkpoint(second.checkpoints()[-1])
    assert second.step == 1 and all(torch.equal(v, second.lora_state()[k]) for k, v in saved.items())
    assert second.train()["step"] == 2
    with open(tmp_path / "o" / "logs" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_fast_window_samples_the_ode_outside_the_window(tmp_path):
    torch.manual_seed(0)
    trainer = _grpo(
        get_tiny_sd3_pipeline(), tmp_path, num_inference_steps=8, sde_window=2, sde_window_range=(0.0, 0.5)
    )
    starts = set()
    for seed in range(8):
        steps = trainer.stochastic_steps(torch.Generator().manual_seed(seed))
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] <= 4
        starts.add(steps[0])
    assert len(starts) > 1
    traj = trainer.sample(torch.Generator().manual_seed(0))
    assert len(traj.steps) == 2 and traj.steps[1] == traj.steps[0] + 1
    # outside the window the trajectory is the pipeline's ODE: the plain call with the same seed agrees up to it
    _, metrics = trainer.policy_loss(traj, [0, 1])
    assert metrics["ratio"] == 1.0


def test_grpo_on_a_ddim_pipeline_uses_group_advantages(tmp_path):
    torch.manual_seed(0)
    trainer = _grpo(get_tiny_pipeline(), tmp_path, noise_level=1.0)
    traj = trainer.sample(torch.Generator().manual_seed(0))
    assert traj.steps == [0, 1, 2, 3]  # every DDIM step is stochastic (eta 1)
    assert torch.allclose(traj.advantages, group_advantages(traj.rewards, traj.prompts))
    loss, metrics = trainer.policy_loss(traj, [0, 1, 2, 3])
    assert metrics["ratio"] == 1.0 and metrics["kl"] == 0.0
    assert np.isfinite(trainer.train()["loss"])


def test_grpo_config_and_pipeline_are_validated(tmp_path):
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPOConfig(train_batch_size=6, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="noise_level"):
        GRPOConfig(noise_level=0.0)
    with pytest.raises(ValueError, match="sde_variant"):
        GRPOConfig(sde_variant="ode")
    with pytest.raises(ValueError, match="sde_window_range"):
        GRPOConfig(sde_window_range=(0.6, 0.2))
    assert FlowGRPOTrainer is GRPOTrainer and FlowGRPOConfig is GRPOConfig
    from ttalign.testing import get_tiny_components

    pipe = get_tiny_pipeline()
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(get_tiny_components()["scheduler"].config)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        GRPOTrainer(pipe, GRPOConfig(output_dir=str(tmp_path)), Redness(), PROMPTS)


# --- Flow-DPO ---------------------------------------------------------------------------------------------------


def _pairs(n=4):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2 * n)]
    return [PreferencePair(PROMPTS[i % 3], images[2 * i], images[2 * i + 1], float(i % 2)) for i in range(n)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flow_dpo_noises_with_the_flow_and_starts_at_log_2(family, tmp_path):
    aligned, parent = FAMILIES[family]
    torch.manual_seed(0)
    config = FlowDPOConfig(
        max_steps=2, train_batch_size=2, learning_rate=1e-2, resolution=32, output_dir=str(tmp_path / "o")
    )
    assert config.beta == 100.0
    trainer = FlowDPOTrainer(aligned(), config, train_dataset=_pairs())
    x0 = trainer.winners[:2]
    noise, timesteps = trainer._noise_and_timesteps(x0, torch.Generator().manual_seed(0))
    assert ((timesteps > 0) & (timesteps < 1000)).all()
    model_mse, ref_mse = trainer._mse(x0, trainer.cond.select(torch.tensor([0, 1])), noise, timesteps)
    sigma = (timesteps / 1000).view(-1, *[1] * (x0.ndim - 1))
    with torch.no_grad():  # the velocity error at x_t = (1 - sigma) x0 + sigma eps, target u = eps - x0
        cond = trainer.cond.select(torch.tensor([0, 1]))
        v = trainer.model.forward((1 - sigma) * x0 + sigma * noise, timesteps, cond, cfg=False)
    expected = ((v - (noise - x0)) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    assert torch.allclose(model_mse.detach(), expected, atol=1e-6) and torch.allclose(ref_mse, expected, atol=1e-6)
    # the LoRA starts as the reference: the first loss is log 2
    loss, _ = trainer.training_step(torch.Generator().manual_seed(1))
    assert torch.isclose(loss, torch.tensor(np.log(2.0), dtype=loss.dtype), atol=1e-6)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and any(
        "lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items()
    )
    trainer.save_lora(str(tmp_path / "lora"))
    reference = parent()
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(tmp_path / "lora"))


def test_dpo_trainers_refuse_the_other_kind(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="use FlowDPOTrainer"):
        DiffusionDPOTrainer(get_tiny_sd3_pipeline(), DPOConfig(output_dir=out), train_dataset=_pairs())
    with pytest.raises(ValueError, match="use DiffusionDPOTrainer"):
        FlowDPOTrainer(get_tiny_pipeline(), FlowDPOConfig(output_dir=out), train_dataset=_pairs())
    with pytest.raises(TypeError, match="FlowDPOConfig"):
        FlowDPOTrainer(get_tiny_sd3_pipeline(), DPOConfig(output_dir=out), train_dataset=_pairs())
    with pytest.raises(ValueError, match="logit_std"):
        FlowDPOConfig(logit_std=0.0)


# --- Flow-KTO ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flow_kto_trains_on_the_velocity_and_starts_at_one_half(family, tmp_path):
    aligned, parent = FAMILIES[family]
    torch.manual_seed(0)
    config = FlowKTOConfig(
        max_steps=2, train_batch_size=4, learning_rate=1e-2, resolution=32, output_dir=str(tmp_path / "o")
    )
    assert config.beta == 100.0
    trainer = FlowKTOTrainer(aligned(), config, train_dataset=_pairs())  # winners desirable, losers not
    assert trainer.desirable.tolist() == [True, False] * 4
    x0 = trainer.latents[:2]
    noise, timesteps = trainer._noise_and_timesteps(x0, torch.Generator().manual_seed(0))
    model_mse, _ = trainer._mse(x0, trainer.cond.select(torch.tensor([0, 1])), noise, timesteps)
    sigma = (timesteps / 1000).view(-1, *[1] * (x0.ndim - 1))
    with torch.no_grad():
        v = trainer.model.forward(
            (1 - sigma) * x0 + sigma * noise, timesteps, trainer.cond.select(torch.tensor([0, 1])), cfg=False
        )
    expected = ((v - (noise - x0)) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    assert torch.allclose(model_mse.detach(), expected, atol=1e-6)
    # the LoRA starts as the reference: g = 0, h = sigmoid(0), loss = mean(1 - 1/2)
    loss, _ = trainer.training_step(torch.Generator().manual_seed(1))
    assert torch.isclose(loss, torch.tensor(0.5, dtype=loss.dtype), atol=1e-6)
    metrics = trainer.train()
    assert np.isfinite(metrics["loss"]) and any(
        "lora_B" in k and v.abs().sum() > 0 for k, v in trainer.lora_state().items()
    )
    trainer.save_lora(str(tmp_path / "lora"))
    parent().load_lora_weights(str(tmp_path / "lora"))


def test_kto_trainers_refuse_the_other_kind(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="use DiffusionKTOTrainer"):
        FlowKTOTrainer(get_tiny_pipeline(), FlowKTOConfig(output_dir=out), train_dataset=_pairs())
    with pytest.raises(TypeError, match="FlowKTOConfig"):
        FlowKTOTrainer(get_tiny_sd3_pipeline(), DPOConfig(output_dir=out), train_dataset=_pairs())
    with pytest.raises(ValueError, match="logit_std"):
        FlowKTOConfig(logit_std=-1.0)
