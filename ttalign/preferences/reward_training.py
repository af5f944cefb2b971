"""Fitting a reward to preference judgments: a CLIP-style reward fine-tuned by Bradley-Terry on pairs and
Plackett-Luce on rankings, as PickScore (https://arxiv.org/abs/2305.01569) and HPSv2 (https://arxiv.org/abs/2306.09341)
train theirs.

The score is PickScore's, `s(image, prompt) = exp(logit_scale) * cos(image, prompt)` under a `CLIPModel`. A pair's
loss is the two-way cross-entropy of `softmax(s_0, s_1)` against the label (`[1, 0]`, `[0, 1]`, or `[0.5, 0.5]` for a
tie), each pair weighted by one over its prompt's number of pairs (PickScore); a ranking's is Plackett-Luce's,
`-sum_k log softmax(s_{order[k:]})[0]`. `logit_scale` is trained and clamped to `[0, ln 100]` (HPSv2). The trainable
part is the last `trainable_vision_layers` / `trainable_text_layers` transformer blocks of each tower (HPSv2: 20 and
11; all by default) with the projections, fully or through LoRA (`lora_rank`). Prompts are split, not pairs: the
held-out pairs' prompts are never trained on.

The saved reward is a `CLIPModel` folder with its tokenizer and image processor and a `ttalign_reward.json`:
`load_reward(folder)` (and `ttalign serve --reward folder`) loads it as :class:`~ttalign.rewards.PickScore`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ttalign.rewards.evaluation import PreferencePair


@dataclass
class Ranking:
    """A ranked group of images of one prompt: `order` lists the images' positions, best first."""

    prompt: str
    images: list
    order: list[int]

    def __post_init__(self):
        if sorted(self.order) != list(range(len(self.images))) or len(self.images) < 2:
            raise ValueError(f"A ranking orders all of its {len(self.images)} images, got {self.order!r}.")


