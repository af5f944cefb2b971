"""VQAScore on tiny Qwen2.5-VL and LLaVA models built from configs, saved and loaded like real checkpoints."""

import pytest
import torch

from ttalign.rewards import VQAScore
from ttalign.rewards.vqa import DEFAULT_TEMPLATE
from ttalign.testing import TINY_VLM_ARCHITECTURES, save_tiny_vlm


@pytest.fixture(scope="module", params=TINY_VLM_ARCHITECTURES)
def vlm(request, tmp_path_factory):
    folder = save_tiny_vlm(str(tmp_path_factory.mktemp(request.param)), request.param)
    return request.param, folder, VQAScore.from_pretrained(folder)


def _images(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _generated_yes_probability(reward: VQAScore, image: torch.Tensor, question: str) -> float:
    """P("Yes") as the model's own generation sees it: the first generated token's logits on the prompt alone (the
    processor on a PIL image, no answer appended)."""
    from PIL import Image

    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    text = reward._prompt_text(question)
    inputs = reward.processor(images=[pil], text=[text], return_tensors="pt")
    out = reward.model.generate(
        **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    (yes,) = reward._answer_token_ids(text, "Yes")
    return out.logits[0][0].float().softmax(-1)[yes].item()


def test_vqascore_is_the_probability_of_yes_that_generation_sees(vlm):
    arch, _, reward = vlm
    # 8-bit values at the processor's own size, so that the PIL path (uint8, rescaled) sees the same pixels
    images = (_images(2, size=56) * 255).round() / 255
    prompts = ["a red circle", "two blue squares left of a green triangle"]
    with torch.no_grad():
        scores = reward(images, prompts)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    for image, prompt, score in zip(images, prompts, scores):
        expected = _generated_yes_probability(reward, image, DEFAULT_TEMPLATE.format(prompt))
        assert score.item() == pytest.approx(expected, rel=1e-4, abs=1e-6), arch


def test_vqascore_batched_equals_one_at_a_time_and_is_differentiable(vlm):
    _, _, reward = vlm
    images = _images(3, seed=1).requires_grad_(True)
    prompts = ["a circle", "three yellow triangles above a red square", "a green square"]
    scores = reward(images, prompts)
    with torch.no_grad():
        one_by_one = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores.detach(), one_by_one, rtol=1e-4, atol=1e-6)
    assert reward.differentiable
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # the gradient is the pixels' own: a step along it raises the score
    with torch.no_grad():
        stepped = reward((images + 0.5 * images.grad / images.grad.abs().max()).clamp(0, 1), prompts)
    assert (stepped > scores.detach()).all()


def test_vqascore_answers_any_question_and_any_answer(vlm):
    _, _, reward = vlm
    images = _images(2, seed=2)
    with torch.no_grad():
        yes = reward.answer_probability(images, ["Is there a circle?", "Is the square red?"])
        no = reward.answer_probability(images, ["Is there a circle?", "Is the square red?"], answer="No")
    assert yes.shape == no.shape == (2,)
    assert not torch.allclose(yes, no)
    assert ((yes + no) <= 1 + 1e-5).all()  # two of the vocabulary's outcomes at the same position


def test_vqascore_in_bfloat16(vlm):
    arch, folder, reward = vlm
    from ttalign.rewards import load_reward

    half = load_reward(f"vqascore:path={folder},dtype=bfloat16")  # as a server's configuration names it
    assert next(half.model.parameters()).dtype == torch.bfloat16
    images = _images(2, seed=3)
    with torch.no_grad():
        full, low = reward(images, ["a circle", "a square"]), half(images, ["a circle", "a square"])
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.05, rtol=0.2, msg=arch)


def test_vqascore_refuses_bad_settings(vlm):
    _, _, reward = vlm
    with pytest.raises(ValueError, match="template must contain"):
        VQAScore(reward.model, reward.processor, template="Is this a cat?")
    with pytest.raises(ValueError, match="batch_size"):
        VQAScore(reward.model, reward.processor, batch_size=0)
    with pytest.raises(ValueError, match="2 questions for 1 images"):
        reward.answer_probability(_images(1), ["a", "b"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(_images(1) * 3, ["a circle"])
