"""python -m training COMMAND --help

Commands: train, extract-features, evaluate, calibrate, fit-domain, evaluate-wild, finetune-scst, export,
demo-samples."""

import argparse
import os
import sys

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    from training import calibrate, demo_samples, evaluate, export, features, fit_domain, scst, train, wild

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    subparsers = parser.add_subparsers(required=True, dest="command")
    for command in (train, features, evaluate, calibrate, fit_domain, wild, scst, demo_samples, export):
        command.add_parser(subparsers)
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # recorded in the bundle's manifest
    from captioning.artifacts import ArtifactError

    try:
        return args.func(args)
    except ArtifactError as error:  # a missing or tampered bundle: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
