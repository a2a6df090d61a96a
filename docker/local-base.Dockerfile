# A stand-in for Flower's official images (flwr/superlink, flwr/supernode, flwr/superexec)
# on machines that reach no image registry, laid out like them: Python's venv at
# /python/venv with flwr, owned by user `app` (uid 49999), HOME and WORKDIR /app. It
# starts from a Debian root file system that docker/e2e.sh makes with debootstrap and
# `docker import`s, and installs flwr from a wheelhouse (pip's PIP_FIND_LINKS, e.g. a
# folder served on 127.0.0.1 with `docker build --network host`). It has no entrypoint:
# compose.yml names the program of every service.

ARG ROOTFS_IMAGE=fusedspacefed-e2e/debian:bookworm
FROM ${ROOTFS_IMAGE}

ARG FLWR_VERSION=1.42.0
ARG PIP_FIND_LINKS=""
ARG PIP_NO_INDEX=1
ARG BUILD_LABEL=fusedspacefed-base
LABEL fusedspacefed.build=${BUILD_LABEL}
RUN useradd --no-create-home --home-dir /app --uid 49999 -c "" app \
    && mkdir -p /app /python \
    && python3 -m venv /python/venv \
    && /python/venv/bin/pip install --no-cache-dir --disable-pip-version-check "flwr==${FLWR_VERSION}" \
    && find /python/venv -name __pycache__ -prune -exec rm -rf {} + \
    && chown -R app:app /app /python
ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    HOME=/app
WORKDIR /app
USER app
