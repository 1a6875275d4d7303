import json

import pytest

from captioning.tokenizer import END_ID, PAD_ID, START_ID, UNK_ID, Tokenizer, standardize


def test_standardize_lowercases_and_strips_punctuation():
    assert standardize("  There is a Red circle, and a blue-square!  ") == "there is a red circle and a blue square"


def test_standardize_strips_punctuation_beyond_ascii_and_keeps_every_scripts_letters():
    """Captions from word processors and other tools: curly quotes and apostrophes, ellipses and
    dashes had become words of their own ('“red”', 'circle…', '—'), apart from the plain ones."""
    assert standardize("“Red” circle… — nice!") == "red circle nice"
    assert standardize("A dog’s toy") == standardize("A dog's toy") == "a dog s toy"
    assert standardize("A «blue» square 🙂, ¡sí!") == "a blue square sí"
    # One word, one entry, however it was typed: a combining accent, full-width letters, a ligature
    assert standardize("Cafe\u0301 CRE\u0300ME") == standardize("café crème") == "café crème"
    assert standardize("ＡＢＣ ﬁsh") == "abc fish"
    # and symbols still part words, before NFKC could make letters of them
    assert standardize("Acme™ logo, 30℃, room №5") == "acme logo 30 room 5"
    assert Tokenizer.build(["Café crème", "cafe\u0301 cre\u0300me"]).words[4:] == ["café", "crème"]
    assert standardize("Ein großes Café。日本語、テスト") == "ein großes café 日本語 テスト"
    assert standardize("नमस्ते दुनिया") == "नमस्ते दुनिया"  # vowel signs are marks, not punctuation
    # What travels with emoji: a variation selector, zero-width joiners, a keycap mark.
    assert standardize(
        "a red heart \u2764\ufe0f, a family \U0001f468\u200d\U0001f469\u200d\U0001f467, 1\ufe0f\u20e3"
    ) == ("a red heart a family 1")
    assert standardize("\u2764\ufe0f") == ""


def test_build_caps_size_and_min_count_deterministically():
    captions = ["a red circle", "a red square", "a blue circle", "a green cross"]
    tok = Tokenizer.build(captions, max_size=7, min_count=1)
    assert tok.words[:4] == ["<pad>", "<unk>", "<start>", "<end>"]
    assert tok.words[4:] == ["a", "circle", "red"]  # by count, ties alphabetical
    assert Tokenizer.build(captions, min_count=2).words[4:] == ["a", "circle", "red"]


def test_encode_decode_round_trip_with_unknown_words_and_padding():
    tok = Tokenizer.build(["a red circle"])
    ids = tok.encode_batch(["A red circle!", "a purple circle"], max_length=6)
    assert ids.shape == (2, 6)
    assert list(ids[0]) == [START_ID, tok.ids["a"], tok.ids["red"], tok.ids["circle"], END_ID, PAD_ID]
    assert ids[1][2] == UNK_ID
    assert tok.decode(ids[0]) == ["a", "red", "circle"]
    assert tok.decode(ids[1]) == ["a", "<unk>", "circle"]


def test_encode_cuts_long_captions_but_keeps_end():
    tok = Tokenizer.build(["one two three four five"])
    ids = tok.encode("one two three four five", max_length=4)
    assert ids == [START_ID, tok.ids["one"], tok.ids["two"], END_ID]


def test_save_load_is_json_and_identical(tmp_path):
    tok = Tokenizer.build(["a red circle", "two blue squares"])
    tok.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["words"] == tok.words
    assert Tokenizer.load(tmp_path / "vocab.json").words == tok.words


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"words": ["a"]}))
    with pytest.raises(ValueError, match="word-vocab-v1"):
        Tokenizer.load(tmp_path / "vocab.json")
