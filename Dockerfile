# kvstore node image: `docker build -t kvstore:dev .` then run with KVSTORE_* env (see the Kubernetes section of README.md).
# Without a registry: `python scripts/image.py build` (podman on a debootstrap base; see the README's image section).
# Three stages on the same Python:
#   builder  a venv in /opt/venv: the locked dependencies first (a layer that changes only
#            with requirements/runtime.txt), then the project; pip, setuptools and wheel leave it.
#   rootfs   the Python base, pruned of what a node never runs (pip, setuptools, wheel,
#            docs, man pages, translations), with the kvstore user and /data.
#   runtime  FROM scratch: the pruned root as one layer, the venv as another. Deleting files in
#            a stage on top of the base would only hide them; copying the result drops their bytes
#            (hadolint's DL3067 warns against copying a whole filesystem: here that is the point).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies only, exact versions with their sha256 (make lock): rebuilt only when the lock changes.
COPY requirements/runtime.txt requirements/build.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.txt

# The kubernetes client ships a second, asyncio copy of itself (kubernetes/aio, 68 MB of
# the venv's 191 MB); the node uses only the sync client (app/membership/kubernetes.py).
RUN rm -rf /opt/venv/lib/python3*/site-packages/kubernetes/aio \
    && python -c "import kubernetes.client, kubernetes.config, kubernetes.watch"

# The project itself, non-editable, built by the locked setuptools without touching the
# dependencies above; then the installers leave the venv and everything is byte-compiled.
COPY pyproject.toml README.md ./
COPY app ./app
COPY client ./client
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt \
    && pip install --no-cache-dir --no-deps --no-build-isolation . ./client \
    && pip uninstall --yes setuptools wheel packaging pip \
    && python -c "import app.web.app, app.membership.kubernetes, kvstore_client" \
    && python -m compileall -q /opt/venv


FROM ${PYTHON_IMAGE} AS rootfs
# pip, setuptools, wheel (and their bundled copies for ensurepip/venv), docs, man pages and
# translations: nothing a node runs. Sizes before/after are in README.md (The image).
RUN for dir in /usr/lib/python3/dist-packages /usr/local/lib/python3*/site-packages; do \
        rm -rf "$dir"/pip "$dir"/pip-* "$dir"/setuptools "$dir"/setuptools-* "$dir"/pkg_resources \
            "$dir"/_distutils_hack "$dir"/distutils-precedence.pth "$dir"/wheel "$dir"/wheel-*; \
    done \
    && rm -rf /usr/share/python-wheels /usr/lib/python3*/ensurepip/_bundled /usr/local/lib/python3*/ensurepip/_bundled \
        /usr/bin/pip /usr/bin/pip3* /usr/local/bin/pip* /usr/local/bin/wheel \
        /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /var/cache/debconf/*-old \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('pip', 'setuptools', 'wheel')))" \
    && groupadd --system --gid 10001 kvstore \
    && useradd --system --uid 10001 --gid kvstore --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kvstore \
    && mkdir -p /data \
    && chown kvstore:kvstore /data


FROM scratch AS runtime
# hadolint ignore=DL3067
COPY --from=rootfs / /
COPY --from=builder /opt/venv /opt/venv
# A FROM scratch image inherits no environment: PATH and LANG as the Python base sets them.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KVSTORE_LISTEN=0.0.0.0:8080
WORKDIR /data
# The chart's securityContext runs as 10001:10001 (the kvstore user made in rootfs).
USER 10001:10001
EXPOSE 8080
# Docker/podman only (Kubernetes uses the chart's probes on /health and /ready; podman keeps this
# only when building with --format docker). It probes the ops listener, KVSTORE_OPS_LISTEN, when
# there is one (plain HTTP, no credentials), else the address the node listens on, KVSTORE_LISTEN;
# a wildcard (0.0.0.0, ::) is probed at loopback, which answers there too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; host, _, port = (os.environ.get('KVSTORE_OPS_LISTEN') or os.environ.get('KVSTORE_LISTEN', '127.0.0.1:8080')).rpartition(':'); host = host.strip('[]'); host = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(host, host); host = f'[{host}]' if ':' in host else host; urllib.request.urlopen(f'http://{host}:{port}/health', timeout=2)"]
# One process per container: the store lives in this process (one uvicorn worker).
ENTRYPOINT ["kvstore", "node"]
