"""Deletes all but the newest KEEP versions of each model in a model repository (for the image).

    python keep_newest_versions.py REPOSITORY KEEP        KEEP: a positive integer, or "all"

A repository is REPOSITORY/<name>/<version>/. Versions are read by the service's rule
(captioning.artifacts.scan_versions, which this build stage cannot import: it has no numpy):
an ASCII-digit name of a positive number up to 18 digits, "7" and "007" being one version. Anything
else in a model's directory is left alone. The Dockerfile runs it so that the image carries the
version it serves and the ones before it to roll back to, not every version ever committed.
A bad KEEP or a repository that is not there exits 2, so a build never ships all or none by mistake.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def is_version_name(name: str) -> bool:
    """captioning.artifacts.is_version_name's rule (tests hold the two to the same answers)."""
    return name.isascii() and name.isdigit() and int(name) >= 1 and len(name.lstrip("0")) <= 18


def version_dirs(model: Path) -> dict[int, list[Path]]:
    """Each version number of a model and every directory that names it."""
    found: dict[int, list[Path]] = {}
    for entry in sorted(model.iterdir()):
        if entry.is_dir() and is_version_name(entry.name):
            found.setdefault(int(entry.name), []).append(entry)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    repository, keep = Path(argv[0]), argv[1]
    if not repository.is_dir():
        print(f"{repository} is not a directory", file=sys.stderr)
        return 2
    if keep != "all" and not (keep.isascii() and keep.isdigit() and not keep.startswith("0")):
        print(f"KEEP must be a positive integer or 'all', not {keep!r}", file=sys.stderr)
        return 2
    for model in sorted(path for path in repository.iterdir() if path.is_dir()):
        versions = version_dirs(model)
        numbers = sorted(versions)
        cut = 0 if keep == "all" else max(len(numbers) - int(keep), 0)
        for number in numbers[:cut]:
            for path in versions[number]:
                shutil.rmtree(path)
        print(f"{model.name}: kept {numbers[cut:]}, deleted {numbers[:cut]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
