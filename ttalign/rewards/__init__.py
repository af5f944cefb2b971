"""Rewards: `reward(images: float [B, 3, H, W] in [0, 1], prompts: list[str]) -> Tensor[B]`, higher is better."""

from __future__ import annotations

from .base import Reward, check_images, check_scores
from .clip import AestheticMLP, CLIPEmbedder, CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv2
from .image_reward import ImageReward
from .jpeg import JpegCompressibility, JpegIncompressibility
from .judge import VLMJudge
from .preprocess import clip_preprocess
from .questions import LLMQuestions, Question, QuestionScore
from .vqa import VQAScore
from .weighted import WeightedReward

#: Rewards that can be named on the command line: short name -> "module:factory" (imported on use). The hub-backed
#: ones download their default checkpoint on first use; options go to the factory (`vqascore:path=FOLDER`,
#: `vlm_judge:model=NAME,base_url=URL`, see :func:`parse_reward_spec`).
REWARDS: dict[str, str] = {
    "clip": "ttalign.rewards.clip:CLIPScore.from_pretrained",
    "pickscore": "ttalign.rewards.clip:PickScore.from_pretrained",
    "hpsv2.1": "ttalign.rewards.hps:HPSv2.from_pretrained",
    "image_reward": "ttalign.rewards.image_reward:ImageReward.from_pretrained",
    "vqascore": "ttalign.rewards.vqa:VQAScore.from_pretrained",
    "vlm_judge": "ttalign.rewards.judge:VLMJudge",
    "reno": "ttalign.rewards.weighted:WeightedReward.reno",
    "jpeg_compressibility": "ttalign.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "ttalign.rewards.jpeg:JpegIncompressibility",
    "shapes_soft": "ttalign.shapes.soft:ShapesSoftVerifier",
    "shapes_clip": "ttalign.shapes.clip:ShapesCLIPScore",
    "shapes_exact": "ttalign.shapes.verifier:ShapesVerifierReward",
    "shapes_vqa": "ttalign.shapes.vqa:ShapesVQAScore",
    "shapes_questions": "ttalign.shapes.vqa:ShapesQuestionScore",
}


def reward_factory(name: str):
    """The callable behind a short reward name (see `REWARDS`); `ValueError` naming the choices if unknown."""
    import importlib

    if name not in REWARDS:
        raise ValueError(f"Unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}.")
    module, _, path = REWARDS[name].partition(":")
    factory = importlib.import_module(module)
    for attr in path.split("."):
        factory = getattr(factory, attr)
    return factory


def _reward_value(raw: str):
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """`NAME[:key=value,...]` -> `(name, options)`: a reward's short name (see `REWARDS`) and the keyword arguments of
    its factory (numbers, `true` / `false`, or text), e.g. `vlm_judge:model=qwen2.5-vl-7b,base_url=http://h:8000/v1`.
    Written by whoever configures the process (a command line, a server's configuration), never by a request."""
    if not isinstance(spec, str):
        raise ValueError(f"A reward spec must be a string NAME[:key=value,...], got {type(spec).__name__}.")
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in REWARDS:
        raise ValueError(f"Unknown reward {name[:80]!r}; available: {', '.join(sorted(REWARDS))}.")
    kwargs = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"Option {item[:80]!r} of reward {name!r} must be written key=value.")
        if key.strip() in kwargs:
            raise ValueError(f"Option {key.strip()!r} of reward {name!r} is given twice.")
        kwargs[key.strip()] = _reward_value(raw.strip())
    return name, kwargs


def _reward_folder(spec: str) -> tuple[str, str] | None:
    """`(name, folder)` when `spec` is a trained reward's folder (one with a `ttalign_reward.json`), given as
    `FOLDER` (named by its base name) or `NAME=FOLDER`; `None` otherwise."""
    import os

    if not isinstance(spec, str):
        return None
    name, sep, folder = spec.partition("=")
    if not (sep and name.strip().isidentifier() and ":" not in name):
        name, folder = "", spec
    if not os.path.isfile(os.path.join(folder, "ttalign_reward.json")):
        return None
    base = os.path.basename(os.path.normpath(folder))
    return (name.strip() or "".join(c if c.isalnum() or c in "_-." else "_" for c in base)), folder


def reward_spec_name(spec: str) -> str:
    """The name a reward spec is known by (what a server's requests write): `NAME` of `NAME[:options]`, of
    `NAME=FOLDER`, or a trained reward folder's base name."""
    folder = _reward_folder(spec)
    if folder:
        return folder[0]
    return parse_reward_spec(spec)[0]


def load_reward(spec: str) -> Reward:
    """Instantiates a reward by its short name (see `REWARDS`), with its factory's options where the spec names some
    (`NAME[:key=value,...]`, see :func:`parse_reward_spec`), or from a trained reward's folder (`FOLDER` or
    `NAME=FOLDER`, as `ttalign train-reward` writes it); a bad option is a one-line `ValueError` naming it."""
    import json
    import os

    folder = _reward_folder(spec)
    if folder:
        with open(os.path.join(folder[1], "ttalign_reward.json")) as f:
            saved = json.load(f)
        if saved.get("reward") != "pickscore":
            raise ValueError(f"{folder[1]}: unknown trained reward kind {saved.get('reward')!r}.")
        return reward_factory("pickscore")(path=folder[1], processor_path=folder[1])
    name, kwargs = parse_reward_spec(spec)
    try:
        return reward_factory(name)(**kwargs)
    except TypeError as err:
        raise ValueError(f"Reward {name!r}: {str(err).splitlines()[0]}") from None


__all__ = [
    "REWARDS",
    "AestheticMLP",
    "CLIPEmbedder",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "LaionAesthetic",
    "LLMQuestions",
    "PickScore",
    "Question",
    "QuestionScore",
    "VLMJudge",
    "VQAScore",
    "WeightedReward",
    "clip_preprocess",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "check_images",
    "check_scores",
    "load_reward",
    "parse_reward_spec",
    "reward_factory",
    "reward_spec_name",
]
