# A stand-in for Flower's official images (flwr/superlink, flwr/supernode, flwr/superexec)
# on machines that reach no image registry: a Debian root file system that
# docker/e2e.sh makes with debootstrap and `docker import`s, Python's venv at
# /python/venv with flwr from a local wheelhouse, user `app` (uid 49999), HOME and
# WORKDIR /app, like Flower's images. It has no entrypoint: compose.yml names the
# program of every service (flower-superlink, flower-supernode, flower-superexec).
#
#   docker build -f docker/local-base.Dockerfile --build-arg ROOTFS_IMAGE=... CONTEXT
#
# CONTEXT must hold docker/wheelhouse/ with flwr's wheels.

ARG ROOTFS_IMAGE=fusedspacefed-e2e/debian:bookworm

FROM ${ROOTFS_IMAGE} AS build
ARG FLWR_VERSION=1.41.0
ARG BUILD_LABEL=fusedspacefed-base
LABEL fusedspacefed.build=${BUILD_LABEL}
COPY docker/wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /python/venv \
    && /python/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
       --find-links /tmp/wheelhouse "flwr==${FLWR_VERSION}" \
    && find /python/venv -name __pycache__ -prune -exec rm -rf {} +

FROM ${ROOTFS_IMAGE}
ARG BUILD_LABEL=fusedspacefed-base
LABEL fusedspacefed.build=${BUILD_LABEL}
RUN useradd --no-create-home --home-dir /app --uid 49999 -c "" app \
    && mkdir -p /app && chown app:app /app
COPY --from=build --chown=app:app /python/venv /python/venv
ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    HOME=/app
WORKDIR /app
USER app
