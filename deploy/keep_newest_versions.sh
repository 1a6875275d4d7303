#!/bin/sh
# Usage: keep_newest_versions.sh REPOSITORY KEEP
# Deletes all but the newest KEEP versions of each model in a model repository
# (REPOSITORY/<name>/<version>/, integer versions, as captioning.artifacts.scan_versions reads them);
# KEEP "all" deletes nothing. The Dockerfile runs it so that the image carries the version it serves
# and the ones to roll back to, not every version ever committed (the image has a size budget).
set -eu
repository=$1
keep=$2
[ "$keep" = all ] && exit 0
case $keep in
  '' | *[!0-9]* | 0 | 0*) echo "KEEP must be a positive integer or 'all', not '$keep'" >&2; exit 2 ;;
esac
for model in "$repository"/*/; do
  find "$model" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*' -printf '%f\n' \
    | grep -E '^[0-9]+$' | sort -n | head -n "-$keep" \
    | while read -r version; do rm -rf "${model}${version}"; done
done
