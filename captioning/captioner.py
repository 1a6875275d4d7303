"""The library API: load a bundle, caption images, and the encode/step pieces a scheduler needs.

    captioner = Captioner.load("model_artifacts/default/7")
    captioner.caption(images)                  # offline: n-best captions per image
    slots = captioner.feature_slots(64)        # for a scheduler: encode into slots, step rows

The pieces run as tf.functions (the decoder step compiled with XLA), and batches are padded up to
a few bucket sizes so that each shape is compiled once, at warm-up, not on a live request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from captioning import known_answer  # noqa: E402
from captioning.artifacts import ArtifactError, load_models, verify_bundle  # noqa: E402
from captioning.buckets import BATCH_BUCKETS, bucket_for  # noqa: E402
from captioning.calibration import FILE as CALIBRATION_FILE  # noqa: E402
from captioning.calibration import Calibration, calibrated_answer
from captioning.config import ModelConfig  # noqa: E402
from captioning.decoding import Caption, DecodeOptions, GreedySearch, Search, new_search  # noqa: E402
from captioning.domain import FILE as DOMAIN_FILE  # noqa: E402
from captioning.domain import DomainModel
from captioning.grounding import FILE as SCENE_HEAD_FILE
from captioning.grounding import SceneHead, read_scene, rerank
from captioning.inference import inference_encoder
from captioning.mirror import MirrorSearch, mirror_permutation, mirrored  # noqa: E402
from captioning.model import DecoderStep  # noqa: E402
from captioning.object_reader import FILE as OBJECT_READER_FILE
from captioning.object_reader import ObjectReader
from captioning.preprocess import model_input  # noqa: E402
from captioning.scenes import Scene
from captioning.tokenizer import END_ID, PAD_ID, START_ID, Tokenizer  # noqa: E402

# Greedy decoder steps per compiled call (FeatureSlots.greedy_steps): the host's bookkeeping and
# call overhead, not the arithmetic, dominate a step at these batch sizes, so several steps per
# call cost less per token; a row that ends mid-call wastes at most GREEDY_STEPS - 1 steps. 8 since
# the encoder got cheaper (docs/ENGINE-HISTORY.md, round 20): 4 had beaten 1 and 2 before that.
GREEDY_STEPS = 8

logger = logging.getLogger(__name__)


def inference_device() -> str:
    """Where the models run: "GPU:0" when TensorFlow sees a GPU (it places the work there), else "CPU"."""
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name.split("device:")[-1] if gpus else "CPU"


def _load_object_reader(bundle: Path) -> ObjectReader:
    """The bundle's object reader (verified with the rest), loaded in Keras's safe mode."""
    try:
        model = keras.saving.load_model(bundle / OBJECT_READER_FILE, compile=False, safe_mode=True)
        return ObjectReader(model)
    except (ValueError, OSError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"{bundle}: could not load {OBJECT_READER_FILE}: {exc}") from exc


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.zeros((rows - array.shape[0],) + array.shape[1:], dtype=array.dtype)
    return np.concatenate([array, padding])


class DecoderPrograms:
    """The decoder's compiled programs (one step; several greedy steps), with its weights as arguments.

    XLA keeps every program it compiles for as long as the process lives (TensorFlow offers no way
    to evict one), keyed by the traced function. Traced anew for each Captioner, a service that
    swapped model versions grew by about 54 MiB a swap. One DecoderPrograms per decoder
    architecture (`shared`) is traced on the first decoder of that architecture and run with any
    such decoder's weights: a swap between versions of one architecture compiles nothing new,
    and its warm-up finds every program compiled.
    """

    _shared: dict[str, DecoderPrograms] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, decoder: keras.Model, vocab_size: int) -> DecoderPrograms:
        # Same configuration and variable shapes, same programs. Not the variables' paths: Keras
        # numbers some per process (a second load's seed generator is "seed_generator_1").
        key = json.dumps(
            [decoder.get_config(), vocab_size, [(list(v.shape), v.dtype) for v in decoder.variables]],
            sort_keys=True,
            default=str,
        )
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(decoder, vocab_size)
            return cls._shared[key]

    def __init__(self, template: keras.Model, vocab_size: int):
        # The template's layers give the programs their code; inside them every read of one of its
        # variables returns the weight passed in its place (Keras's StatelessScope), so the traced
        # graph holds no weights of its own. The template is kept: its variables are the keys.
        decoder_step = DecoderStep(template)
        self.state_size = decoder_step.state_size
        variables = list(template.variables)

        def with_weights(weights):
            return keras.StatelessScope(state_mapping=list(zip(variables, weights, strict=True)))

        @tf.function(jit_compile=True, reduce_retracing=True)
        def step_rows(weights, features, slot_of_row, tokens, state):
            with with_weights(weights):
                return decoder_step(tokens, state, tf.gather(features, slot_of_row))

        @tf.function(jit_compile=True, reduce_retracing=True)
        def greedy_rows(weights, features, slot_of_row, tokens, state, words, min_words, steps):
            # `steps` greedy steps in one XLA program, the argmax taken in the graph exactly as
            # GreedySearch takes it: <end> ruled out while a row has fewer than min_words words.
            with with_weights(weights):
                rows_features = tf.gather(features, slot_of_row)
                end_column = tf.range(vocab_size) == END_ID
                chosen, chosen_log_probs, attentions = [], [], []
                for _ in range(steps):
                    log_probs, state, attention = decoder_step(tokens, state, rows_features)
                    early_end = (words < min_words)[:, None] & end_column[None, :]
                    tokens = tf.argmax(tf.where(early_end, -np.inf, log_probs), axis=1, output_type=tf.int32)
                    words += tf.cast((tokens != PAD_ID) & (tokens != START_ID) & (tokens != END_ID), tf.int32)
                    chosen.append(tokens)
                    chosen_log_probs.append(tf.gather(log_probs, tokens, batch_dims=1))
                    attentions.append(attention)
                return tf.stack(chosen), tf.stack(chosen_log_probs), tf.stack(attentions), state

        self.step_rows, self.greedy_rows = step_rows, greedy_rows


class Captioner:
    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        tokenizer: Tokenizer,
        config: ModelConfig,
        manifest: dict | None = None,
        calibration: Calibration | None = None,
        domain: DomainModel | None = None,
        encoder_precision: str | None = None,
        scene_head: SceneHead | None = None,
        object_reader: ObjectReader | None = None,
    ):
        self.encoder = encoder
        self.encoder_precision = encoder_precision  # None: the encoder as trained (captioning.inference)
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config
        self.manifest = manifest or {}
        self.calibration = calibration  # maps raw confidence to P(correct); None: raw
        self.domain = domain  # out-of-domain detector; None: not fitted for this bundle
        self.scene_head = scene_head  # the cell classifier of grounded decoding; None: the bundle has none
        self.object_reader = object_reader  # grounded decoding's second look at each object's shape; None: none
        self.decoder_programs = DecoderPrograms.shared(decoder, config.vocab_size)
        # The weights as the programs take them: the runtime's variables, in the programs' order.
        self.decoder_weights = [variable.value for variable in decoder.variables]
        self.num_positions, self.feature_size = encoder.output.shape[1], encoder.output.shape[2]
        self.state_size = self.decoder_programs.state_size  # the feature size, or twice it with input feeding
        side = int(round(self.num_positions**0.5))
        self.grid_shape = (side, self.num_positions // side)
        try:  # None: the vocabulary cannot word a mirrored caption, so no mirror view
            self.mirror_permutation: np.ndarray | None = mirror_permutation(tokenizer)
        except ValueError:
            self.mirror_permutation = None
        size = config.image_size

        def run_encoder(images):  # uint8 images -> features, inside each compiled function below
            return encoder(tf.cast(images, tf.float32), training=False)

        self._encode_graph = tf.function(run_encoder, input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        # FeatureSlots' compiled pieces. They take the slots' variable as an argument, so every
        # FeatureSlots of this model shares one trace; the decoder's two also take its weights,
        # so every Captioner of this architecture shares them (DecoderPrograms).

        cell_classifier = None
        if scene_head is not None:
            cell_classifier = (tf.constant(scene_head.weights), tf.constant(scene_head.bias))

        @tf.function(reduce_retracing=True)
        def encode_into(features, images, slots):
            encoded = run_encoder(images)[: tf.shape(slots)[0]]
            features.scatter_nd_update(slots[:, None], encoded)
            # What the domain check needs of them (captioning.domain.pool_features), pooled here:
            # [B, 2D] leaves the runtime instead of the [B, N, D] grid, and numpy does not pool it.
            mean, variance = tf.nn.moments(encoded, axes=[1])
            pooled = tf.concat([mean, tf.sqrt(variance)], axis=1)
            if cell_classifier is None:
                return pooled, tf.zeros([tf.shape(encoded)[0], 0], tf.int32)
            weights, bias = cell_classifier  # grounded decoding's reading of each cell: [B, N] labels
            return pooled, tf.argmax(tf.einsum("bnd,dk->bnk", encoded, weights) + bias, axis=-1, output_type=tf.int32)

        self._encode_into = encode_into
        self._offline_slots: FeatureSlots | None = None  # caption()'s own, made on first use
        self._offline_lock = threading.Lock()

    @classmethod
    def load(cls, bundle: str | Path, fitted_stages: bool = True, encoder_precision: str | None = None) -> Captioner:
        """The verified bundle. fitted_stages=False leaves its calibration and domain check unread
        (still verified): what `calibrate` and `fit-domain` use, since they fit those anew.
        encoder_precision "float32" or "bfloat16" serves the encoder rewritten for inference
        (captioning.inference); None keeps it as trained, as training and export need it."""
        bundle = Path(bundle)
        manifest = verify_bundle(bundle)
        config, encoder, decoder = load_models(bundle)
        try:
            tokenizer = Tokenizer.load(bundle / "vocab.json")
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{bundle}: could not load the bundle: {exc}") from exc
        if len(tokenizer) != config.vocab_size:
            raise ArtifactError(f"{bundle}: vocabulary has {len(tokenizer)} words, config says {config.vocab_size}")
        listed = set(manifest["files"]) if fitted_stages else set()
        try:  # optional stages; verify_bundle has checked every file the manifest lists
            calibration = Calibration.load(bundle / CALIBRATION_FILE) if CALIBRATION_FILE in listed else None
            domain = DomainModel.load(bundle / DOMAIN_FILE) if DOMAIN_FILE in listed else None
            # Trained with the encoder, not fitted after it: read whatever the stage.
            scene_head = SceneHead.load(bundle / SCENE_HEAD_FILE) if SCENE_HEAD_FILE in manifest["files"] else None
        except (ValueError, OSError, KeyError) as exc:
            raise ArtifactError(f"{bundle}: could not load the bundle: {exc}") from exc
        object_reader = _load_object_reader(bundle) if OBJECT_READER_FILE in manifest["files"] else None
        if object_reader is not None and scene_head is None:
            raise ArtifactError(
                f"{bundle}: {OBJECT_READER_FILE} re-reads the scene head's objects, and there is no scene head"
            )
        if scene_head is not None and scene_head.feature_size != encoder.output.shape[-1]:
            raise ArtifactError(
                f"{bundle}: {SCENE_HEAD_FILE} reads features of {scene_head.feature_size} values, the encoder "
                f"gives {encoder.output.shape[-1]}: the two files come from different models"
            )
        pooled_size = 2 * encoder.output.shape[-1]  # captioning.domain.pool_features: mean and deviation
        if domain is not None and domain.mean.size != pooled_size:
            raise ArtifactError(
                f"{bundle}: {DOMAIN_FILE} was fitted to an encoder of another width ({domain.mean.size} pooled "
                f"features, this one gives {pooled_size}): run `python -m training fit-domain` on this bundle"
            )
        size = config.image_size
        if tuple(encoder.inputs[0].shape[1:]) != (size, size, 3):
            raise ArtifactError(
                f"{bundle}: the encoder takes images {tuple(encoder.inputs[0].shape[1:])}, config.json says "
                f"{size}x{size}: the config is not this model's"
            )
        if decoder.output.shape[-1] != config.vocab_size:
            raise ArtifactError(
                f"{bundle}: the decoder predicts {decoder.output.shape[-1]} words, config.json and the vocabulary "
                f"say {config.vocab_size}: the decoder is another model's"
            )
        if tuple(decoder.inputs[1].shape[1:]) != tuple(encoder.output.shape[1:]):
            raise ArtifactError(
                f"{bundle}: the decoder takes features {tuple(decoder.inputs[1].shape[1:])}, the encoder gives "
                f"{tuple(encoder.output.shape[1:])}: the two files come from different models"
            )
        if encoder_precision is not None:
            encoder = inference_encoder(encoder, encoder_precision)
        # After the rewrite, so the encoder that will serve is the one checked.
        if known_answer.KEY in manifest:
            try:
                known_answer.check(encoder, decoder, size, manifest[known_answer.KEY], scene_head)
            except known_answer.UnrecordedSceneHead as exc:
                raise ArtifactError(f"{bundle}: {exc}") from None
            except known_answer.KnownAnswerMismatch as exc:
                raise ArtifactError(
                    f"{bundle}: {exc}: the encoder, decoder and scene head were not trained together, or a file "
                    "was replaced and the manifest rewritten"
                ) from None
        else:
            logger.warning(
                "%s: the manifest records no known answer, so its encoder, decoder and scene head (if any) are not "
                "checked against each other (bundles written before round 23; captioning.known_answer)",
                bundle,
            )
        return cls(
            encoder,
            decoder,
            tokenizer,
            config,
            manifest,
            calibration,
            domain,
            encoder_precision,
            scene_head,
            object_reader,
        )

    # --- the pieces a scheduler drives -------------------------------------------------------

    def prepare(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Any PIL image or HxWx3 uint8 array -> the model's uint8 input [S, S, 3], by the service's
        path for an upload of the same pixels (captioning.preprocess: the early box reduction of
        a large picture, then the one resize)."""
        size = self.config.image_size
        if isinstance(image, np.ndarray):
            if image.shape == (size, size, 3) and image.dtype == np.uint8:
                return image
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return model_input(image, size)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> features [B, N, D], any B: in chunks of the largest batch bucket,
        each padded to a bucket internally."""
        step = BATCH_BUCKETS[-1]
        chunks = [images[start : start + step] for start in range(0, max(len(images), 1), step)]
        return np.concatenate(
            [self._encode_graph(_pad_rows(chunk, bucket_for(len(chunk)))).numpy()[: len(chunk)] for chunk in chunks]
        )

    def read_scenes(self, images: np.ndarray, cells: np.ndarray) -> list[Scene]:
        """What grounded decoding reranks by, for uint8 images [B, S, S, 3] and their scene head's
        cell labels [B, N] (FeatureSlots.encode): the scene the cells show (captioning.grounding),
        each object's shape read again from the pixels when the bundle has an object reader."""
        scenes = [read_scene(labels, self.grid_shape) for labels in cells]
        if self.object_reader is None:
            return scenes
        return self.object_reader.refine(images, scenes, self.grid_shape)

    def results(self, search: Search, scene: Scene | None = None) -> list[Caption]:
        """A finished search's captions, their confidence calibrated when the bundle says how; with
        grounded decoding, reranked by the image's scene (read_scenes), a caption written from it
        first where captioning.grounding.written_caption says so."""
        captions = search.results(self.tokenizer)
        if search.options.grounded:
            if scene is None:
                raise ValueError("grounded decoding needs the image's scene")
            words = (search.options.min_length, self.max_steps(search.options))
            captions = rerank(captions, scene, words)[: search.options.num_captions]
        if self.calibration is not None:
            options = search.options
            for rank, caption in enumerate(captions):
                fit = self.calibration.for_caption(
                    options.strategy, options.mirror_view, options.candidates, rank, calibrated_answer(caption)
                )
                caption.raw_confidence = caption.confidence
                caption.confidence = fit.apply(caption.confidence)
        return captions

    def domain_scores(self, images: np.ndarray) -> np.ndarray | None:
        """uint8 [B, S, S, 3] -> domain scores [B] (see captioning.domain; in domain when >= 0.5),
        or None when the bundle has no domain model. One encoder pass of its own."""
        if self.domain is None:
            return None
        return self.domain.scores(self.encode(images), images)

    def feature_slots(self, capacity: int = BATCH_BUCKETS[-1]) -> FeatureSlots:
        """Device-resident image features for a batched search: see FeatureSlots. Each caller that
        decodes needs its own."""
        return FeatureSlots(self, capacity)

    def check(self, options: DecodeOptions) -> None:
        """ValueError for valid options this model cannot decode with (DecodeOptions.validate
        checks the rest): a mirror view needs both words of each mirrored pair in the vocabulary."""
        if options.mirror_view and self.mirror_permutation is None:
            raise ValueError("mirror_view: this model's vocabulary has only one of 'left' and 'right'")
        if options.grounded and self.scene_head is None:
            raise ValueError("grounded: this model has no scene head (trained without --scene-loss-weight)")

    def new_search(self, options: DecodeOptions) -> Search:
        """The search for one image under `options` (validated): the strategy's, wrapped in a
        MirrorSearch with mirror_view."""
        self.check(options)
        search = new_search(options, self.max_steps(options))
        if options.mirror_view:
            search = MirrorSearch(search, self.mirror_permutation, self.grid_shape)
        return search

    def max_steps(self, options: DecodeOptions) -> int:
        """Tokens to generate at most: a caption cut at the limit has no <end>."""
        trained = self.config.max_length - 2
        words = trained if options.max_length is None else min(options.max_length, trained)
        return words

    def warmup(self) -> None:
        """Prepares every bucket shape of the offline path, so no caption() call pays for it."""
        with self._offline_lock:
            self._slots().warmup()

    # --- offline captioning --------------------------------------------------------------------

    def caption(self, images, options: DecodeOptions = DecodeOptions(), batch_size: int = 32) -> list[list[Caption]]:
        """Captions for each image (n-best lists, best first). Images: PIL images or uint8 arrays.

        Thread-safe, one call at a time: concurrent callers wait for each other (a service batches
        them instead; see app.engine)."""
        options.validate()
        results: list[list[Caption]] = []
        per_batch = max(1, min(batch_size, BATCH_BUCKETS[-1]) // options.width)
        with self._offline_lock:
            for start in range(0, len(images), per_batch):
                chunk = np.stack([self.prepare(image) for image in images[start : start + per_batch]])
                results.extend(self._caption_batch(chunk, options))
        return results

    def _slots(self) -> FeatureSlots:
        if self._offline_slots is None:
            self._offline_slots = self.feature_slots()
        return self._offline_slots

    def _caption_batch(self, images: np.ndarray, options: DecodeOptions) -> list[list[Caption]]:
        """Decodes a batch to completion. View v of image i (captioning.mirror.views) has its features
        in slot v * B + i; finished searches leave the rows, so every step runs on as few rows as
        are still decoding."""
        slots, width, count = self._slots(), options.width, len(images)
        if options.mirror_view:
            images = np.concatenate([images, mirrored(images)])
        _, cells = slots.encode(images, np.arange(len(images)))
        searches = [self.new_search(options) for _ in range(count)]
        if isinstance(searches[0], GreedySearch):
            return self._greedy_batch(slots, searches)
        slot_of_row = np.concatenate([s.view_of_row() * count + i for i, s in enumerate(searches)]).astype(np.int32)
        state = np.zeros((len(slot_of_row), self.state_size), np.float32)
        tokens = np.concatenate([s.start_tokens() for s in searches])
        active = list(range(count))  # the search of each width-row block, in row order
        while active:
            log_probs, new_state, attention = slots.step(slot_of_row, tokens, state)
            kept = []
            for n, i in enumerate(active):
                mine = slice(n * width, (n + 1) * width)
                next_tokens, parents = searches[i].advance(log_probs[mine], attention[mine])
                tokens[mine] = next_tokens
                state[mine] = new_state[mine][parents]
                if not searches[i].finished:
                    kept.append(n)
            if len(kept) < len(active):
                survivors = (np.arange(width) + np.array(kept, dtype=np.int64)[:, None] * width).ravel()
                slot_of_row, tokens, state = slot_of_row[survivors], tokens[survivors], state[survivors]
                active = [active[n] for n in kept]
        scenes = self.read_scenes(images[:count], cells[:count]) if options.grounded else [None] * count
        return [self.results(search, scenes[i]) for i, search in enumerate(searches)]

    def _greedy_batch(self, slots: FeatureSlots, searches: list[GreedySearch]) -> list[list[Caption]]:
        """_caption_batch for greedy searches: GREEDY_STEPS steps per call (FeatureSlots.greedy_steps)."""
        active = list(range(len(searches)))
        slot_of_row = np.arange(len(searches), dtype=np.int32)
        tokens = np.concatenate([search.start_tokens() for search in searches])
        state = np.zeros((len(searches), self.state_size), np.float32)
        min_words = np.array([search.options.min_length for search in searches], np.int32)
        while active:
            words = np.array([searches[i].hypothesis.words for i in active], np.int32)
            chosen, log_probs, attention, state = slots.greedy_steps(slot_of_row, tokens, state, words, min_words)
            kept = [
                row
                for row, i in enumerate(active)
                if not searches[i].advance_many(chosen[:, row], log_probs[:, row], attention[:, row])
            ]
            tokens = chosen[-1]
            if len(kept) < len(active):
                slot_of_row, tokens, state, min_words = slot_of_row[kept], tokens[kept], state[kept], min_words[kept]
                active = [active[row] for row in kept]
        return [self.results(search) for search in searches]


class FeatureSlots:
    """Image features resident in a tf.Variable (on the GPU where there is one), one slot per image.

    Every decoder step reads the features of every row ([B, N, D]: 4 MiB at 64 rows). Passed in
    from numpy, they would be copied into the runtime at every token. Here each image's features
    are written once, when it is encoded, and a step names the slot of each row: rows can be
    reordered freely (the caller's tokens and states are small numpy arrays), and the beams of
    one image share its slot.

        slots = captioner.feature_slots(64)
        slots.encode(images, slot_ids)                                   # images[i] -> slot slot_ids[i]
        log_probs, new_state, attention = slots.step(slot_of_row, tokens, state)

    The step is compiled with XLA (jit_compile): a few dozen small ops fused into a few kernels,
    about half the time of the unfused graph at 32-64 rows (measured on this project's CPU).
    Batches are padded to BATCH_BUCKETS sizes; warmup() compiles each one.
    """

    def __init__(self, captioner: Captioner, capacity: int):
        self.captioner = captioner
        self.capacity = capacity
        shape = [capacity, captioner.num_positions, captioner.feature_size]
        self._features = tf.Variable(tf.zeros(shape), trainable=False)
        # The traced function of each bucket, called directly: a tf.function call matches its
        # arguments against every trace first, which cost more host time than the step itself.
        self._traced: dict[tuple[str, int], object] = {}

    def _function(self, kind: str, rows: int, steps: int = 1):
        traced = self._traced.get((kind, rows, steps))
        if traced is None:
            state_size, size = self.captioner.state_size, self.captioner.config.image_size
            row_ids = tf.TensorSpec([rows], tf.int32)
            if kind == "step":
                traced = self.captioner.decoder_programs.step_rows.get_concrete_function(
                    self.captioner.decoder_weights,
                    self._features,
                    row_ids,
                    row_ids,
                    tf.TensorSpec([rows, state_size], tf.float32),
                )
            elif kind == "greedy":
                traced = self.captioner.decoder_programs.greedy_rows.get_concrete_function(
                    self.captioner.decoder_weights,
                    self._features,
                    row_ids,
                    row_ids,
                    tf.TensorSpec([rows, state_size], tf.float32),
                    row_ids,
                    row_ids,
                    steps,
                )
            else:
                traced = self.captioner._encode_into.get_concrete_function(
                    self._features, tf.TensorSpec([rows, size, size, 3], tf.uint8), tf.TensorSpec([None], tf.int32)
                )
            self._traced[(kind, rows, steps)] = traced
        return traced

    def encode(self, images: np.ndarray, slot_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Encodes uint8 images [B, S, S, 3] as one batch (padded to a bucket) into the given slots;
        returns their pooled features [B, 2D] (captioning.domain.pool_features, for the domain score)
        and, when the model has a scene head, each image's cell labels [B, N] (captioning.grounding)."""
        bucket = bucket_for(len(images))
        pooled, cells = self._function("encode", bucket)(
            self._features, tf.constant(_pad_rows(images, bucket)), tf.constant(np.asarray(slot_ids, np.int32))
        )
        return pooled.numpy(), (cells.numpy() if self.captioner.scene_head is not None else None)

    def step(
        self, slot_of_row: np.ndarray, tokens: np.ndarray, state: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder step for B rows: (features slot [B], tokens [B], state [B, D]) ->
        (log_probs [B, V], new state [B, D], attention [B, N])."""
        rows = len(tokens)
        bucket = bucket_for(rows)
        log_probs, new_state, attention = self._function("step", bucket)(
            self.captioner.decoder_weights,
            self._features,
            tf.constant(_pad_rows(np.asarray(slot_of_row, np.int32), bucket)),
            tf.constant(_pad_rows(np.asarray(tokens, np.int32), bucket)),
            tf.constant(_pad_rows(np.asarray(state, np.float32), bucket)),
        )
        return log_probs.numpy()[:rows], new_state.numpy()[:rows], attention.numpy()[:rows]

    def greedy_steps(
        self,
        slot_of_row: np.ndarray,
        tokens: np.ndarray,
        state: np.ndarray,
        words: np.ndarray,
        min_words: np.ndarray,
        steps: int = GREEDY_STEPS,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`steps` greedy decoder steps for B rows in one call (multi-step decoding): the rows'
        features slot, previous tokens, state, words so far and min_length ->
        (chosen tokens [steps, B], their log-probabilities [steps, B], attention [steps, B, N],
        state after the last step [B, D]). A row that ends mid-call goes on decoding past its <end>;
        the caller drops what follows (cheaper than a host round trip per token)."""
        rows = len(tokens)
        bucket = bucket_for(rows)
        chosen, log_probs, attention, new_state = self._function("greedy", bucket, steps)(
            self.captioner.decoder_weights,
            self._features,
            tf.constant(_pad_rows(np.asarray(slot_of_row, np.int32), bucket)),
            tf.constant(_pad_rows(np.asarray(tokens, np.int32), bucket)),
            tf.constant(_pad_rows(np.asarray(state, np.float32), bucket)),
            tf.constant(_pad_rows(np.asarray(words, np.int32), bucket)),
            tf.constant(_pad_rows(np.asarray(min_words, np.int32), bucket)),
            steps,  # a constant of the trace: its concrete function takes it back
        )
        return (
            chosen.numpy()[:, :rows],
            log_probs.numpy()[:, :rows],
            attention.numpy()[:, :rows],
            new_state.numpy()[:rows],
        )

    def buckets(self) -> list[int]:
        return [rows for rows in BATCH_BUCKETS if rows <= bucket_for(self.capacity)]

    def warmup(self, greedy_steps: int | None = GREEDY_STEPS) -> None:
        """Runs every bucket shape up to the capacity once (compiling the XLA programs for each);
        greedy_steps None leaves the multi-step programs to warmup_greedy()."""
        size = self.captioner.config.image_size
        for rows in self.buckets():
            slot_ids = np.arange(rows) % self.capacity
            self.encode(np.zeros((rows, size, size, 3), np.uint8), slot_ids)
            self.step(slot_ids, np.zeros(rows, np.int32), np.zeros((rows, self.captioner.state_size), np.float32))
            if greedy_steps is not None:
                self.warmup_greedy(rows, greedy_steps)

    def trace_greedy(self, steps: int) -> None:
        """Traces the `steps`-step greedy program of every bucket without compiling it (~0.5 s in
        all). XLA's persistent compilation cache keys a program by its function's name, which
        TensorFlow numbers from a process-wide counter that every call of a compiled piece moves:
        traced before any request, the names are the same on every start and a restart loads what
        the last one compiled; traced while requests run, every start compiled them again."""
        for rows in self.buckets():
            self._function("greedy", rows, steps)

    def warmup_greedy(self, rows: int, steps: int) -> None:
        """Compiles the `steps`-step greedy program for one bucket (about a second each on a CPU)."""
        zeros = np.zeros(rows, np.int32)
        state = np.zeros((rows, self.captioner.state_size), np.float32)
        self.greedy_steps(np.arange(rows) % self.capacity, zeros, state, zeros, zeros, steps)
