"""Export a bundle as a TensorFlow SavedModel that TF Serving (or any TensorFlow runtime) can load.

    python -m training export --artifacts model_artifacts/default/1 --output exported/captioner/1

The `serving_default` signature takes encoded images and returns greedy captions, all in-graph:

    image_bytes  string [B]   JPEG / PNG / GIF / BMP bytes (TF Serving REST: {"b64": "..."})
      -> caption     string  [B]   the greedy caption, as POST /caption's `caption`
         log_prob    float32 [B]   summed token log-probability (`captions[0].log_prob`)
         confidence  float32 [B]   calibrated as the service's when the bundle has a calibration,
                                   else the geometric-mean token probability

Preprocessing matches the service's: the first frame, transparency composited on white, grey
made RGB, a bilinear resize to the model's size (antialiased when shrinking, as Pillow's is) and
uint8 pixels, JPEG decoded with the same (accurate) IDCT. Two differences: EXIF orientation is
not applied, and a resize is TensorFlow's, not Pillow's (nor the service's early reduction of
large images), so a resized image's pixels (not an image already at the model's size) differ by
a level at most in most images, by up to 26 at sharp edges of large ones. The greedy loop is a
tf.while_loop over the decoder step the service runs (captioning.model.DecoderStep), stopping at
<end> or the trained caption length.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import tensorflow as tf

from captioning.artifacts import ArtifactError
from captioning.captioner import Captioner
from captioning.model import DecoderStep
from captioning.tokenizer import END_ID, PAD_ID, START_ID

SIGNATURE = "serving_default"


class CaptionerModule(tf.Module):
    """The bundle's encoder and decoder with a serving function: image bytes in, captions out."""

    def __init__(self, captioner: Captioner):
        super().__init__(name="captioner")
        self.encoder = captioner.encoder
        self.decoder = captioner.decoder
        self._step = DecoderStep(captioner.decoder)
        self.words = tf.constant(captioner.tokenizer.words)
        self.image_size = captioner.config.image_size
        self.state_size = captioner.state_size
        self.max_steps = captioner.config.max_length - 2  # as Captioner.max_steps with no limit asked
        # The bundle's calibration of greedy captions (Platt scaling of the mean token log-probability,
        # captioning.calibration), so that `confidence` means what the service's does.
        calibration = captioner.calibration
        self.calibration = None if calibration is None else (float(calibration.slope), float(calibration.bias))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(self, image_bytes):
        images = tf.map_fn(
            self._decode,
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.uint8),
        )
        features = self.encoder(tf.cast(images, tf.float32), training=False)
        ids, log_prob, lengths = self._greedy(features)
        mean_log_prob = log_prob / tf.cast(tf.maximum(lengths, 1), tf.float32)
        confidence = tf.exp(mean_log_prob)
        if self.calibration is not None:
            slope, bias = self.calibration
            confidence = tf.sigmoid(slope * tf.maximum(mean_log_prob, tf.math.log(1e-12)) + bias)
        return {"caption": self._text(ids), "log_prob": log_prob, "confidence": confidence}

    def _decode(self, data):
        # uint8 [H, W, C], C in 1..4. JPEG with the accurate IDCT, Pillow's (decode_image's fast one
        # is a few levels off at edges).
        image = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, expand_animations=False),
        )
        channels = tf.shape(image)[-1]
        image = tf.cast(image, tf.float32)
        colour = tf.cond(channels >= 3, lambda: image[..., :3], lambda: tf.repeat(image[..., :1], 3, axis=-1))
        has_alpha = tf.equal(channels % 2, 0)  # LA or RGBA
        alpha = tf.cond(has_alpha, lambda: image[..., -1:] / 255.0, lambda: tf.ones_like(image[..., :1]))
        rgb = colour * alpha + 255.0 * (1.0 - alpha)  # on white, as the service composites
        size = [self.image_size, self.image_size]
        same_size = tf.reduce_all(tf.equal(tf.shape(rgb)[:2], size))
        rgb = tf.cond(same_size, lambda: rgb, lambda: tf.image.resize(rgb, size, method="bilinear", antialias=True))
        return tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)

    def _greedy(self, features):
        batch = tf.shape(features)[0]

        def keep_going(step, tokens, state, finished, log_prob, lengths, ids):
            return tf.logical_and(step < self.max_steps, tf.logical_not(tf.reduce_all(finished)))

        def advance(step, tokens, state, finished, log_prob, lengths, ids):
            log_probs, state, _ = self._step(tokens, state, features)
            best = tf.argmax(log_probs, axis=-1, output_type=tf.int32)
            active = tf.logical_not(finished)
            log_prob += tf.where(active, tf.gather(log_probs, best, batch_dims=1), 0.0)
            lengths += tf.cast(active, tf.int32)
            best = tf.where(active, best, PAD_ID)
            return (
                step + 1,
                best,
                state,
                tf.logical_or(finished, tf.equal(best, END_ID)),
                log_prob,
                lengths,
                ids.write(step, best),
            )

        start = (
            tf.constant(0),
            tf.fill([batch], START_ID),
            tf.zeros([batch, self.state_size]),
            tf.zeros([batch], tf.bool),
            tf.zeros([batch]),
            tf.zeros([batch], tf.int32),
            tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None]),
        )
        *_, log_prob, lengths, ids = tf.while_loop(keep_going, advance, start)
        ids = tf.cond(ids.size() > 0, lambda: tf.transpose(ids.stack()), lambda: tf.zeros([batch, 0], tf.int32))
        return ids, log_prob, lengths

    def _text(self, ids):
        """Words up to the first <end>, without <pad> and <start>: as Tokenizer.decode."""
        before_end = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=1), 0)
        keep = before_end & tf.not_equal(ids, PAD_ID) & tf.not_equal(ids, START_ID)
        words = tf.ragged.boolean_mask(tf.gather(self.words, ids), keep)
        return tf.strings.reduce_join(words, axis=1, separator=" ")


