#!/usr/bin/env bash
# Installs what building and running the image needs on a Debian/Ubuntu host, only when missing:
# podman + runc (the container engine; runc because crun cannot run in every sandbox) and
# mmdebstrap (bootstraps the Debian base image when no registry can be reached), and catatonit
# (the init of the pause container `podman play kube` builds locally for each pod).
set -euo pipefail
exec "$(dirname "$0")/install-missing.sh" podman runc mmdebstrap catatonit
