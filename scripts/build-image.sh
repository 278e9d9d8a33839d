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
args=(build --network host --file "$ROOT/Dockerfile")
[ -n "${BASE:-}" ] && args+=(--build-arg "BASE=$BASE")
# The install stage is tagged so that it stays the build cache of the next run, and the copies
# it replaces (untagged now, ~500 MB each) are pruned: `prune` only takes untagged images, and
# only those with this project's labels.
# shellcheck disable=SC2046
"$ENGINE" "${args[@]}" $(engine_flags) --quiet --target install \
    --tag "localhost/tollgate-build-cache:install" "$ROOT" >/dev/null
# shellcheck disable=SC2046
"$ENGINE" "${args[@]}" $(engine_flags) --quiet --tag "$IMAGE" "$ROOT" >/dev/null
"$ENGINE" image prune --force --filter label=io.tollgate.stage=install >/dev/null
# Earlier builds of the image itself that lost their tag to this one (never one in use).
"$ENGINE" image prune --force --filter label=org.opencontainers.image.title=tollgate >/dev/null
"$ENGINE" image inspect --format '{{.Id}}' "$IMAGE"
