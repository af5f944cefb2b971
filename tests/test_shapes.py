"""The shapes world: generator, grammar, exact verifier and soft verifier."""

import numpy as np
import pytest
import torch

from ttalign.rewards import load_reward
from ttalign.shapes import (
    CATEGORIES,
    ShapesCLIPScore,
    ShapesSoftVerifier,
    ShapesVerifierReward,
    evaluation_prompts,
    parse_caption,
    render,
    sample_scene,
    verify,
)
from ttalign.shapes.verifier import placement
from ttalign.shapes.world import ShapeObject, sample_batch


def _images(objects_list):
    return torch.from_numpy(np.stack([render(o) for o in objects_list]).transpose(0, 3, 1, 2).copy())


def test_generator_is_seeded_and_covers_every_category():
    a, captions_a = sample_batch(np.random.default_rng(0), 60)
    b, captions_b = sample_batch(np.random.default_rng(0), 60)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert a.shape == (60, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert {parse_caption(c).category for c in captions_a} == set(CATEGORIES)


@pytest.mark.parametrize(
    "caption, category, phrases, relation",
    [
        ("a circle", "single_object", 1, None),
        ("a red square", "colors", 1, None),
        ("three triangles", "counting", 1, None),
        ("two blue circles", "counting", 1, None),
        ("a circle and a square", "two_objects", 2, None),
        ("a red circle and a blue square", "color_attribution", 2, None),
        ("a circle left of a square", "position", 2, "left of"),
        ("a yellow triangle below a green circle", "position", 2, "below"),
    ],
)
def test_parse_caption(caption, category, phrases, relation):
    spec = parse_caption(caption)
    assert spec.category == category and len(spec.phrases) == phrases and spec.relation == relation


@pytest.mark.parametrize("caption", ["a purple circle", "two circle", "a circle near a square", "circle"])
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError, match="Caption"):
        parse_caption(caption)


def test_verifier_passes_clean_renders_in_every_category():
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, category) for category in CATEGORIES for _ in range(100)]
    result = verify(_images([o for o, _ in scenes]), [c for _, c in scenes])
    assert set(result.category_accuracy) == set(CATEGORIES)
    for category, accuracy in result.category_accuracy.items():
        assert accuracy >= 0.99, (category, accuracy)


RED_CIRCLE = ShapeObject("circle", "red", 9, 16, 5.5)
BLUE_SQUARE = ShapeObject("square", "blue", 23, 16, 5.5)


@pytest.mark.parametrize(
    "objects, caption, failed_clause",
    [
        ([RED_CIRCLE], "a blue circle", "exists 1 blue circle"),  # wrong colour
        ([RED_CIRCLE], "a red square", "exists 1 red square"),  # wrong shape
        ([RED_CIRCLE, BLUE_SQUARE], "a circle right of a square", "1 circle right of 1 square"),  # wrong position
        ([RED_CIRCLE, BLUE_SQUARE], "a blue circle and a red square", "exists 1 blue circle"),  # swapped colours
        ([RED_CIRCLE, ShapeObject("circle", "red", 23, 16, 5.5)], "three red circles", "exactly 3 red circle"),
        ([], "a circle", "exists 1 circle"),  # nothing drawn
    ],
)
def test_verifier_fails_wrong_images(objects, caption, failed_clause):
    verdict = verify(_images([objects]), [caption]).verdicts[0]
    assert not verdict.passed
    assert verdict.clauses[failed_clause] is False


def test_verifier_passes_the_matching_caption_and_reports_objects():
    verdict = verify(_images([[RED_CIRCLE, BLUE_SQUARE]]), ["a red circle left of a blue square"]).verdicts[0]
    assert verdict.passed and all(verdict.clauses.values())
    assert sorted((o.color, o.shape) for o in verdict.objects) == [("blue", "square"), ("red", "circle")]


def test_placement_against_the_layout_of_a_position_caption():
    images = _images([[RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE], [BLUE_SQUARE], [RED_CIRCLE]])
    captions = [
        "a red circle left of a blue square",
        "a red circle right of a blue square",
        "a red circle left of a blue square",
        "a red circle",
    ]
    verdicts = verify(images, captions).verdicts
    assert [placement(v) for v in verdicts] == [[True, True], [False, False], [None, True], []]


def test_verifier_reward_scores_the_share_of_clauses_and_strict_the_pass():
    images = _images([[RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE], [RED_CIRCLE], []])
    captions = [
        "a red circle left of a blue square",
        "a red circle right of a blue square",
        "a red circle left of a blue square",
        "a red circle",
    ]
    # clauses: 3 of 3; both phrases but not the relation; the circle only; nothing
    assert load_reward("shapes_exact")(images, captions).tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert ShapesVerifierReward(strict=True)(images, captions).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert not ShapesVerifierReward().differentiable


def test_verifier_accepts_pil_and_larger_images():
    from PIL import Image

    array = (render([RED_CIRCLE]) * 255).astype(np.uint8)
    image = Image.fromarray(array).resize((64, 64), Image.BICUBIC)
    assert verify([image], "a red circle").passed == [True]
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        verify([image], ["a red circle", "a circle"])


