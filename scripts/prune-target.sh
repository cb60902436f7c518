#!/usr/bin/env bash
# Deletes superseded test, bench and example executables from the shared
# target directory: every rebuild with other features or sources links new
# ones under a new hash (~0.5 GB each with RocksDB inside) and cargo never
# removes the old ones, which once filled this machine's disk mid-build.
# Keeps the newest executable of each name; libraries and build outputs
# (the RocksDB build) are not touched.
set -euo pipefail
source "$(dirname "$0")/env.sh" >/dev/null
for dir in "$CARGO_TARGET_DIR"/release/deps "$CARGO_TARGET_DIR"/release/examples; do
  [ -d "$dir" ] || continue
  find "$dir" -maxdepth 1 -type f -perm -u+x -regextype posix-extended \
      -regex '.*/[A-Za-z0-9_]+-[0-9a-f]{16}' -printf '%T@ %p\n' |
    sort -rn |
    awk '{ path = $2; name = path; sub(/-[0-9a-f]+$/, "", name);
           if (seen[name]++) print path }' |
    xargs -r rm -f
done
