"""HPSv2 on a tiny open_clip model, loaded through the same code path (create_model + state dict) as the release."""

import json

import numpy as np
import open_clip  # the `rewards` extra, installed by the dev set-up
import pytest
import torch
from PIL import Image

from ttalign.rewards import HPSv2


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / "ttalign-tiny-hps.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(folder / "ttalign-tiny-hps.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("ttalign-tiny-hps", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return folder / "HPS_v2.1_compressed.pt", model.eval()


def test_hps_matches_open_clip_pipeline(tiny_hps):
    checkpoint, model = tiny_hps
    reward = HPSv2.from_pretrained("v2.1", checkpoint=str(checkpoint), arch="ttalign-tiny-hps")
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(2, 3, 7, 9, generator=gen)
    images = torch.nn.functional.interpolate(base, size=(48, 72), mode="bilinear").clamp(0, 1)
    images = (images * 255).round() / 255
    prompts = ["a red circle", "a photo of a cat"]
    scores = reward(images, prompts)

    transform = open_clip.image_transform(32, is_train=False, resize_mode="longest")
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(p) for p in pils]))
        text_features = model.encode_text(open_clip.get_tokenizer("ttalign-tiny-hps")(prompts))
    expected = (
        torch.nn.functional.normalize(image_features, dim=-1) * torch.nn.functional.normalize(text_features, dim=-1)
    ).sum(-1)
    assert torch.allclose(scores, expected, atol=1e-3)
    assert set(reward._text_cache) == set(prompts)


def test_hps_gradients_and_bad_version(tiny_hps):
    checkpoint, _ = tiny_hps
    reward = HPSv2.from_pretrained(checkpoint=str(checkpoint), arch="ttalign-tiny-hps")
    images = torch.rand(1, 3, 40, 24, requires_grad=True)
    reward(images, ["a cat"]).sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    with pytest.raises(ValueError, match="Unknown HPS version 'v3'"):
        HPSv2.from_pretrained("v3", checkpoint=str(checkpoint))