def export(artifacts: Path, output: Path) -> Path:
    """Verifies and loads the bundle, writes the SavedModel to `output` with the bundle's manifest
    under assets.extra/, and returns `output`. An earlier export there is replaced; anything else
    there is left alone and refused. Written beside `output` first and renamed into place, so a TF
    Serving watching the folder never loads half a model (an earlier export is renamed aside just
    before: two renames, not a deletion, in between)."""
    output, artifacts = Path(output), Path(artifacts)
    if output.resolve() == artifacts.resolve() or artifacts.resolve() in output.resolve().parents:
        raise ArtifactError(f"--output {output} is the bundle itself or inside it: export to another directory")
    if output.exists() and (
        not output.is_dir() or (any(output.iterdir()) and not (output / "saved_model.pb").is_file())
    ):
        raise ArtifactError(
            f"--output {output} exists and is not an earlier export (no saved_model.pb): give a new or empty "
            "directory, e.g. exported/captioner/1 (nothing was written)"
        )
    captioner = Captioner.load(artifacts)
    module = CaptionerModule(captioner)
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve.get_concrete_function()})
    (staging / "assets.extra").mkdir(exist_ok=True)
    (staging / "assets.extra" / "manifest.json").write_text(json.dumps(captioner.manifest, indent=2) + "\n")
    if output.exists():  # the earlier export steps aside, so the folder is never missing for long
        retired = output.with_name(f".{output.name}.replaced")
        shutil.rmtree(retired, ignore_errors=True)
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired)
    else:
        staging.rename(output)
    return output


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="write a bundle as a TensorFlow SavedModel for TF Serving (image bytes -> greedy caption)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--artifacts", type=Path, required=True, help="the bundle to export (verified first)")
    p.add_argument(
        "--output",
        type=Path,
        required=True,
        help="SavedModel directory to write, e.g. exported/captioner/1 for TF Serving's layout",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    output = export(args.artifacts, args.output)
    print(f"SavedModel written to {output} (signature {SIGNATURE}: image_bytes -> caption, log_prob, confidence)")
    return 0
