"""The attention captioner: encoder, teacher-forced decoder, and a one-token inference step.

    encoder: image -> backbone -> Reshape((H*W, C)) -> Dense(attention_dim, relu)     [B, N, D]
    decoder: tokens -> Embedding -> GRU -> Attention(query=GRU out, value=features)
             -> Add(GRU out, context) -> LayerNormalization -> Dense(vocab)             [B, T, V]

With `input_feeding` the GRU's input at each step is the token's embedding and the previous step's
attention context (Luong et al. 2015), so the decoder knows which objects it has looked at, not only
which words it has said; its state is then [GRU state, context].

The step function reuses the decoder's layers, so it computes exactly what the decoder does at one
position; the GRU runs as its cell, which is the same arithmetic without the time loop.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from captioning.backbones import AddCoordinates, ImagePreprocess, get_backbone
from captioning.config import ModelConfig
from captioning.tokenizer import PAD_ID


def build_encoder_head(config: ModelConfig, grid_shape: tuple[int, int, int]) -> keras.Model:
    """Backbone grid [B, h, w, C] -> features [B, h*w, D]. Kept as its own model so training from
    cached backbone features (training.features) trains exactly these weights."""
    height, width, channels = grid_shape
    grid = keras.Input(grid_shape, name="grid")
    # Coordinates appended to every cell, so an attended feature says where it is: spatial
    # relations ("left of", "above") need it, and attention alone is blind to position.
    x = AddCoordinates(name="grid_coordinates")(grid)
    x = layers.Reshape((height * width, channels + 2), name="flatten_grid")(x)
    features = layers.Dense(config.attention_dim, activation="relu", name="project")(x)
    return keras.Model(grid, features, name="encoder_head")


def build_encoder(config: ModelConfig) -> keras.Model:
    """uint8-range image [B, S, S, 3] -> features [B, N, D]: preprocess, backbone, head."""
    backbone_spec = get_backbone(config.backbone)
    backbone = backbone_spec.build(config.image_size, config.weights)
    backbone.trainable = config.trainable_backbone
    images = keras.Input((config.image_size, config.image_size, 3), name="image")
    x = ImagePreprocess(backbone_spec.preprocessing, name="preprocess")(images)
    # A frozen backbone also runs in inference mode, so its BatchNorm statistics stay as loaded.
    grid = backbone(x, training=False) if not config.trainable_backbone else backbone(x)
    head = build_encoder_head(config, tuple(grid.shape[1:]))
    return keras.Model(images, head(grid), name="encoder")


def _attention_layer(kind: str) -> layers.Layer:
    if kind == "luong":
        return layers.Attention(name="attention")
    if kind == "bahdanau":
        return layers.AdditiveAttention(name="attention")
    raise ValueError(f"unknown attention {kind!r}; expected 'luong' or 'bahdanau'")


@keras.saving.register_keras_serializable(package="captioning")
class InputFeedingGRU(layers.Layer):
    """GRU and attention run together step by step, each step's GRU input being [embedding,
    previous context]: the teacher-forced form of DecoderStep with input feeding (zero context first).

    (embedded [R, T, E], features [B, N, D]) -> (GRU outputs, contexts), [R, T, D] each, where R is a
    multiple of B: rows r*K .. r*K+K-1 (K = R / B) are K captions of image r. Training passes each
    image's features once for its K captions: repeating them K times made every step move K times
    the memory, forward and backward (2.8x the step time of the plain GRU at K = 5).
    """

    def __init__(self, units: int, attention: str, **kwargs):
        super().__init__(**kwargs)
        self.units, self.attention_kind = units, attention
        self.cell = layers.GRUCell(units, name="cell")
        self.attention = _attention_layer(attention)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "attention": self.attention_kind}

    def build(self, embedded_shape, features_shape):
        self.cell.build((None, embedded_shape[-1] + self.units))
        self.attention.build([(None, None, self.units), tuple(features_shape)])
        self.built = True

    def call(self, embedded, features):
        rows, images = ops.shape(embedded)[0], ops.shape(features)[0]
        zeros = ops.zeros((rows, self.units), dtype=embedded.dtype)

        def step(carry, x):
            state, previous_context = carry
            output, new_state = self.cell(ops.concatenate([x, previous_context], axis=-1), state)
            new_state = new_state[0] if isinstance(new_state, (list, tuple)) else new_state
            # An image's K captions are K queries of one attention call over its features.
            queries = ops.reshape(output, (images, -1, self.units))
            context = ops.reshape(self.attention([queries, features]), (rows, self.units))
            return (new_state, context), (output, context)

        steps = embedded.shape[1]
        if steps is None:  # a graph loop when the length is only known at run time
            _, (outputs, contexts) = ops.scan(step, (zeros, zeros), ops.transpose(embedded, (1, 0, 2)))
            return ops.transpose(outputs, (1, 0, 2)), ops.transpose(contexts, (1, 0, 2))
        # Unrolled when it is fixed (training batches are padded to one length): faster on CPU.
        carry, outputs, contexts = (zeros, zeros), [], []
        for t in range(steps):
            carry, (output, context) = step(carry, embedded[:, t, :])
            outputs.append(output)
            contexts.append(context)
        return ops.stack(outputs, axis=1), ops.stack(contexts, axis=1)

    def compute_output_spec(self, embedded, features):
        shape = (embedded.shape[0], embedded.shape[1], self.units)
        return keras.KerasTensor(shape, embedded.dtype), keras.KerasTensor(shape, embedded.dtype)


def build_decoder(config: ModelConfig, num_positions: int) -> keras.Model:
    """(tokens [B, T], features [B, N, D]) -> logits [B, T, V], teacher forcing."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    features = keras.Input((num_positions, config.attention_dim), name="features")
    x = layers.Embedding(config.vocab_size, config.embedding_dim, name="embedding")(tokens)
    if config.input_feeding:
        gru_out, context = InputFeedingGRU(config.attention_dim, config.attention, name="gru")(x, features)
    else:
        gru_out, _ = layers.GRU(config.attention_dim, return_sequences=True, return_state=True, name="gru")(x)
        context = _attention_layer(config.attention)([gru_out, features])
    x = layers.Add(name="skip")([gru_out, context])
    x = layers.LayerNormalization(name="layer_norm")(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, name="dropout")(x)
    logits = layers.Dense(config.vocab_size, name="logits")(x)
    return keras.Model([tokens, features], logits, name="decoder")