def test_evaluation_set_is_fixed():
    prompts = evaluation_prompts()
    assert len(prompts) == 240 and prompts == evaluation_prompts()
    assert {c for _, c in prompts} == set(CATEGORIES)
    assert all(parse_caption(p).category == c for p, c in prompts)


def test_soft_verifier_prefers_the_true_caption():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, category) for category in CATEGORIES for _ in range(10)]
    images = _images([o for o, _ in scenes])
    captions = [c for _, c in scenes]
    reward = ShapesSoftVerifier()
    true = reward(images, captions)
    wrong_captions = captions[1:] + captions[:1]
    wrong = reward(images, wrong_captions)
    mismatched = ~torch.tensor(verify(images, wrong_captions).passed)
    assert true.shape == (60,) and ((true > 0) & (true <= 1)).all()
    assert (true[mismatched] > wrong[mismatched]).float().mean() >= 0.9


def test_soft_verifier_gradients_reach_the_pixels():
    images = _images([[RED_CIRCLE, BLUE_SQUARE]]).requires_grad_()
    ShapesSoftVerifier()(images, ["a red circle left of a blue square"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_soft_verifier_bad_input():
    reward = ShapesSoftVerifier()
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        reward(torch.full((1, 3, 32, 32), 2.0), ["a circle"])
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\]"):
        reward(torch.zeros(1, 32, 32), ["a circle"])
    with pytest.raises(ValueError, match="not in the shapes-world grammar"):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a dog"])


def test_wilson_interval_and_sign_test_match_their_formulas():
    from ttalign.shapes.evaluate import paired, sign_test, wilson_interval

    # Wilson 95% for 8 / 10: centre (0.8 + 1.92 / 10) / 1.384, half-width 1.96 sqrt(0.016 + 0.0096) / 1.384
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0 and wilson_interval(20, 20)[1] == 1 and wilson_interval(0, 0) == (0, 1)
    with pytest.raises(ValueError, match="successes=5, n=4"):
        wilson_interval(5, 4)
    assert sign_test(0, 0) == 1 and sign_test(5, 5) == 1
    assert sign_test(6, 0) == pytest.approx(2 / 64) and sign_test(1, 9) == pytest.approx(2 * 11 / 1024)
    base = [["colors", True], ["colors", False], ["counting", False], ["counting", True]]
    run = [["colors", True], ["colors", True], ["counting", True], ["counting", False]]
    assert paired(base, run) == {"wins": 2, "losses": 1, "p_value": 1.0}
    with pytest.raises(ValueError, match="same prompts"):
        paired(base, run[::-1])


def test_select_best_is_best_of_the_first_n_and_pass_at_n():
    from ttalign.shapes.evaluate import select_best

    scores = torch.tensor([[0.1, 0.9, 0.5, 2.0], [0.7, 0.7, float("nan"), 0.1], [float("nan"), 0.2, 0.3, 0.0]])
    assert select_best(scores, 1).tolist() == [0, 0, 0]  # one candidate: the plain sample
    assert select_best(scores, 2).tolist() == [1, 0, 1]  # ties: the first; NaN never wins
    assert select_best(scores, 3).tolist() == [1, 0, 2]
    assert select_best(scores, 4).tolist() == [3, 0, 2]
    # pass@n: the verdicts as scores pick a passing candidate whenever one of the first n passed
    passed = torch.tensor([[False, False, True, False], [False, False, False, False], [False, True, True, False]])
    hits = [bool(passed[i, j]) for i, j in enumerate(select_best(passed.float(), 3))]
    assert hits == [True, False, True]
    assert not passed[0, select_best(passed.float(), 2)[0]]
    with pytest.raises(ValueError, match="n must be in \\[1, 4\\], got 5"):
        select_best(scores, 5)
    with pytest.raises(ValueError, match="shape \\[P, K\\]"):
        select_best(scores[0], 1)


def test_diversity_of_identical_and_of_moved_images():
    from ttalign.shapes.evaluate import diversity

    prompt = "a red circle"
    same = _images([[RED_CIRCLE]] * 3)
    moved = _images(
        [[RED_CIRCLE], [ShapeObject("circle", "red", 23, 16, 5.5)], [ShapeObject("circle", "red", 16, 9, 6.5)]]
    )
    embedder = ShapesCLIPScore().embedder
    d_same = diversity(embedder.image_embeds(same), verify(same, [prompt] * 3), 3)
    d_moved = diversity(embedder.image_embeds(moved), verify(moved, [prompt] * 3), 3)
    assert d_same["clip_distance"] == pytest.approx(0, abs=1e-5) and d_same["position_spread"] == 0
    assert d_moved["clip_distance"] > 1e-3 and d_moved["position_spread"] > 5 and d_moved["size_spread"] > 0
    assert d_same["prompts"] == 1
    with pytest.raises(ValueError, match="images_per_prompt=2"):
        diversity(embedder.image_embeds(same), verify(same, [prompt] * 3), 2)
