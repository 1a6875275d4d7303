"""The model core: shapes, step-vs-sequence equivalence, and the decoding strategies."""

import numpy as np
import pytest
import tensorflow as tf

from captioning.backbones import BACKBONES, ImagePreprocess
from captioning.config import ModelConfig
from captioning.decoding import DecodeOptions
from captioning.model import DecoderStep, build_decoder, build_encoder


@pytest.mark.parametrize("input_feeding", [False, True])
@pytest.mark.parametrize("attention", ["luong", "bahdanau"])
def test_shapes_and_step_equals_teacher_forced_decoder(attention, input_feeding):
    sizes = dict(image_size=32, attention_dim=24, embedding_dim=8, vocab_size=30)
    config = ModelConfig(**sizes, attention=attention, input_feeding=input_feeding)
    encoder = build_encoder(config)
    decoder = build_decoder(config, encoder.output.shape[1])
    images = tf.constant(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)), tf.float32)
    features = encoder(images)
    assert features.shape == (3, 16, 24)  # 32 / 8 = 4x4 grid, projected to attention_dim
    tokens = tf.constant(np.random.default_rng(1).integers(1, 30, (3, 7)), tf.int32)
    logits = decoder([tokens, features])
    assert logits.shape == (3, 7, 30)

    step = DecoderStep(decoder)
    assert step.state_size == (48 if input_feeding else 24)
    state = tf.zeros((3, step.state_size))
    for t in range(7):
        log_probs, state, attention_weights = step(tokens[:, t], state, features)
        assert log_probs.shape == (3, 30) and attention_weights.shape == (3, 16)
        np.testing.assert_allclose(attention_weights.numpy().sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(log_probs.numpy(), tf.nn.log_softmax(logits[:, t]).numpy(), atol=1e-5)


def test_input_feeding_decoder_takes_each_images_features_once_for_its_captions():
    """Training passes [B] features for [B*K] captions (image-major); the answer is that of the
    features repeated K times, and the training model's is the decoder's per caption."""
    from captioning.model import CaptionTrainingModel

    config = ModelConfig(image_size=32, attention_dim=24, embedding_dim=8, vocab_size=30, input_feeding=True)
    encoder = build_encoder(config)
    decoder = build_decoder(config, encoder.output.shape[1])
    images = tf.constant(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)), tf.float32)
    tokens = tf.constant(np.random.default_rng(1).integers(1, 30, (3, 2, 7)), tf.int32)  # 2 captions per image
    features = encoder(images)
    grouped = decoder([tf.reshape(tokens, (6, 7)), features])
    repeated = decoder([tf.reshape(tokens, (6, 7)), tf.repeat(features, 2, axis=0)])
    np.testing.assert_allclose(grouped.numpy(), repeated.numpy(), atol=1e-5)
    logits = CaptionTrainingModel(encoder, decoder)([images, tokens])
    np.testing.assert_allclose(logits.numpy(), tf.reshape(repeated, (3, 2, 7, 30)).numpy(), atol=1e-5)


def test_preprocessing_modes():
    pixels = tf.constant([[[[0.0, 127.5, 255.0]]]])
    np.testing.assert_allclose(ImagePreprocess("unit")(pixels).numpy().ravel(), [0, 0.5, 1])
    np.testing.assert_allclose(ImagePreprocess("tf")(pixels).numpy().ravel(), [-1, 0, 1])
    np.testing.assert_allclose(
        ImagePreprocess("caffe")(pixels).numpy().ravel(), [255 - 103.939, 127.5 - 116.779, 0 - 123.68], rtol=1e-5
    )
    with pytest.raises(ValueError):
        ImagePreprocess("bogus")


def test_every_backbone_has_its_own_preprocessing():
    modes = {name: spec.preprocessing for name, spec in BACKBONES.items()}
    assert modes == {
        "small_cnn": "unit",
        "small_cnn_deep": "unit",
        "small_cnn_fullres": "unit",
        "inception_resnet_v2": "tf",
        "efficientnet_b0": "raw",
        "mobilenet_v3_small": "raw",
        "resnet50": "caffe",
    }


def test_greedy_batches_equal_single_image_decoding(tiny_captioner):
    images = np.random.default_rng(3).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    together = tiny_captioner.caption(list(images))
    alone = [tiny_captioner.caption([image])[0] for image in images]
    assert [c[0].tokens for c in together] == [c[0].tokens for c in alone]
    for captions in together:
        (caption,) = captions
        assert 0.0 <= caption.confidence <= 1.0 and caption.log_prob <= 0.0
        assert len(caption.tokens) <= tiny_captioner.config.max_length - 2


@pytest.mark.parametrize("captioner_fixture", ["tiny_captioner", "input_feeding_captioner"])
def test_greedy_caption_matches_an_argmax_loop_over_the_teacher_forced_decoder(captioner_fixture, request):
    """The step path (GRU cell, resident features, XLA) against the decoder model run on the whole
    prefix each time: an independent computation of the same captions."""
    tiny_captioner = request.getfixturevalue(captioner_fixture)

    for seed in range(3):
        image = np.random.default_rng(seed).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
        (caption,) = tiny_captioner.caption(list(image))[0]
        assert caption.tokens == argmax_caption(tiny_captioner, image)


