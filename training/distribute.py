"""Multi-device training with tf.distribute: one strategy object, chosen by name.

    default      whatever TensorFlow picks: one GPU if there is one, else the CPU
    mirrored     every GPU of this machine (or the devices named), one model replica per device
    multiworker  several machines, each running the same command with its own TF_CONFIG, e.g.
                 {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}

The batch size on the command line is the *global* batch: each step takes one batch from the input
pipeline and the strategy splits it across the replicas (32 on 4 GPUs: 8 per GPU), so the
optimisation is the same whatever the number of devices.

The masked loss is normalised per replica: each replica divides its summed token losses by its own
count of real tokens, and the replicas' gradients are averaged. The step's loss is then the mean of
R per-replica token means, not one mean over all the tokens of the global batch, so a token on a
replica whose captions happen to be shorter weighs slightly more. We accept that: single-device
training already does the same across batches (each batch is normalised by its own token count),
images are shuffled before the batch is split, so replicas hold similar numbers of tokens, and the
exact global mean would need an all-reduce of token counts inside the loss, coupling it to the
strategy. (Keras divides its built-in losses by R so that the summed replica gradients average;
a loss function that returns a scalar, as `masked_loss` does, is left as it is, so
`per_replica_loss` divides it. Without that, gradients and the reported loss are R times too big.)

The strategy must exist before TensorFlow runs anything else (multiworker configures collective
ops at start-up), and models must be built and compiled inside `strategy.scope()`.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from captioning.model import CaptionTrainingModel

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str, devices: list[str] | None = None) -> tf.distribute.Strategy:
    """The strategy called `name`; `devices` (mirrored only) names the devices to replicate on."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices or None)
    if name == "multiworker":
        if devices:
            raise ValueError("multiworker takes its devices from TF_CONFIG, not a device list")
        if "TF_CONFIG" not in os.environ:
            raise ValueError("multiworker training needs TF_CONFIG describing the cluster and this worker's task")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


def per_replica_loss(loss_fn):
    """`loss_fn` divided by the number of replicas, so that summing the replicas' gradients averages them."""

    def loss(labels, predictions):
        return loss_fn(labels, predictions) / tf.distribute.get_strategy().num_replicas_in_sync

    loss.__name__ = loss_fn.__name__
    return loss


class MultiWorkerCaptionTrainer(CaptionTrainingModel):
    """CaptionTrainingModel with two fixes for Keras 3 under MultiWorkerMirroredStrategy, which
    otherwise fails before the first step (keras-team/keras#20585):

    - Before training, Keras builds the optimizer and metrics from one input batch that it first
      merges across replicas with `strategy.reduce`, which cannot reduce a nested batch. The build
      only needs shapes and dtypes, so this worker's own part of the batch is used instead.
    - After each step, Keras averages the logged metrics across workers with
      `strategy.reduce("MEAN", value, axis=0)`, which needs an axis that scalars lack, so the
      steps return them as [1] tensors (the reduction then gives back scalars).
    """

    def train_step(self, data):
        return {name: tf.reshape(value, [1]) for name, value in super().train_step(data).items()}

    def test_step(self, data):
        return {name: tf.reshape(value, [1]) for name, value in super().test_step(data).items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None:
            for _, _, batches in iterator:
                distributed_batch = next(batches)
                break
            local = self.distribute_strategy.experimental_local_results
            data_batch = tf.nest.map_structure(lambda value: local(value)[0], distributed_batch)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)


def trainer_class(strategy: tf.distribute.Strategy) -> type[CaptionTrainingModel]:
    """The training model class for `strategy` (Keras takes its multi-worker code path, and needs
    the fixes, only when there is more than one worker)."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and cluster_size() > 1:
        return MultiWorkerCaptionTrainer
    return CaptionTrainingModel


def cluster_size() -> int:
    """The number of training processes (chief and workers) TF_CONFIG describes; 1 without it."""
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def worker_task() -> tuple[str, int] | None:
    """(task type, index) of this process in a multi-worker cluster, from TF_CONFIG; None alone."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not config.get("cluster") or "type" not in task:
        return None
    return task["type"], int(task.get("index", 0))


def is_chief() -> bool:
    """Whether this process writes the shared outputs: the chief, or worker 0 when there is no chief."""
    task = worker_task()
    if task is None:
        return True
    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
    task_type, index = task
    if "chief" in cluster:
        return task_type == "chief"
    return task_type == "worker" and index == 0


def distribute_options(strategy: tf.distribute.Strategy) -> tf.data.Options:
    """Input pipeline options: across workers, shard the pipeline by element (our sources are
    in-memory lists of files, which the default file-based sharding cannot split)."""
    options = tf.data.Options()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def describe(strategy: tf.distribute.Strategy, global_batch: int) -> str:
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return f"1 replica, batch {global_batch}"
    per_replica = global_batch / replicas
    shown = f"{per_replica:g}" if per_replica == int(per_replica) else f"~{per_replica:.1f}"
    return f"{replicas} replicas ({type(strategy).__name__}), global batch {global_batch} = {shown} per replica"
