# Shared by the image scripts (source it). Picks the container engine and its flags.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/scripts/containers.conf}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${IMAGE:-localhost/tollgate:$VERSION}"
# The Debian base image bootstrapped by build-base.sh when registries cannot be reached.
BASE_IMAGE="${BASE_IMAGE:-localhost/tollgate-base:bookworm-py311}"

# ENGINE: docker when a Docker engine answers, else podman (installed on demand).
pick_engine() {
    if [ -n "${ENGINE:-}" ]; then
        return
    fi
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        "$ROOT/scripts/install-container-tools.sh"
        ENGINE=podman
    fi
}

# Flags every podman build/run needs here (see containers.conf for why).
engine_flags() {
    if [ "$ENGINE" = podman ]; then
        echo "--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
    fi
}