@dataclass
class RewardTrainingConfig:
    """Settings of :class:`RewardTrainer`.

    Args:
        output_dir (`str`, defaults to `"reward-output"`): checkpoints, the log, and the saved reward (`reward/`).
        learning_rate (`float`, defaults to 3e-6), weight_decay (`float`, defaults to 0.35), warmup_steps (`int`,
            defaults to 500), max_steps (`int`, defaults to 4000), batch_size (`int`, defaults to 16): PickScore's and
            HPSv2's recipes (AdamW, linear warm-up, then cosine decay).
        trainable_vision_layers, trainable_text_layers (`int`, *optional*): how many of each tower's last blocks are
            trained (default: all; HPSv2 trains 20 and 11).
        lora_rank (`int`, defaults to 0): LoRA on the trainable blocks' attention projections instead of full
            fine-tuning (merged into the saved reward).
        held_out (`float`, defaults to 0.1): the share of prompts held out for the report.
        max_grad_norm (`float`, defaults to 1.0), mixed_precision (`str`, defaults to `"no"`), checkpointing_steps
            (`int`, defaults to 500), seed (`int`, defaults to 0).
    """

    output_dir: str = "reward-output"
    learning_rate: float = 3e-6
    weight_decay: float = 0.35
    warmup_steps: int = 500
    max_steps: int = 4000
    batch_size: int = 16
    trainable_vision_layers: int | None = None
    trainable_text_layers: int | None = None
    lora_rank: int = 0
    held_out: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    checkpointing_steps: int = 500
    seed: int = 0

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "checkpointing_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {getattr(self, key)!r}.")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"Bad optimizer settings: learning_rate={self.learning_rate}, weight_decay={self.weight_decay}, "
                f"warmup_steps={self.warmup_steps}."
            )
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out!r}.")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank!r}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def split_by_prompt(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """`(train, held_out)`: the records of a random `fraction` of the prompts held out (at least one prompt when
    `fraction > 0` and there are two or more)."""
    prompts = sorted({p.prompt for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n = min(len(prompts) - 1, max(1, round(fraction * len(prompts)))) if fraction > 0 and len(prompts) > 1 else 0
    held = set(prompts[:n])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


class RewardTrainer:
    """Fine-tunes a CLIP-style reward on preference pairs (Bradley-Terry) and rankings (Plackett-Luce).

    Args:
        base (`str`): a `CLIPModel` folder or hub id with its tokenizer and image processor (e.g.
            `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, PickScore's base; `ttalign/shapes/clip`).
        config (:class:`RewardTrainingConfig`).
        pairs (`list[PreferencePair]`): from any reader (`read_pickapic`, `read_hpdv2`, `load_pairs`, a
            `JudgmentStore` export).
        rankings (`list[Ranking]`, *optional*).

    Example:

    ```py
    >>> from ttalign.preferences import read_pickapic
    >>> from ttalign.preferences.reward_training import RewardTrainer, RewardTrainingConfig
    >>> trainer = RewardTrainer("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", RewardTrainingConfig(), read_pickapic("data"))
    >>> trainer.train()
    >>> trainer.save()  # output_dir/reward: load_reward("output_dir/reward")
    ```
    """

    def __init__(self, base: str, config: RewardTrainingConfig, pairs: list, rankings: list | None = None):
        from accelerate import Accelerator
        from transformers import AutoTokenizer, CLIPModel

        from ttalign.rewards.clip import _image_settings

        records = list(pairs) + list(rankings or [])
        for r in records:
            if not isinstance(r, (PreferencePair, Ranking)):
                raise TypeError(f"Training records are PreferencePair or Ranking, got {type(r).__name__}.")
        if not records:
            raise ValueError("RewardTrainer needs at least one pair or ranking.")
        self.base, self.config = base, config
        self.train_records, self.held_out = split_by_prompt(records, config.held_out, config.seed)
        if not self.train_records:
            raise ValueError("No training record is left after holding out prompts; lower held_out.")
        counts: dict[str, int] = {}
        for r in self.train_records:
            counts[r.prompt] = counts.get(r.prompt, 0) + 1
        self.weights = [1.0 / counts[r.prompt] for r in self.train_records]  # PickScore: 1 / examples per prompt
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        torch.manual_seed(config.seed)
        model = CLIPModel.from_pretrained(base)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.image_settings = {"size": 224, "crop_size": 224, **_image_settings(base)}
        self._set_trainable(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.params = params
        self.step = 0
        self._rng = random.Random(config.seed)

    # --- set-up -----------------------------------------------------------------------------------------------------

    def _set_trainable(self, model) -> None:
        c = self.config
        model.requires_grad_(False)
        blocks = []
        towers = ((model.vision_model, c.trainable_vision_layers), (model.text_model, c.trainable_text_layers))
        for tower, keep in towers:
            layers = list(tower.encoder.layers)
            keep = len(layers) if keep is None else keep
            if not 0 <= keep <= len(layers):
                raise ValueError(f"Can train 0 to {len(layers)} blocks of {type(tower).__name__}, got {keep}.")
            blocks += layers[len(layers) - keep :]
        if c.lora_rank:
            from peft import LoraConfig, inject_adapter_in_model

            names = {n for n, m in model.named_modules() if any(m is b for b in blocks)}
            projections = ("q_proj", "k_proj", "v_proj", "out_proj")
            targets = [
                n
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
                and n.rsplit(".", 1)[-1] in projections
                and any(n.startswith(b + ".") for b in names)
            ]
            if targets:
                config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_rank, target_modules=targets)
                inject_adapter_in_model(config, model)
            for n, p in model.named_parameters():
                p.requires_grad_("lora_" in n)
        else:
            for block in blocks:
                block.requires_grad_(True)
            for module in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
                module.requires_grad_(bool(blocks))
            model.visual_projection.requires_grad_(True)
            model.text_projection.requires_grad_(True)
        model.logit_scale.requires_grad_(True)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # --- scoring ----------------------------------------------------------------------------------------------------

    def _pixels(self, images: list) -> torch.Tensor:
        from ttalign.rewards.preprocess import clip_preprocess

        out = []
        for image in images:
            x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
            s = self.image_settings
            out.append(clip_preprocess(x, s["size"], s["crop_size"], s["mean"], s["std"]))
        return torch.cat(out).to(self.accelerator.device)

    def scores(self, images: list, prompts: list[str]) -> torch.Tensor:
        """`exp(logit_scale) * cos(image, prompt)` per image, `[B]` float32, with gradients."""
        model = self.accelerator.unwrap_model(self.model)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=min(self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings),
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.accelerator.device)
        pixels = self._pixels(images)
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)  # [B, D]
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)  # [B, D]
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return model.logit_scale.float().exp() * (image * text).sum(-1)

    def loss(self, records: list, weights: list[float]) -> torch.Tensor:
        """The weighted mean of Bradley-Terry's loss on pairs and Plackett-Luce's on rankings."""
        losses = []
        pairs = [(r, w) for r, w in zip(records, weights) if isinstance(r, PreferencePair)]
        if pairs:
            images = [r.image_0 for r, _ in pairs] + [r.image_1 for r, _ in pairs]
            s = self.scores(images, [r.prompt for r, _ in pairs] * 2).view(2, -1).t()  # [P, 2]
            target = torch.tensor([[1 - r.label, r.label] for r, _ in pairs], device=s.device)
            w = torch.tensor([w for _, w in pairs], device=s.device)
            losses.append((-(target * s.log_softmax(-1)).sum(-1) * w).sum())
        for r, w in ((r, w) for r, w in zip(records, weights) if isinstance(r, Ranking)):
            s = self.scores(r.images, [r.prompt] * len(r.images))[torch.tensor(r.order)]  # [K], best first
            tail = torch.stack([torch.logsumexp(s[k:], 0) for k in range(len(s) - 1)])  # [K - 1]
            losses.append(w * (tail - s[:-1]).sum())
        return torch.stack(losses).sum() / sum(weights)

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[str]:
        root = self.config.output_dir
        names = [d for d in os.listdir(root) if d.startswith("checkpoint-")] if os.path.isdir(root) else []
        return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]

    def save_checkpoint(self) -> str:
        """Writes `output_dir/checkpoint-<step>` atomically (a temporary folder renamed into place)."""
        from safetensors.torch import save_file

        root = self.config.output_dir
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-checkpoint-")
        model = self.accelerator.unwrap_model(self.model)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(tmp, "trainable.safetensors"))
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step}
        torch.save(state, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "rng.json"), "w") as f:
            json.dump(self._rng.getstate(), f)
        final = os.path.join(root, f"checkpoint-{self.step}")
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-2]:
            shutil.rmtree(old)
        return final

    def load_checkpoint(self, path: str) -> None:
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(os.path.join(path, "trainable.safetensors")).items():
                params[name].copy_(value)
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        with open(os.path.join(path, "rng.json")) as f:
            rng = json.load(f)
        self._rng.setstate((rng[0], tuple(rng[1]), rng[2]))

    # --- the loop ---------------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Runs to `max_steps`, resuming from the latest checkpoint in `output_dir`; returns the held-out report."""
        from tqdm.auto import tqdm

        c = self.config
        if os.path.isdir(c.output_dir):
            for stale in os.listdir(c.output_dir):
                if stale.startswith(".tmp-checkpoint-"):
                    shutil.rmtree(os.path.join(c.output_dir, stale), ignore_errors=True)
        if self.checkpoints():
            self.load_checkpoint(self.checkpoints()[-1])
        log_path = os.path.join(c.output_dir, "logs", "metrics.jsonl")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.model.train()
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train-reward")
        while self.step < c.max_steps:
            rows = [self._rng.randrange(len(self.train_records)) for _ in range(c.batch_size)]
            loss = self.loss([self.train_records[i] for i in rows], [self.weights[i] for i in rows])
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            with torch.no_grad():  # HPSv2: the temperature stays in [0, ln 100]
                self.accelerator.unwrap_model(self.model).logit_scale.clamp_(0, math.log(100))
            self.step += 1
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": self.step, "loss": loss.item()}) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % c.checkpointing_steps == 0 or self.step == c.max_steps:
                self.save_checkpoint()
        bar.close()
        self.model.eval()
        return self.evaluate(self.held_out) if self.held_out else {}

    @torch.no_grad()
    def evaluate(self, records: list, tie_threshold: float | None = None, batch_size: int = 64) -> dict:
        """On pairs: `accuracy` (decided pairs, equal scores half) with its Wilson interval and PickScore's
        `tie_aware_accuracy` (a tie judged right when the scores differ by at most `tie_threshold`; by default the
        threshold that maximizes it on the training pairs)."""
        from .stats import agreement

        pairs = [r for r in records if isinstance(r, PreferencePair)]
        if not pairs:
            return {}
        if tie_threshold is None:
            tie_threshold = self._best_tie_threshold()
        left, right = self._pair_scores(pairs, batch_size)
        choices = ["tie" if p.label == 0.5 else ("left" if p.label == 0 else "right") for p in pairs]
        out = agreement(left, right, choices, tie_threshold)
        out["interval"] = wilson(out["accuracy"] * out["n_decided"], out["n_decided"])
        out["tie_threshold"] = tie_threshold
        return out

    def _pair_scores(self, pairs: list, batch_size: int) -> tuple[list[float], list[float]]:
        left, right = [], []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [p.prompt for p in chunk]
            left += self.scores([p.image_0 for p in chunk], prompts).tolist()
            right += self.scores([p.image_1 for p in chunk], prompts).tolist()
        return left, right

    def _best_tie_threshold(self) -> float:
        pairs = [r for r in self.train_records if isinstance(r, PreferencePair)][:512]
        if not any(p.label == 0.5 for p in pairs):
            return 0.0
        left, right = self._pair_scores(pairs, 64)
        gaps = sorted({abs(a - b) for a, b in zip(left, right)} | {0.0})
        from .stats import agreement

        choices = ["tie" if p.label == 0.5 else ("left" if p.label == 0 else "right") for p in pairs]
        return max(gaps, key=lambda t: agreement(left, right, choices, t)["tie_aware_accuracy"])

    def save(self, directory: str | None = None, report: dict | None = None) -> str:
        """Writes the reward (LoRA merged) as a `CLIPModel` folder with its tokenizer and image processor and a
        `ttalign_reward.json`, atomically; returns the folder (default `output_dir/reward`)."""
        from transformers import CLIPImageProcessor

        directory = directory or os.path.join(self.config.output_dir, "reward")
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-reward-")
        model = self.accelerator.unwrap_model(self.model)
        if self.config.lora_rank:
            import copy

            from peft.tuners.lora import LoraLayer

            model = copy.deepcopy(model)
            for name, module in list(model.named_modules()):
                if isinstance(module, LoraLayer):
                    module.merge()
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        try:
            CLIPImageProcessor.from_pretrained(self.base).save_pretrained(tmp)
        except (OSError, ValueError):
            pass
        with open(os.path.join(tmp, "ttalign_reward.json"), "w") as f:
            json.dump({"reward": "pickscore", "base": self.base, "config": asdict(self.config), "held_out": report}, f)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        return directory