class DecoderStep:
    """One decoding step over a batch, sharing the decoder's weights.

    (previous tokens [B] int32, state [B, state_size], features [B, N, D])
      -> (next-token log-probabilities [B, V], new state [B, state_size], attention weights [B, N])

    The state is the GRU's [B, D], or with input feeding [GRU state, attention context] [B, 2D]; a
    zero state starts a caption either way.
    """

    def __init__(self, decoder: keras.Model):
        gru = decoder.get_layer("gru")
        self.feeds_context = isinstance(gru, InputFeedingGRU)
        self.embedding = decoder.get_layer("embedding")
        self.gru_cell = gru.cell
        self.attention = gru.attention if self.feeds_context else decoder.get_layer("attention")
        self.layer_norm = decoder.get_layer("layer_norm")
        self.logits = decoder.get_layer("logits")
        self.units = self.gru_cell.units
        self.state_size = self.units * (2 if self.feeds_context else 1)

    def __call__(self, tokens, state, features):
        x = self.embedding(tokens)  # [B, E]
        if self.feeds_context:
            state, previous_context = state[:, : self.units], state[:, self.units :]
            x = ops.concatenate([x, previous_context], axis=-1)
        output, new_state = self.gru_cell(x, state)
        new_state = new_state[0] if isinstance(new_state, (list, tuple)) else new_state
        query = ops.expand_dims(output, 1)  # [B, 1, D]
        context, scores = self.attention([query, features], return_attention_scores=True)
        if self.feeds_context:
            new_state = ops.concatenate([new_state, context[:, 0, :]], axis=-1)
        x = self.layer_norm(query + context)
        logits = self.logits(x)[:, 0, :]
        return tf.nn.log_softmax(logits), new_state, scores[:, 0, :]


