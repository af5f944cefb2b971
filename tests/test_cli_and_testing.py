"""The command line and the locally built tiny components."""

import pytest
from PIL import Image

from ttalign.cli import main
from ttalign.testing import DEFAULT_WORDS, build_clip_vocab, get_tiny_tokenizer


def test_generate_writes_an_image(tmp_path, capsys):
    out = tmp_path / "sub" / "image.png"
    code = main(
        [
            "generate",
            "a red circle",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--seed",
            "0",
            "--out",
            str(out),
            "--align",
            "best_of_n:n=2,reward=jpeg_incompressibility",
            "--align",
            "trace_latents",
        ]
    )
    assert code == 0
    assert Image.open(out).size == (64, 64)
    printed = capsys.readouterr().out
    assert "reward:" in printed and "nfe: 4" in printed
    assert [p.name for p in out.parent.iterdir()] == ["image.png"]  # no temporary file left behind


def test_generate_is_seeded(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        assert main(["generate", "a cat", "--model", "tiny", "--steps", "2", "--seed", "7", "--out", str(path)]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize(
    "align, message",
    [
        ("nope", "Unknown alignment method 'nope'; available: attend_and_excite, best_of_n,"),
        ("best_of_n:n=2,reward=nope", "Unknown reward 'nope'"),
        ("best_of_n:k=2", "Unknown option 'k' for method 'best_of_n'"),
        ("trace_latents:every", "must be written key=value"),
    ],
)
def test_generate_rejects_bad_methods_concisely(tmp_path, capsys, align, message):
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--align", align, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_generate_reports_a_missing_model(tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"could not load model '{tmp_path / 'missing'}'" in err and "Traceback" not in err


def test_tokenizer_has_one_token_per_vocabulary_word():
    tokenizer = get_tiny_tokenizer()
    for word in DEFAULT_WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    # other words fall back to sub-word pieces, never to the unknown token
    tokens = tokenizer.tokenize("zebras")
    assert len(tokens) > 1 and tokenizer.unk_token not in tokens
    assert tokenizer("a cat", padding="max_length", max_length=77).input_ids[-1] == tokenizer.pad_token_id


def test_vocab_merges_are_consistent():
    vocab, merges = build_clip_vocab(["tree", "red", "street", "reed"])
    for merge in merges:
        left, right = merge.split(" ")
        assert left + right in vocab
    assert len(set(vocab.values())) == len(vocab)
    with pytest.raises(ValueError, match="must be alphabetic"):
        build_clip_vocab(["a1"])
