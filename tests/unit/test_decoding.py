"""Decoding strategies: scripted next-word tables where the right answer is known by hand, then the
same properties on the offline Captioner with the tiny random bundle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from captioning.decoding import DecodeOptions, new_search
from captioning.tokenizer import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, Tokenizer

TOKENIZER = Tokenizer(list(SPECIAL_TOKENS) + ["a", "b", "c"])
A, B, C = 4, 5, 6
VOCAB = len(TOKENIZER)


def row(**probabilities: float) -> np.ndarray:
    """Log-probabilities over the vocabulary: the named tokens get their share, the rest split 1e-6."""
    ids = {"a": A, "b": B, "c": C, "end": END_ID, "pad": PAD_ID}
    probs = np.full(VOCAB, 1e-6)
    for name, p in probabilities.items():
        probs[ids[name]] = p
    return np.log(probs / probs.sum())


# First word a (0.6) or b (0.4). After a, nothing is likely; after b, <end> is almost certain.
# Greedy takes "a" and ends with 0.6 * 0.35; the best caption is "b" with 0.4 * 0.9.
GREEDY_TRAP = {
    (): row(a=0.6, b=0.4),
    (A,): row(end=0.35, a=0.33, c=0.32),
    (B,): row(end=0.9, c=0.1),
}


def run_scripted(options: DecodeOptions, table: dict, max_steps: int = 4):
    """Drives a search the way the engines do, reading each slot's next-word row from `table`
    (keyed by the slot's words so far; unknown prefixes end at once)."""
    search = new_search(options.validate(), max_steps)
    prefixes = [()] * search.width
    search.start_tokens()
    while not search.finished:
        log_probs = np.stack([table.get(prefix, row(end=1.0)) for prefix in prefixes])
        attention = np.stack([np.full(4, float(len(prefix))) for prefix in prefixes])  # row = step number
        tokens, parents = search.advance(log_probs, attention)
        prefixes = [prefixes[parent] + (int(token),) for token, parent in zip(tokens, parents)]
    return search.results(TOKENIZER)


def test_beam_search_escapes_the_greedy_trap_and_sorts_by_score():
    (greedy,) = run_scripted(DecodeOptions(), GREEDY_TRAP)
    assert greedy.text == "a" and greedy.log_prob == pytest.approx(math.log(0.6 * 0.35), abs=1e-4)
    beam = run_scripted(DecodeOptions(strategy="beam", beam_size=2, num_captions=2), GREEDY_TRAP)
    assert [c.text for c in beam] == ["b", "a"]
    assert beam[0].log_prob == pytest.approx(math.log(0.4 * 0.9), abs=1e-4)
    assert beam[0].confidence == pytest.approx(math.sqrt(0.4 * 0.9), abs=1e-4)  # per token, <end> included


def test_length_normalisation_decides_between_short_and_long_captions():
    # "a" then <end>: p = 0.6 * 0.4 = 0.24 over 2 tokens (0.49 per token). "b c c" then <end>:
    # p = 0.4 * 0.8 * 0.8 * 0.8 = 0.205, less in total but 0.67 per token. The search must not stop
    # when the first two captions end ("a", "a c"): "b c c" is still ahead per token.
    table = {
        (): row(a=0.6, b=0.4),
        (A,): row(end=0.4, c=0.3, a=0.3),
        (B,): row(c=0.8, end=0.2),
        (B, C): row(c=0.8, end=0.2),
        (B, C, C): row(end=0.8, c=0.2),
    }
    per_token = run_scripted(DecodeOptions(strategy="beam", beam_size=2), table, max_steps=6)
    assert per_token[0].text == "b c c"
    assert per_token[0].confidence == pytest.approx(0.2048**0.25, abs=1e-4)
    in_total = run_scripted(DecodeOptions(strategy="beam", beam_size=2, length_penalty=0.0), table, max_steps=6)
    assert in_total[0].text == "a"


def test_attention_rows_stay_with_their_words_when_special_tokens_are_skipped():
    # An untrained model may emit <pad> mid-caption: decode() drops it, and its attention row too.
    table = {(): row(a=1.0), (A,): row(pad=1.0), (A, PAD_ID): row(b=1.0)}
    (caption,) = run_scripted(DecodeOptions(return_attention=True), table)
    assert caption.tokens == ["a", "b"]
    assert [weights[0] for weights in caption.attention] == [0.0, 2.0]  # steps 0 and 2, not 0 and 1


def test_sampling_with_top_k_one_is_greedy_and_seeds_repeat():
    picky = run_scripted(DecodeOptions(strategy="sample", num_captions=3, top_k=1, seed=1), GREEDY_TRAP)
    assert [c.text for c in picky] == ["a", "a", "a"]
    first = run_scripted(DecodeOptions(strategy="sample", num_captions=5, seed=42), GREEDY_TRAP)
    again = run_scripted(DecodeOptions(strategy="sample", num_captions=5, seed=42), GREEDY_TRAP)
    assert [(c.text, c.log_prob) for c in first] == [(c.text, c.log_prob) for c in again]
    assert [c.log_prob for c in first] == sorted((c.log_prob for c in first), reverse=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (DecodeOptions(num_captions=2), "greedy"),
        (DecodeOptions(strategy="beam", beam_size=2, num_captions=3), "beam_size"),
        (DecodeOptions(strategy="beam", beam_size=0), "beam_size"),
        (DecodeOptions(strategy="beam", beam_size=11), "beam_size"),
        (DecodeOptions(strategy="sample", num_captions=11), "num_captions"),
        (DecodeOptions(strategy="sample", temperature=0.0), "temperature"),
        (DecodeOptions(strategy="sample", top_k=0), "top_k"),
    ],
)
def test_impossible_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        options.validate()


