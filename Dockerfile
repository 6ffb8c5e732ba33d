# pumpgw: the gateway (default command) and the simulator (`pumpsim`) in one image.
# Built by docker-compose.yml; runs as the unprivileged user pumpgw (uid 10001), which is in
# the dialout group for serial lines passed in with `devices:`. The outbox lives in the volume
# /var/lib/pumpgw. Secrets come from the environment (PUMPGW_*), never from build arguments.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pumpgw \
    && useradd --system --uid 10001 --gid pumpgw --groups dialout \
        --home-dir /var/lib/pumpgw --no-create-home --shell /usr/sbin/nologin pumpgw \
    && install -d -o pumpgw -g pumpgw -m 0750 /var/lib/pumpgw \
    && install -d -m 0755 /etc/pumpgw

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY gateway ./gateway
COPY simulator ./simulator
RUN pip install . && rm -rf /src

COPY config/pumpgw.compose.toml /etc/pumpgw/pumpgw.toml

WORKDIR /var/lib/pumpgw
USER pumpgw
VOLUME ["/var/lib/pumpgw"]
EXPOSE 9108

# /healthz answers 200 when sources and sinks are connected and nothing waits too long
# (gateway/health.py); the simulator service in docker-compose.yml disables this check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:9108/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["pumpgw"]
CMD ["run", "--config", "/etc/pumpgw/pumpgw.toml"]
