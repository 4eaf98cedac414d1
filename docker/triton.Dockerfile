# syntax=docker/dockerfile:1
# The Triton image: NGC's tritonserver 24.10 (Triton 2.51, the release nvidia-pytriton 0.7.0
# bundles) plus what the python-backend models (preprocess, crop, the python-ort runners)
# import: the fashionserve package with its `triton` extra (ONNX Runtime, nvidia-pytriton), in
# a Python 3.11 virtual environment. Build from the repo root, with the digest of NGC's tag:
#
#   docker buildx imagetools inspect nvcr.io/nvidia/tritonserver:24.10-py3   # Digest: sha256:...
#   docker build -f docker/triton.Dockerfile --build-arg TRITON_DIGEST=sha256:... \
#     -t REGISTRY/fashionserve/triton:0.1.0 .
#
# Every image is pinned by digest: uv's here (tag in the comment), NGC's at build time
# (TRITON_DIGEST has no default, so an unpinned build stops at the first FROM). Every Python
# package comes from docker/triton.lock (`make lock`) and is checked against its hashes; uv
# checks the Python it downloads against the checksums built into that pinned uv.
#
# Why a second Python: the NGC image's python3 is 3.10, and fashionserve needs 3.11. Its
# python backend runs models in a stub process linked against one libpython; nvidia-pytriton
# ships that stub for 3.11, built for this same Triton release, so the stub is swapped for
# it. Python 3.11 itself comes from python-build-standalone (relocatable, self-contained,
# with a shared libpython), installed by uv.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
ARG TRITON_DIGEST
# ghcr.io/astral-sh/uv:0.5.11
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.5.11@sha256:0ac957607303916420297a4c9c213bb33fbd3c888f9cd7f4f7273596ebf42b85
ARG PYTHON_VERSION=3.11.11

FROM ${UV_IMAGE} AS uv

FROM ${TRITON_IMAGE}@${TRITON_DIGEST} AS build
ARG PYTHON_VERSION
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/fashionserve
WORKDIR /src
# The locked dependencies (setuptools, the build backend, included), then the package on
# them without build isolation: nothing unhashed is downloaded.
COPY docker/triton.lock ./
RUN uv pip install --python /opt/fashionserve/bin/python --require-hashes --no-deps \
        -r triton.lock
COPY pyproject.toml README.md ./
COPY fashionserve/ fashionserve/
COPY gateway/ gateway/
COPY clients/ clients/
COPY protos/ protos/
COPY export/ export/
COPY model_repository/ model_repository/
COPY loadtest/ loadtest/
RUN uv pip install --python /opt/fashionserve/bin/python --no-deps --no-build-isolation .

FROM ${TRITON_IMAGE}@${TRITON_DIGEST}
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/fashionserve /opt/fashionserve
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Swap in the 3.11 stub. It finds nvidia-pytriton's bundled libraries through its RPATH
# ($ORIGIN resolves through the symlink) and libpython3.11 through ld.so.conf; the build
# fails here if any library stays unresolved.
RUN site="$(/opt/fashionserve/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && stub="${site}/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
    && test -x "${stub}" \
    && ln -sf "${stub}" /opt/tritonserver/backends/python/triton_python_backend_stub \
    && /opt/fashionserve/bin/python -c 'import sys; print(sys.base_prefix + "/lib")' \
        > /etc/ld.so.conf.d/fashionserve-python.conf \
    && ldconfig \
    && if ldd "${stub}" | grep "not found"; then exit 1; fi
# The stub's embedded interpreter finds `python3` on PATH, hence the virtual environment's
# packages: the venv goes first.
ENV PATH=/opt/fashionserve/bin:${PATH}
# triton-server (uid 1000) exists in NGC's image; numeric for Kubernetes' runAsNonRoot.
USER 1000:1000
# 8000: HTTP (health), 8001: gRPC, 8002: metrics.
EXPOSE 8000 8001 8002
# NGC's entrypoint (CUDA forward-compatibility checks) stays; these are its arguments.
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true"]