# --- the offline Captioner, tiny random bundle ---------------------------------------------------------


@pytest.fixture(scope="module")
def pictures():
    return list(np.random.default_rng(11).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))


def test_beam_size_one_equals_greedy(tiny_captioner, pictures):
    greedy = tiny_captioner.caption(pictures)
    beam = tiny_captioner.caption(pictures, DecodeOptions(strategy="beam", beam_size=1))
    for (g,), (b,) in zip(greedy, beam, strict=True):
        assert b.tokens == g.tokens
        assert b.log_prob == pytest.approx(g.log_prob, abs=1e-5)


@pytest.mark.parametrize("beam_size", [2, 5])
def test_beam_results_are_sorted_by_score_and_score_at_least_as_well_as_greedy(tiny_captioner, pictures, beam_size):
    # The beam's score is the log-probability per token (length_penalty=1), which `confidence`
    # reports as a probability: sorted by one is sorted by the other. Beating greedy is what beam
    # search is for, not a theorem (greedy's path can be pruned); it holds for these fixed inputs,
    # and on the trained model for 97% of the shapes test split.
    greedy = tiny_captioner.caption(pictures)
    beam = tiny_captioner.caption(pictures, DecodeOptions(strategy="beam", beam_size=beam_size, num_captions=beam_size))
    for (g,), captions in zip(greedy, beam, strict=True):
        assert len(captions) == beam_size
        confidences = [c.confidence for c in captions]
        assert confidences == sorted(confidences, reverse=True)
        assert confidences[0] >= g.confidence - 1e-6


def test_sampling_with_a_seed_repeats(tiny_captioner, pictures):
    def sample(seed):
        options = DecodeOptions(strategy="sample", num_captions=3, seed=seed, temperature=0.8, top_k=5)
        results = tiny_captioner.caption(pictures, options)
        return [[(c.text, round(c.log_prob, 5)) for c in captions] for captions in results]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert all(len(captions) == 3 for captions in sample(7))


def test_attention_has_one_grid_row_per_word(tiny_captioner, pictures):
    height, width = tiny_captioner.grid_shape
    options = DecodeOptions(strategy="beam", beam_size=3, num_captions=2, return_attention=True)
    for captions in tiny_captioner.caption(pictures[:2], options):
        for caption in captions:
            assert len(caption.attention) == len(caption.tokens)
            for weights in caption.attention:
                assert len(weights) == height * width
                assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    assert tiny_captioner.caption(pictures[:1])[0][0].attention is None


# The model's first choice is <end> (then <pad>, which is no word): without a floor on the length,
# every strategy would answer an empty caption.
END_FIRST = {
    (): row(end=0.7, pad=0.2, c=0.1),
    (PAD_ID,): row(end=0.8, b=0.2),
    (C,): row(end=0.9, a=0.1),
}


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(),
        DecodeOptions(strategy="beam", beam_size=3, num_captions=3),
        DecodeOptions(strategy="sample", num_captions=3, top_k=2, seed=3),
    ],
    ids=["greedy", "beam", "sample"],
)
def test_min_length_keeps_end_from_coming_before_the_first_word(options):
    captions = run_scripted(options, END_FIRST)
    assert captions and all(caption.text for caption in captions)
    if options.strategy == "greedy":
        # <pad> (no word) then b: log_prob stays the model's own, not a share renormalised without <end>
        assert captions[0].text == "b"
        assert captions[0].log_prob == pytest.approx(math.log(0.2 * 0.2), abs=1e-4)


