"""Caption local image files: python -m captioning caption IMG [IMG ...] [--json]

python -m captioning caption photo.png --strategy beam --beam-size 5 --num-captions 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEFAULT_ARTIFACTS = "model_artifacts/default"  # the service's default model; its highest version, as latest:1 picks


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m captioning")
    commands = parser.add_subparsers(dest="command", required=True)
    caption = commands.add_parser("caption", help="caption image files")
    caption.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    caption.add_argument(
        "--artifacts",
        default=os.environ.get("ARTIFACTS_DIR", DEFAULT_ARTIFACTS),
        help="a bundle, or a model's directory of versions (its highest version is used); "
        "default: $ARTIFACTS_DIR, else %(default)s",
    )
    caption.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="greedy")
    caption.add_argument("--beam-size", type=int, default=3)
    caption.add_argument("--num-captions", type=int, default=1)
    caption.add_argument("--max-length", type=int)
    caption.add_argument("--temperature", type=float, default=1.0)
    caption.add_argument("--top-k", type=int, default=10)
    caption.add_argument("--seed", type=int)
    caption.add_argument("--attention", action="store_true", help="include attention maps (JSON output)")
    caption.add_argument(
        "--mirror-view", action="store_true", help="decode each image with its left-right mirror (captioning/mirror.py)"
    )
    caption.add_argument(
        "--grounded",
        action="store_true",
        help="rerank the beam by the model's own reading of the scene (captioning/grounding.py; --strategy beam)",
    )
    caption.add_argument("--json", action="store_true", help="one JSON object per image")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from PIL import Image

    from captioning.artifacts import ArtifactError, bundle_path
    from captioning.captioner import Captioner
    from captioning.decoding import DecodeOptions
    from captioning.preprocess import load_image_file

    options = DecodeOptions(
        strategy=args.strategy,
        beam_size=args.beam_size,
        num_captions=args.num_captions,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        return_attention=args.attention,
        mirror_view=args.mirror_view,
        grounded=args.grounded,
    )
    try:
        options.validate()
        captioner = Captioner.load(bundle_path(args.artifacts))
        captioner.check(options)  # what this model cannot do (a mirror view without its words)
    except (ValueError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            # read exactly as the service reads the same file uploaded
            pixels = load_image_file(path, captioner.config.image_size, Image.MAX_IMAGE_PIXELS)
        except (OSError, ValueError) as exc:  # missing, unreadable, or not an image
            print(f"{path}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        captions = captioner.caption([pixels], options)[0]
        if args.json:
            print(json.dumps({"image": path, "captions": [asdict(c) for c in captions]}))
        else:
            for caption in captions:
                print(f"{path}\t{caption.confidence:.3f}\t{caption.text}")
    return status


if __name__ == "__main__":
    sys.exit(main())
