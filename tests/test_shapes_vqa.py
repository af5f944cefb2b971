"""The shapes world's question decomposition against the exact verifier, and the shapes VQA model's training script
end to end at a tiny size (the committed model is loaded by the same code)."""

import os
import subprocess
import sys

import numpy as np
import torch

from ttalign.shapes.questions import question_truths, shapes_questions
from ttalign.shapes.verifier import detect, verify
from ttalign.shapes.vqa import KINDS, balance, image_queries, perturb
from ttalign.shapes.world import parse_caption, render, sample_scene


def test_a_caption_passes_exactly_when_all_its_questions_hold():
    """The verifier's verdict on a caption is the conjunction of its decomposed questions' answers, on rendered scenes
    and on perturbed captions (true and false ones)."""
    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for _ in range(150):
        objects, caption = sample_scene(rng)
        image = render(objects)
        for text in (caption, perturb(caption, rng), perturb(caption, rng)):
            passed = verify(image[None], [text]).verdicts[0].passed
            truths = question_truths(detect(image), text)
            assert passed == all(truths), (text, truths)
            assert len(truths) == len(shapes_questions(text))
            seen[passed] += 1
    assert min(seen.values()) > 50  # both verdicts well represented


def test_perturbed_captions_stay_in_the_grammar_and_change_something():
    rng = np.random.default_rng(1)
    for _ in range(200):
        caption = sample_scene(rng)[1]
        changed = perturb(caption, rng)
        parse_caption(changed)  # raises outside the grammar
        assert changed != caption


def test_training_questions_are_labelled_and_balanced():
    rng = np.random.default_rng(2)
    rows = []
    for i in range(60):
        objects, caption = sample_scene(rng)
        rows += [(i, *q) for q in image_queries(render(objects), caption, rng)]
    assert {kind for _, kind, _, _ in rows} <= set(KINDS)
    own = [q for _, kind, q, a in rows if kind == "caption" and a]
    assert own and all(q.startswith('Does this figure show "') for q in own)
    kept = balance(rows, rng)
    for kind in KINDS:
        answers = [a for _, k, _, a in kept if k == kind]
        assert sum(answers) * 2 == len(answers)


def test_the_training_script_writes_a_model_that_vqascore_loads(tmp_path):
    out = str(tmp_path / "vqa")
    cmd = [sys.executable, "-m", "ttalign.shapes.vqa", "--out", out, "--scenes", "64", "--generated", "0"]
    cmd += ["--held-out", "32", "--steps", "3", "--batch-size", "8", "--threads", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert {"config.json", "model.safetensors", "training_args.json", "training_log.txt"} <= set(os.listdir(out))
    from ttalign.shapes.vqa import ShapesQuestionScore, ShapesVQAScore

    images = torch.from_numpy(render(sample_scene(np.random.default_rng(3))[0])).permute(2, 0, 1)[None]
    images = images.repeat(2, 1, 1, 1).requires_grad_(True)
    score = ShapesVQAScore(out)(images, ["a red circle", "two blue squares left of a green triangle"])
    assert score.shape == (2,) and ((score > 0) & (score < 1)).all()
    score.sum().backward()
    assert images.grad.abs().sum() > 0
    questions = ShapesQuestionScore(out)
    questions(images.detach(), ["a red circle left of a square", "three yellow triangles"])
    assert [q["kind"] for q in questions.last_details[0]["questions"]] == ["entity", "attribute", "entity", "relation"]


def test_packed_questions_compute_what_single_questions_do():
    """The training layout (an image's questions behind one prefix, block mask, restarted positions) gives each
    question the logits it has when asked alone in the scoring layout."""
    from ttalign.shapes.vqa import Encoded, Packed, _pixels, build_model, build_processor

    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(processor.tokenizer).eval()
    rng = np.random.default_rng(4)
    images, rows = [], []
    for i in range(3):
        objects, caption = sample_scene(rng)
        image = render(objects)
        images.append(image)
        rows += [(i, q, a) for _, q, a in image_queries(image, caption, rng)[: 2 + i]]
    pixels = _pixels(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    packed = Packed(processor, *zip(*rows), descriptions={1: "a red circle"})
    batch = packed.batch([0, 1, 2])
    # image 1's description turn: "a", "red", "circle" and the end token, each predicted from the words before
    tok = processor.tokenizer
    words = tok.convert_tokens_to_ids(["a", "red", "circle"]) + [tok.eos_token_id]
    described = [t for (r, _), t in zip(zip(*batch["answer_at"]), batch["targets"].tolist()) if r == 1][-4:]
    assert described == words
    questions = [k for k in range(len(batch["targets"])) if k not in range(5, 9)]  # image 1's 3 questions end at 5
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=pixels[batch["image_index"]],
        ).logits[batch["answer_at"]][questions]
        single = Encoded(processor, *zip(*rows))
        alone = model(
            input_ids=single.ids[single.question_index],
            attention_mask=single.mask[single.question_index],
            pixel_values=pixels[single.image_index],
            logits_to_keep=1,
        ).logits[:, -1]
    order = [k for i in range(3) for k, r in enumerate(rows) if r[0] == i]
    assert len(logits) == len(rows) == 9
    torch.testing.assert_close(logits, alone[order], atol=1e-4, rtol=1e-4)
    assert torch.equal(batch["targets"][questions], single.targets[order])


def test_the_embedded_model_ranks_true_captions_above_rejected_ones():
    """The committed shapes VQA model, alone (no verifier at scoring time), scores each rendered scene's own caption
    above a perturbed caption that the exact verifier rejects, on most of 48 scenes; both rewards load by name."""
    from ttalign.rewards import load_reward
    from ttalign.shapes.verifier import verify

    rng = np.random.default_rng(5)
    images, true, false = [], [], []
    while len(images) < 48:
        objects, caption = sample_scene(rng)
        image = render(objects)
        wrong = perturb(caption, rng)
        if verify(image[None], [wrong]).verdicts[0].passed:
            continue
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        true.append(caption)
        false.append(wrong)
    pixels = torch.stack(images)
    vqa = load_reward("shapes_vqa")
    with torch.no_grad():
        right, wrong = vqa(pixels, true), vqa(pixels, false)
    assert (right > wrong).float().mean() > 0.8
    questions = load_reward("shapes_questions")
    with torch.no_grad():
        right, wrong = questions(pixels, true), questions(pixels, false)
    assert (right > wrong).float().mean() > 0.8
