"""`python -m training finetune-scst`: self-critical sequence training (Rennie et al. 2017).

    python -m training finetune-scst --artifacts model_artifacts/shapeworld/1 --output model_artifacts/shapeworld/2 \\
        --dataset coco --data annotations_file=.../captions_train.json --data images_dir=.../images

Fine-tunes a trained bundle for the caption metric instead of word-level likelihood. For each
batch of images the model samples `--samples` captions per image and decodes one greedily; each
sample's reward is its CIDEr-D against the image's references (document frequencies from the
training references, training/cider_d.py), plus `--grounded-weight` x 1 when the shapes checker
finds it entirely true and complete (datasets with scenes only). The greedy caption's reward is the
baseline: samples that beat the model's own test-time output are reinforced, the rest pushed down:

    loss = - mean_i (r(w_i) - r(w_greedy)) * sum_t log p(w_i,t | w_i,<t, image)

With `--only-better` the advantages below zero are set to zero: only samples that beat the greedy
caption move the model. Pushing every worse sample down is what lets the policy settle on one
phrasing for every image (on ShapeWorld, a short one-object statement even where the references
state relations; docs/MODEL.md section 5, the runs in docs/MODEL-EXPERIMENTS.md); without those
pushes the greedy captions keep the forms that win on some images.

The encoder is kept frozen (its features are computed once per batch, so the domain check fitted
on them stays valid and is carried over); the decoder is trained with Adam at a small learning rate.
Confidence calibration is NOT carried over (the confidences move): run `calibrate` again.

With `--dev-images N` the last N training images are held out: every `--eval-every` steps the
greedy captions of those images are scored with the same reward, and the decoder weights of the
best score are the ones saved. Long runs can overshoot (the reward peaks, then falls as the policy
collapses onto a few phrasings); this stops at the peak without looking at the validation split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from captioning.model import DecoderStep
from captioning.tokenizer import END_ID, PAD_ID, START_ID

HYPER_PARAMETERS = dict(
    steps=400,
    batch_size=16,
    samples=5,
    only_better=False,
    learning_rate=5e-5,
    grounded_weight=0.0,
    clipnorm=1.0,
    seed=1234,
    dev_images=0,
    eval_every=100,
)


class SelfCriticalTrainer:
    """Holds the decoder being trained, its sampler and optimizer."""

    def __init__(self, decoder: keras.Model, max_length: int, learning_rate: float, clipnorm: float = 1.0):
        self.decoder = decoder
        self.max_steps = max_length - 1  # tokens after <start>, <end> included
        self.optimizer = keras.optimizers.Adam(learning_rate, clipnorm=clipnorm)
        step = DecoderStep(decoder)
        max_steps = self.max_steps

        @tf.function(reduce_retracing=True)
        def generate(features, greedy, seed):
            rows = tf.shape(features)[0]
            tokens = tf.fill([rows], START_ID)
            state = tf.zeros([rows, step.state_size])
            out = []
            for t in range(max_steps):
                log_probs, state, _ = step(tokens, state, features)
                sampled = tf.random.stateless_categorical(log_probs, 1, seed=tf.stack([seed, t]))[:, 0]
                tokens = tf.cast(tf.where(greedy, tf.argmax(log_probs, axis=-1), sampled), tf.int32)
                out.append(tokens)
            return tf.stack(out, axis=1)

        @tf.function(reduce_retracing=True)
        def train_step(features, sequences, advantages):
            inputs = tf.concat([tf.fill([tf.shape(sequences)[0], 1], START_ID), sequences[:, :-1]], axis=1)
            mask = tf.cast(tf.not_equal(sequences, PAD_ID), tf.float32)
            with tf.GradientTape() as tape:
                logits = decoder([inputs, features], training=True)
                log_probs = tf.nn.log_softmax(logits)
                token_log_probs = tf.gather(log_probs, sequences, batch_dims=2)
                sequence_log_probs = tf.reduce_sum(token_log_probs * mask, axis=1)
                loss = -tf.reduce_mean(advantages * sequence_log_probs)
            gradients = tape.gradient(loss, decoder.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, decoder.trainable_variables))
            return loss

        self._generate, self._train_step = generate, train_step

    def generate(self, features: np.ndarray, greedy: bool, seed: int = 0) -> np.ndarray:
        """Token ids [R, max_steps]: everything after the first <end> is <pad>."""
        sequences = self._generate(tf.constant(features), tf.constant(greedy), tf.constant(seed, tf.int32)).numpy()
        return cut_at_end(sequences)

    def step(self, features: np.ndarray, sequences: np.ndarray, advantages: np.ndarray) -> float:
        return float(
            self._train_step(
                tf.constant(features, tf.float32), tf.constant(sequences, tf.int32), tf.constant(advantages, tf.float32)
            )
        )


def cut_at_end(sequences: np.ndarray) -> np.ndarray:
    sequences = sequences.copy()
    for row in sequences:
        ends = np.flatnonzero(row == END_ID)
        if ends.size:
            row[ends[0] + 1 :] = PAD_ID
    return sequences


def scst_batch(
    trainer: SelfCriticalTrainer,
    encoder,
    tokenizer,
    images: np.ndarray,
    reward_fn,
    samples: int,
    seed: int,
    only_better: bool = False,
) -> dict:
    """One self-critical update on a batch of images; reward_fn(i, text) -> float for image i.
    `only_better`: samples worse than the greedy caption get advantage 0 instead of a negative one."""
    features = encoder(tf.cast(images, tf.float32), training=False).numpy()
    greedy = trainer.generate(features, greedy=True)
    repeated = np.repeat(features, samples, axis=0)
    sampled = trainer.generate(repeated, greedy=False, seed=seed)
    text = lambda ids: " ".join(tokenizer.decode(ids))  # noqa: E731
    baseline = np.array([reward_fn(i, text(ids)) for i, ids in enumerate(greedy)])
    rewards = np.array([reward_fn(j // samples, text(ids)) for j, ids in enumerate(sampled)])
    advantages = rewards - np.repeat(baseline, samples)
    if only_better:
        advantages = np.maximum(advantages, 0.0)
    loss = trainer.step(repeated, sampled, advantages)
    return {"loss": loss, "reward": float(rewards.mean()), "greedy_reward": float(baseline.mean())}


def greedy_reward(trainer: SelfCriticalTrainer, tokenizer, features: np.ndarray, reward_fn, batch: int = 256) -> float:
    """Mean reward of the greedy captions of pre-computed features; reward_fn(i, text) for image i."""
    total = 0.0
    for start in range(0, len(features), batch):
        for offset, ids in enumerate(trainer.generate(features[start : start + batch], greedy=True)):
            total += reward_fn(start + offset, " ".join(tokenizer.decode(ids)))
    return total / len(features)


def make_reward(references: list[list[str]], scenes: list | None, corpus: list[list[str]], grounded_weight: float):
    from training.cider_d import CiderD

    cider = CiderD(corpus)
    if grounded_weight and scenes is not None:
        from captioning.scene_checker import check_caption

        def reward(i: int, text: str) -> float:
            return cider.score(text, references[i]) + grounded_weight * check_caption(text, scenes[i]).correct
    else:

        def reward(i: int, text: str) -> float:
            return cider.score(text, references[i])

    return reward


def finetune(args) -> dict:
    from captioning.artifacts import add_files, save_bundle
    from captioning.captioner import Captioner
    from captioning.domain import FILE as DOMAIN_FILE
    from training.config import parse_options
    from training.datasets.registry import RESIZING_LOADERS, load_dataset
    from training.evaluate import record_input

    keras.utils.set_random_seed(args.seed)
    captioner = Captioner.load(args.artifacts)
    options = parse_options(args.data)
    if args.dataset in RESIZING_LOADERS:
        options.setdefault("resize_to", captioner.config.image_size)
    records = load_dataset(args.dataset, "train", limit=args.train_limit, **options)
    if not 0 <= args.dev_images <= len(records) - args.batch_size:
        raise SystemExit(
            f"error: --dev-images {args.dev_images} must leave at least --batch-size {args.batch_size} of the "
            f"{len(records)} training images"
        )
    if args.eval_every < 1:
        raise SystemExit("error: --eval-every must be at least 1")
    dev_records = records[len(records) - args.dev_images :] if args.dev_images else []
    records = records[: len(records) - len(dev_records)]
    images = np.stack([record_input(captioner, r) for r in records])
    references = [list(r.captions) for r in records]
    scenes = [r.scene for r in records] if all(r.scene is not None for r in records) else None
    reward = make_reward(references, scenes, references, args.grounded_weight)
    trainer = SelfCriticalTrainer(captioner.decoder, captioner.config.max_length, args.learning_rate, args.clipnorm)
    dev = None
    if dev_records:
        dev_images = np.stack([record_input(captioner, r) for r in dev_records])
        dev_features = captioner.encode(dev_images)
        dev_scenes = [r.scene for r in dev_records] if scenes is not None else None
        dev_reward = make_reward([list(r.captions) for r in dev_records], dev_scenes, references, args.grounded_weight)
        dev = {"features": dev_features, "reward": dev_reward, "curve": []}
    rng = np.random.default_rng(args.seed)
    started, log = time.time(), []
    best = None  # (dev reward, step, decoder weights)

    def evaluate_dev(step: int) -> None:
        nonlocal best
        score = greedy_reward(trainer, captioner.tokenizer, dev["features"], dev["reward"])
        dev["curve"].append([step, round(score, 4)])
        if best is None or score > best[0]:
            best = (score, step, captioner.decoder.get_weights())
        print(f"step {step}: held-out greedy reward {score:.4f} (best {best[0]:.4f} at step {best[1]})", flush=True)

    if dev is not None:
        evaluate_dev(0)
    for step in range(args.steps):
        batch = rng.choice(len(records), args.batch_size, replace=False)
        result = scst_batch(
            trainer,
            captioner.encoder,
            captioner.tokenizer,
            images[batch],
            lambda i, text, batch=batch: reward(int(batch[i]), text),
            args.samples,
            seed=args.seed + step,
            only_better=args.only_better,
        )
        log.append(result)
        if (step + 1) % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            recent = log[-max(1, args.steps // 20) :]
            print(
                f"step {step + 1}/{args.steps}: sample reward {np.mean([r['reward'] for r in recent]):.3f}, "
                f"greedy reward {np.mean([r['greedy_reward'] for r in recent]):.3f}",
                flush=True,
            )
        if dev is not None and ((step + 1) % args.eval_every == 0 or step == args.steps - 1):
            evaluate_dev(step + 1)
    if best is not None:
        captioner.decoder.set_weights(best[2])
    manifest = captioner.manifest
    training = dict(manifest.get("training", {}))
    training["scst"] = {
        "command": "python -m training " + shlex.join(getattr(args, "command_line", sys.argv[1:])),
        "from": str(args.artifacts),
        "dataset": args.dataset,
        "train_images": len(records),
        "hyper_parameters": {k: getattr(args, k) for k in HYPER_PARAMETERS},
        "reward": "CIDEr-D (train-set idf)" + (f" + {args.grounded_weight} x grounded" if args.grounded_weight else ""),
        "greedy_reward_first_5pct": float(np.mean([r["greedy_reward"] for r in log[: max(1, len(log) // 20)]])),
        "greedy_reward_last_5pct": float(np.mean([r["greedy_reward"] for r in log[-max(1, len(log) // 20) :]])),
        "seconds": round(time.time() - started, 1),
    }
    if dev is not None:
        training["scst"]["held_out"] = {
            "images": len(dev_records),
            "best_step": best[1],
            "improved": best[1] > 0,
            "curve": dev["curve"],  # [step, greedy reward on the held-out images]
        }
        if best[1] == 0:
            print("warning: no step beat the starting model on the held-out images; it is written unchanged")
    output = Path(args.output)
    # The encoder is frozen, so its domain model still holds and is carried over; the calibration
    # does not (run `calibrate` again), and save_bundle removes any optional file it finds.
    domain_bytes = (
        (Path(args.artifacts) / DOMAIN_FILE).read_bytes() if DOMAIN_FILE in manifest.get("files", {}) else None
    )
    save_bundle(
        output,
        captioner.encoder,
        captioner.decoder,
        captioner.tokenizer,
        captioner.config,
        name=manifest.get("name", "captioner") + "-scst",
        version=time.strftime("%Y%m%d"),
        training=training,
        scene_head=captioner.scene_head,  # trained with the encoder, which SCST leaves as it is
    )
    if domain_bytes is not None:
        (output / DOMAIN_FILE).write_bytes(domain_bytes)
        add_files(output, (DOMAIN_FILE,))
    print(f"wrote {output} after {training['scst']['seconds']} s")
    return training["scst"]


def add_parser(subparsers) -> None:
    from training.config import add_data_flags
    from training.datasets.registry import LOADERS

    p = subparsers.add_parser(
        "finetune-scst",
        help="self-critical fine-tuning for CIDEr-D (Rennie et al. 2017)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="the trained bundle to start from")
    p.add_argument("--output", required=True, help="bundle directory to write")
    p.add_argument("--dataset", choices=sorted(LOADERS), default="shapes_wide")
    add_data_flags(p, "loader option, as for train")
    p.add_argument("--train-limit", type=int, help="training images to sample batches from")
    p.add_argument("--steps", type=int, default=HYPER_PARAMETERS["steps"])
    p.add_argument("--batch-size", type=int, default=HYPER_PARAMETERS["batch_size"], help="images per step")
    p.add_argument("--samples", type=int, default=HYPER_PARAMETERS["samples"], help="sampled captions per image")
    p.add_argument(
        "--only-better",
        action="store_true",
        default=HYPER_PARAMETERS["only_better"],
        help="reinforce only the samples that beat the greedy caption; worse ones are not pushed down",
    )
    p.add_argument("--learning-rate", type=float, default=HYPER_PARAMETERS["learning_rate"])
    p.add_argument(
        "--grounded-weight",
        type=float,
        default=HYPER_PARAMETERS["grounded_weight"],
        help="reward bonus for a caption the shapes checker finds right (datasets with scenes)",
    )
    p.add_argument("--clipnorm", type=float, default=HYPER_PARAMETERS["clipnorm"])
    p.add_argument("--seed", type=int, default=HYPER_PARAMETERS["seed"])
    p.add_argument(
        "--dev-images",
        type=int,
        default=HYPER_PARAMETERS["dev_images"],
        help="hold out the last N training images; keep the weights of the best greedy reward on them",
    )
    p.add_argument("--eval-every", type=int, default=HYPER_PARAMETERS["eval_every"], help="steps between those checks")
    p.set_defaults(func=run)


def run(args) -> int:
    finetune(args)
    return 0
