#!/usr/bin/env bash
# Builds the tollgate image ($IMAGE, default localhost/tollgate:<version>) with docker when a
# Docker engine answers, else with podman (installed on demand). Without BASE, podman builds on
# the Debian base bootstrapped by build-base.sh (no registry needed); docker uses the
# Dockerfile's default public base. Prints the image id on the last line.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
pick_engine
"$ROOT/scripts/build-wheels.sh"
if [ -z "${BASE:-}" ]; then
    if [ "$ENGINE" = podman ]; then
        "$ROOT/scripts/build-base.sh"
        BASE="$BASE_IMAGE"
    fi
fi
args=(build --network host --tag "$IMAGE" --file "$ROOT/Dockerfile")
[ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")
# shellcheck disable=SC2046
"$ENGINE" "${args[@]}" $(engine_flags) --quiet "$ROOT" >&2
"$ENGINE" image inspect --format '{{.Id}}' "$IMAGE"