def argmax_caption(captioner, image):
    """The greedy caption of one image [1, S, S, 3] by the teacher-forced decoder model, run on the
    whole prefix at each word: an independent computation of what the step path decodes."""
    from captioning.tokenizer import END_ID, START_ID

    features, prefix = captioner.encode(image), [START_ID]
    for _ in range(captioner.max_steps(DecodeOptions())):
        logits = captioner.decoder([np.array([prefix], np.int32), features], training=False)
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        if token == END_ID:
            break
        prefix.append(token)
    return captioner.tokenizer.decode(prefix[1:])


def test_max_length_limits_words(tiny_captioner):
    images = list(np.random.default_rng(5).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    for captions in tiny_captioner.caption(images, DecodeOptions(max_length=2)):
        assert len(captions[0].tokens) <= 2


def test_invalid_decode_options_are_rejected():
    for bad in [
        DecodeOptions(strategy="nope"),
        DecodeOptions(num_captions=2),
        DecodeOptions(strategy="beam", beam_size=11),
        DecodeOptions(strategy="beam", beam_size=2, num_captions=3),
        DecodeOptions(strategy="sample", temperature=0),
        DecodeOptions(max_length=0),
    ]:
        with pytest.raises(ValueError):
            bad.validate()


def test_captioners_of_one_architecture_share_compiled_programs_and_each_runs_its_own_weights(tiny_captioner, tmp_path):
    """A second version of a model (same design, other weights) reuses the first one's XLA programs,
    so a swap compiles nothing new; what each computes is still its own decoder's."""
    from captioning.captioner import Captioner
    from captioning.tokenizer import START_ID
    from tests.conftest import make_tiny_bundle

    other = Captioner.load(make_tiny_bundle(tmp_path / "other", seed=8))
    assert other.decoder_programs is tiny_captioner.decoder_programs

    images = np.random.default_rng(11).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    slot_ids = np.arange(4)
    tokens = np.full(4, START_ID, np.int32)
    state = np.zeros((4, tiny_captioner.state_size), np.float32)
    log_probs = {}
    for captioner in (tiny_captioner, other):
        slots = captioner.feature_slots(8)
        slots.encode(images, slot_ids)
        log_probs[captioner], _, _ = slots.step(slot_ids, tokens, state)
        expected, _, _ = DecoderStep(captioner.decoder)(tokens, state, captioner.encode(images))
        np.testing.assert_allclose(log_probs[captioner], np.asarray(expected), atol=1e-5)
        # The multi-step greedy program too: the captions of an argmax loop over this decoder.
        for image, (caption,) in zip(images, captioner.caption(list(images))):
            assert caption.tokens == argmax_caption(captioner, image[None])
    assert not np.allclose(log_probs[tiny_captioner], log_probs[other], atol=1e-3)


@pytest.mark.parametrize("variant", [{}, {"input_feeding": True, "attention": "bahdanau"}])
def test_shared_programs_compute_with_each_versions_own_weights(variant, tmp_path):
    from captioning.captioner import Captioner
    from captioning.tokenizer import START_ID
    from tests.conftest import make_tiny_bundle

    first = Captioner.load(make_tiny_bundle(tmp_path / "first", seed=7, **variant))
    second = Captioner.load(make_tiny_bundle(tmp_path / "second", seed=8, **variant))
    assert second.decoder_programs is first.decoder_programs
    rng = np.random.default_rng(0)
    for variable in second.decoder.variables:  # every weight its own, biases and layer norm included
        if "float" in str(variable.dtype):
            variable.assign(rng.normal(0.0, 0.3, variable.shape).astype(variable.dtype))
    images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    slot_ids, tokens = np.arange(4), np.full(4, START_ID, np.int32)
    for captioner in (second, first):  # the second traces first: either may be the template's
        state = rng.normal(0.0, 1.0, (4, captioner.state_size)).astype(np.float32)
        slots = captioner.feature_slots(8)
        slots.encode(images, slot_ids)
        log_probs, new_state, _ = slots.step(slot_ids, tokens, state)
        expected, expected_state, _ = DecoderStep(captioner.decoder)(tokens, state, captioner.encode(images))
        np.testing.assert_allclose(log_probs, np.asarray(expected), atol=1e-5)
        np.testing.assert_allclose(new_state, np.asarray(expected_state), atol=1e-5)
        assert not slots._function("step", 8).captured_inputs  # no weights baked into the program


def test_encode_takes_more_images_than_the_largest_batch_bucket(tiny_captioner):
    from captioning.buckets import BATCH_BUCKETS

    size = tiny_captioner.config.image_size
    images = np.random.default_rng(0).integers(0, 255, (BATCH_BUCKETS[-1] + 3, size, size, 3), dtype=np.uint8)
    features = tiny_captioner.encode(images)
    assert features.shape[0] == len(images)
    np.testing.assert_allclose(features[-3:], tiny_captioner.encode(images[-3:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[:2], tiny_captioner.encode(images[:2]), rtol=1e-5, atol=1e-6)
