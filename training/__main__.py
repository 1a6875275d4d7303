"""python -m training COMMAND --help

Commands: train, extract-features, evaluate, calibrate, fit-domain, fit-object-reader, evaluate-wild,
probe-features, finetune-scst, export, demo-samples."""

import argparse
import os
import re
import sys

# Set before TensorFlow is imported, so chosen from the process's own command line (an in-process
# main(["train", ...]) gets whatever its host chose). oneDNN's kernels make a training step 1.8x faster
# on this project's 2-core CPU with the default preset's small_cnn_fullres, 1.25x with small_cnn
# (docs/TRAINING.md); evaluate-wild was slower with them (22 s against 18 s), and the other commands
# were not measured, so they keep them off. fit-object-reader trains a small CNN too.
ONEDNN_COMMANDS = ("train", "fit-object-reader")


def onednn_setting(argv: list[str]) -> str:
    """TF_ENABLE_ONEDNN_OPTS for a command line (the arguments after `python -m training`)."""
    return "1" if argv[:1] and argv[0] in ONEDNN_COMMANDS else "0"


os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", onednn_setting(sys.argv[1:]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from training import (
        calibrate,
        demo_samples,
        evaluate,
        export,
        features,
        fit_domain,
        fit_object_reader,
        probe,
        scst,
        train,
        wild,
    )

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    subparsers = parser.add_subparsers(required=True, dest="command")
    for command in (
        train,
        features,
        evaluate,
        calibrate,
        fit_domain,
        fit_object_reader,
        wild,
        probe,
        scst,
        demo_samples,
        export,
    ):
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # recorded in the bundle's manifest
    from captioning.artifacts import ArtifactError
    from training.datasets.errors import DatasetFormatError, DatasetOptionError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        # train resumes from its last finished epoch (its run directory's backup); the others start over
        resume = " (train: run the same command again to resume from the last finished epoch)"
        print(f"interrupted{resume if args.command == 'train' else ''}", file=sys.stderr)
        return 130
    except (ArtifactError, DatasetFormatError, DatasetOptionError, FileNotFoundError) as error:
        # a missing or tampered bundle, a malformed dataset file, a misspelt option: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # An image file cut short inside the input pipeline reaches here wrapped by TensorFlow;
        # its own message (captioning.preprocess.load_image_file) names the file.
        unreadable = UNREADABLE_IMAGE.search(str(error))
        if unreadable is None:
            raise
        message = unreadable.group(0).rpartition("ValueError: ")[2]  # without TensorFlow's prefix
        print(f"error: {message}: fix or remove it from the dataset", file=sys.stderr)
        return 2


UNREADABLE_IMAGE = re.compile(r"[^\n]*: not a readable image: [^\n]*")


if __name__ == "__main__":
    sys.exit(main())
