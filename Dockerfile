# analysis-service worker image.
#
#   docker build -t analysis-service .
#   docker run --rm -v /path/to/music:/media:ro --env-file .env analysis-service worker
#
# Two stages: the builder resolves the locked dependencies with uv into /app/.venv (non-editable,
# so the runtime stage needs nothing but that folder); the runtime stage adds the audio decoders
# (libsndfile, ffmpeg) and runs as the unprivileged user `analysis`.

ARG PYTHON_IMAGE=python:3.11-slim

############################################################################### builder
FROM ${PYTHON_IMAGE} AS builder

ARG UV_VERSION=0.13.9
RUN PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    pip install --no-cache-dir "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first (only the lock and the manifests): this layer is reused until they change.
COPY pyproject.toml uv.lock ./
COPY services/analysis_service/pyproject.toml services/analysis_service/pyproject.toml
COPY shared/pyproject.toml shared/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --package analysis-service --no-install-workspace

# Then the workspace packages themselves, installed as regular (non-editable) wheels.
COPY services/analysis_service/src services/analysis_service/src
COPY shared/src shared/src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --package analysis-service --no-editable \
    && /app/.venv/bin/analysis-service --help > /dev/null

############################################################################### runtime
FROM ${PYTHON_IMAGE} AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 ffmpeg \
    && rm -rf /var/lib/apt/lists/*

# /run/analysis-service-cpus: where to mount one folder of host CPU tokens shared by the worker
# containers of a host (a fresh named volume takes this owner; docs/tuning.md).
RUN groupadd --system --gid 10001 analysis \
    && useradd --system --uid 10001 --gid analysis --home-dir /home/analysis --create-home \
        --shell /usr/sbin/nologin analysis \
    && mkdir -p /var/cache/numba /media /run/analysis-service-cpus \
    && chown analysis:analysis /var/cache/numba /run/analysis-service-cpus

COPY --from=builder /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/var/cache/numba \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    ANALYSIS_WORKER__MEDIA_ROOT=/media \
    ANALYSIS_HTTP__HOST=0.0.0.0 \
    ANALYSIS_HTTP__PORT=8080

WORKDIR /home/analysis
USER analysis:analysis

EXPOSE 8080

# Liveness only (/health); readiness of the backends is /ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ANALYSIS_HTTP__PORT', '8080') + '/health', timeout=4)"]

# The worker handles SIGTERM itself: it stops consuming, waits up to ANALYSIS_WORKER__SHUTDOWN_GRACE_S
# for running analyses and requeues the rest. Give the container more than that to stop.
STOPSIGNAL SIGTERM

ENTRYPOINT ["analysis-service"]
CMD ["worker"]