class CaptionTrainingModel(keras.Model):
    """Encodes each image once and teacher-forces all its K captions against those features.

    inputs: images [B, S, S, 3], tokens [B, K, T] (the caption inputs: <start> w1 ... wn)
            and, with a scene head, what each grid cell shows [B, N] (training.data.scene_targets)
    output: logits [B, K, T, V]

    The scene head (`scene_classes` > 0) is an auxiliary task for the encoder, in training only: a
    classifier on each grid cell's features names the object at that cell (or none). Its
    cross-entropy is averaged over the object cells and over the background cells apart, and the
    sum times `scene_loss_weight` is added to the caption loss: objects hold 12% of the cells on
    average, so a plain mean over the cells let the background outweigh them. It asks every cell's
    features to say what is there, which is what the decoder's attention reads; the head is not
    part of the saved encoder.
    """

    def __init__(
        self,
        encoder: keras.Model,
        decoder: keras.Model,
        scene_classes: int = 0,
        scene_loss_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.scene_head = layers.Dense(scene_classes, name="scene_head") if scene_classes else None
        self.scene_loss_weight = scene_loss_weight
        self.scene_loss = keras.metrics.Mean(name="scene_loss") if scene_classes else None

    def call(self, inputs, training=False):
        images, tokens, *scene_labels = inputs
        features = self.encoder(images, training=training)  # [B, N, D]
        if self.scene_head is not None:
            if not scene_labels:
                raise ValueError("a training model with a scene head takes (images, tokens, scene labels)")
            cell_loss = keras.losses.sparse_categorical_crossentropy(
                scene_labels[0], self.scene_head(features), from_logits=True
            )
            on_object = ops.cast(ops.greater(scene_labels[0], 0), cell_loss.dtype)
            object_error = ops.sum(cell_loss * on_object) / ops.maximum(ops.sum(on_object), 1.0)
            background_error = ops.sum(cell_loss * (1.0 - on_object)) / ops.maximum(ops.sum(1.0 - on_object), 1.0)
            error = object_error + background_error
            self.add_loss(self.scene_loss_weight * error)
            self.scene_loss.update_state(error)
        # Static sizes where the batch has them, so the decoder sees a fixed caption length.
        captions_per_image = tokens.shape[1] or ops.shape(tokens)[1]
        steps = tokens.shape[2] or ops.shape(tokens)[2]
        if not isinstance(self.decoder.get_layer("gru"), InputFeedingGRU):  # it takes each image's features once
            features = ops.repeat(features, captions_per_image, axis=0)  # [B*K, N, D]
        flat_tokens = ops.reshape(tokens, (-1, steps))
        logits = self.decoder([flat_tokens, features], training=training)
        return ops.reshape(logits, (-1, captions_per_image, steps, ops.shape(logits)[-1]))


def masked_loss(labels, logits):
    """Cross-entropy averaged over real tokens only: sum(loss * mask) / sum(mask)."""
    loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    mask = ops.cast(ops.not_equal(labels, PAD_ID), loss.dtype)
    return ops.sum(loss * mask) / ops.maximum(ops.sum(mask), 1.0)


def masked_accuracy(labels, logits):
    predictions = ops.cast(ops.argmax(logits, axis=-1), labels.dtype)
    mask = ops.cast(ops.not_equal(labels, PAD_ID), "float32")
    hits = ops.cast(ops.equal(predictions, labels), "float32") * mask
    return ops.sum(hits) / ops.maximum(ops.sum(mask), 1.0)
