# kvstore node image: `docker build -t kvstore:dev .` then run with KVSTORE_* env (see the Kubernetes section of README.md).
# Two stages on the same Python: the builder makes a venv in /opt/venv, dependencies
# first (a layer that changes only with pyproject.toml), then the project; the runtime
# stage copies the venv and nothing else: no compilers, no pip cache, no sources.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies only, read from pyproject.toml: this layer is rebuilt only when they change.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself, non-editable, without touching the dependencies installed above.
COPY README.md ./
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && python -m compileall -q /opt/venv


FROM ${PYTHON_IMAGE} AS runtime
# A system user with a fixed uid/gid: the chart's securityContext runs as 10001:10001.
RUN groupadd --system --gid 10001 kvstore \
    && useradd --system --uid 10001 --gid kvstore --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kvstore \
    && mkdir -p /data \
    && chown kvstore:kvstore /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KVSTORE_LISTEN=0.0.0.0:8080
WORKDIR /data
USER 10001:10001
EXPOSE 8080
# Docker/podman only; Kubernetes uses the chart's probes on /health and /ready instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('KVSTORE_LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)"]
# One process per container: the store lives in this process (one uvicorn worker).
ENTRYPOINT ["kvstore", "node"]
