"""training.train.ResumableBackup: an interrupted run's backup is whole, or refused in one line."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from training.train import ResumableBackup


def model() -> keras.Model:
    inputs = keras.Input((4,))
    built = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    built.compile(optimizer="adam", loss="mse")
    built.fit(np.zeros((2, 4)), np.zeros((2, 3)), verbose=0)  # optimizer variables exist, as in a run
    return built


def backup_after_epochs(directory, trained: keras.Model, epochs: int) -> None:
    backup = ResumableBackup(str(directory))
    backup.set_model(trained)
    for epoch in range(epochs):
        backup.on_epoch_end(epoch)


def test_a_backup_is_written_whole_and_resumes_at_its_epoch(tmp_path):
    trained = model()
    backup_after_epochs(tmp_path / "backup", trained, 3)
    assert sorted(path.name for path in (tmp_path / "backup").iterdir()) == [
        "latest.weights.h5",
        "training_metadata.json",
    ]  # nothing left half-written beside them
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 3
    resumed = model()
    restore = ResumableBackup(str(tmp_path / "backup"))
    restore.set_model(resumed)
    restore.on_train_begin()
    assert resumed._initial_epoch == 3
    for saved, loaded in zip(trained.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(saved, loaded)


@pytest.mark.parametrize("keep_bytes", [0, 300, 2000])
def test_a_backup_cut_off_while_being_written_is_refused_in_one_line(tmp_path, keep_bytes):
    """What Keras's own backup left when a run was stopped mid-write (Ctrl-C, SIGTERM): the resume
    failed deep in Keras with OSError or ValueError."""
    backup_after_epochs(tmp_path / "backup", model(), 1)
    weights = tmp_path / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:keep_bytes])
    restore = ResumableBackup(str(tmp_path / "backup"))
    restore.set_model(model())
    with pytest.raises(SystemExit, match="cannot be read .*cut off while being written: pass --fresh"):
        restore.on_train_begin()


def test_a_run_stopped_while_writing_its_backup_resumes_from_the_epoch_before(tmp_path):
    trained = model()
    backup_after_epochs(tmp_path / "backup", trained, 2)
    backup = ResumableBackup(str(tmp_path / "backup"))
    backup.set_model(trained)

    def stopped_mid_write(filepath, overwrite=True):
        with open(filepath, "wb") as half:
            half.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        raise KeyboardInterrupt

    trained.save_weights = stopped_mid_write
    with pytest.raises(KeyboardInterrupt):
        backup.on_epoch_end(2)
    restore = ResumableBackup(str(tmp_path / "backup"))
    resumed = model()
    restore.set_model(resumed)
    restore.on_train_begin()
    assert resumed._initial_epoch == 2
