#!/usr/bin/env bash
# Regenerates the Envoy bootstraps that deploy/k8s's overlays turn into ConfigMaps
# (configMapGenerator), with the same generator as `tollgate envoy-config` (extproc/envoyconf.py). Never edit the
# generated files by hand: change extproc/envoyconf.py or the flags here and rerun this.
# tests/k8s/test_manifests.py reruns it into a temporary directory and compares.
#
#   scripts/gen-k8s-envoy.sh [OUT_DIR]     (default: deploy/k8s/overlays)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/deploy/k8s/overlays}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
gen() { (cd "$ROOT" && "$PYTHON" -m extproc.envoyconf "$@"); }

# Sidecar: plain HTTP for the app next to it; ports as in envoy/envoy.yaml.
gen --output-dir "$OUT/sidecar/envoy"
# Shared gateway: TLS from the Secret mounted at /etc/tollgate/tls (kubernetes.io/tls keys).
TLS=(--port 10443 --tls-cert /etc/tollgate/tls/tls.crt --tls-key /etc/tollgate/tls/tls.key
     --sds-dir /etc/envoy)
gen "${TLS[@]}" --output-dir "$OUT/gateway/envoy"
# The same, requiring client certificates signed by the CA mounted at /etc/tollgate/client-ca.
gen "${TLS[@]}" --tls-client-ca /etc/tollgate/client-ca/ca.crt --output-dir "$OUT/gateway-mtls/envoy"