def test_min_length_zero_keeps_the_old_empty_answer_and_floors_are_validated():
    (caption,) = run_scripted(DecodeOptions(min_length=0), END_FIRST)
    assert caption.text == ""
    with pytest.raises(ValueError, match="min_length"):
        DecodeOptions(min_length=3, max_length=2).validate()
    with pytest.raises(ValueError, match="min_length"):
        DecodeOptions(min_length=-1).validate()


def test_answers_with_enough_words_are_unchanged_by_the_floor():
    for options in (DecodeOptions(strategy="beam", beam_size=2, num_captions=2), DecodeOptions()):
        floored = run_scripted(options, GREEDY_TRAP)
        unfloored = run_scripted(options.__class__(**{**options.__dict__, "min_length": 0}), GREEDY_TRAP)
        assert [(c.text, c.log_prob) for c in floored] == [(c.text, c.log_prob) for c in unfloored]


def one_step_at_a_time(captioner, pictures, options: DecodeOptions):
    """Greedy decoding with one host round trip per token (FeatureSlots.step + GreedySearch.advance),
    the reference for the multi-step call."""
    slots = captioner.feature_slots(len(pictures))
    images = np.stack([captioner.prepare(picture) for picture in pictures])
    slots.encode(images, np.arange(len(images)))
    answers = []
    for index in range(len(images)):
        search = new_search(options, captioner.max_steps(options))
        tokens = search.start_tokens()
        state = np.zeros((1, captioner.state_size), np.float32)
        while not search.finished:
            log_probs, state, attention = slots.step(np.array([index], np.int32), tokens, state)
            tokens, _ = search.advance(log_probs, attention)
        answers.append(search.results(captioner.tokenizer)[0])
    return answers


@pytest.mark.parametrize("min_length", [0, 1, 3, 6])
def test_several_greedy_steps_per_call_choose_what_one_step_at_a_time_chooses(tiny_captioner, pictures, min_length):
    """captioner.caption decodes greedy batches GREEDY_STEPS tokens per compiled call, the argmax and
    the min_length floor taken inside the graph."""
    options = DecodeOptions(min_length=min_length, max_length=9).validate()
    expected = one_step_at_a_time(tiny_captioner, pictures, options)
    got = [captions[0] for captions in tiny_captioner.caption(pictures, options)]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.tokens == theirs.tokens
        assert mine.log_prob == pytest.approx(theirs.log_prob, abs=1e-5)
        assert len(mine.tokens) >= min_length


def sampled_tokens(log_probs: np.ndarray, options: DecodeOptions) -> list[int]:
    search = new_search(options.validate(), max_steps=1)
    tokens, _ = search.advance(log_probs[None, :].repeat(options.num_captions, 0), np.zeros((options.num_captions, 4)))
    return tokens.tolist()


def test_a_seeded_sample_does_not_depend_on_rounding_between_near_ties():
    """Two log-probabilities 6e-6 apart, as the service's batched step and the offline step computed
    them in a different order: argpartition's order of the top k followed, the same draw landed on
    another token, and the seeded caption changed (round 17's engine audit: 2 in about 20 000)."""
    vocabulary = 30
    base = np.log(np.random.default_rng(0).dirichlet(np.ones(vocabulary))).astype(np.float32)
    third = np.sort(base)[-3]
    base[10], base[3] = third, third - 6e-6  # a near tie inside the top k
    nudged = base.copy()
    nudged[10], nudged[3] = nudged[3], nudged[10]  # the other program's rounding: the two swap rank
    # argpartition returns the top 8 in another order for the two (what made the draws differ).
    assert list(np.argpartition(-base, 7)[:8]) != list(np.argpartition(-nudged, 7)[:8])
    for seed in range(200):
        options = DecodeOptions(strategy="sample", seed=seed, temperature=10.0, top_k=8, num_captions=3)
        assert sampled_tokens(base, options) == sampled_tokens(nudged, options), seed


def test_sampling_never_draws_pad_or_start():
    """A high temperature and a top_k over the vocabulary gave them weight: a 200 with an empty caption."""
    flat = np.full(12, -2.5, dtype=np.float32)
    for seed in range(100):
        options = DecodeOptions(strategy="sample", seed=seed, temperature=10.0, top_k=1000, num_captions=5)
        assert not {PAD_ID, START_ID} & set(sampled_tokens(flat, options)), seed
