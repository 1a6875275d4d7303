"""--ema-momentum: the saved weights are the moving average of the trained ones, not the last ones."""

import json

import h5py
import keras
import numpy as np
import pytest

from training.__main__ import main


def train(tmp_path, *flags) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """A one-epoch tiny run: (the saved decoder's weights, every array of the run's checkpoint of
    the last trained weights, the run record)."""
    common = ["--preset", "tiny", "--epochs", "1", "--train-limit", "64", "--val-limit", "8", "--verbose", "0"]
    status = main(["train", *common, *flags, "--output", str(tmp_path / "bundle"), "--run-dir", str(tmp_path / "run")])
    assert status == 0
    decoder = keras.saving.load_model(tmp_path / "bundle" / "decoder.keras", compile=False, safe_mode=True)
    checkpoint = []  # ModelCheckpoint's best.weights.h5: the one epoch's trained (not averaged) weights

    def keep(name, item):  # the layers' weights, not the optimizer's state (which holds the averages)
        if isinstance(item, h5py.Dataset) and not name.startswith("optimizer"):
            checkpoint.append(np.array(item))

    with h5py.File(tmp_path / "run" / "best.weights.h5") as weights:
        weights.visititems(keep)
    record = json.loads((tmp_path / "run" / "history.json").read_text())
    return decoder.get_weights(), checkpoint, record


def in_checkpoint(array: np.ndarray, checkpoint: list[np.ndarray]) -> bool:
    return any(a.shape == array.shape and np.array_equal(a, array) for a in checkpoint)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_bundle_holds_the_average_only_when_asked(tmp_path, momentum):
    saved, checkpoint, record = train(tmp_path, "--ema-momentum", str(momentum))
    kernels = [w for w in saved if w.ndim == 2]  # biases of layers a few steps barely move can match by chance
    trained = [in_checkpoint(w, checkpoint) for w in kernels]
    if momentum:
        assert not any(trained)  # every kernel is an average, none the last step's
    else:
        assert all(trained)
    assert record["settings"]["ema_momentum"] == momentum


@pytest.mark.parametrize("momentum", ["1.0", "-0.5"])
def test_a_momentum_outside_zero_to_one_is_refused(tmp_path, momentum):
    with pytest.raises(SystemExit, match="--ema-momentum must be in"):
        main(["train", "--preset", "tiny", "--ema-momentum", momentum, "--output", str(tmp_path / "b")])
