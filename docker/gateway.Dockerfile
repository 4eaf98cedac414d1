# syntax=docker/dockerfile:1
# The gateway image: `fashionserve gateway` on a slim Python 3.11, running as uid 10001,
# with no compiler, no pip and no source tree in the final stage. It carries the package's
# base dependencies only: no Triton, ONNX Runtime or matplotlib (pyproject.toml's extras).
# Build from the repo root:
#
#   docker build -f docker/gateway.Dockerfile -t REGISTRY/fashionserve/gateway:0.1.0 .
#
# Every Python package comes from docker/gateway.lock (`make lock`) and is checked against
# its hashes; the base image is pinned by digest. The digest is the tag's in the comment:
# update both together.
# python:3.11.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/fashionserve
# The locked dependencies first (a layer that changes only with the lock). --no-deps: the
# lock is the whole list, so nothing unhashed can come in; setuptools (the build backend)
# is in it too, for the build without isolation below.
COPY docker/gateway.lock ./
RUN /opt/fashionserve/bin/pip install --no-cache-dir --require-hashes --no-deps -r gateway.lock
# Only what the package build reads (see .dockerignore for what never enters the context).
COPY pyproject.toml README.md ./
COPY fashionserve/ fashionserve/
COPY gateway/ gateway/
COPY clients/ clients/
COPY protos/ protos/
COPY export/ export/
COPY model_repository/ model_repository/
COPY loadtest/ loadtest/
# The package itself, on the locked packages. pip byte-compiles what it installs, which
# matters because the container's root file system is read-only.
RUN /opt/fashionserve/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/fashionserve/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/fashionserve/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The installer is a build tool too: the final image keeps none.
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 fashionserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin fashionserve
COPY --from=build /opt/fashionserve /opt/fashionserve
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
# 50051: gRPC (service, health, reflection); 9090: Prometheus /metrics.
EXPOSE 50051 9090
ENTRYPOINT ["fashionserve"]
CMD ["gateway", "--config", "/etc/fashionserve/gateway.yaml"]
