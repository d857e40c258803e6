# plant-edge-agent container image.
#
#   docker build -t plant-edge-agent .
#   docker run -d --name edge-agent --restart unless-stopped --stop-timeout 30 \
#     -v edge-agent-data:/var/lib/edge-agent \
#     -v /etc/edge-agent/config.yaml:/etc/edge-agent/config.yaml:ro \
#     -v /etc/edge-agent/credentials:/run/credentials/edge-agent.service:ro \
#     plant-edge-agent
#
# Stage 1 builds the wheel and installs it into a venv; stage 2 is a slim runtime with only that
# venv, running as a non-root user. tests/unit/test_dockerfile.py runs the build stage's commands
# in a fresh venv (no Docker engine needed); tests/deploy/test_image.py (make image-test) builds
# and runs the image for real.
#
# PYTHON_IMAGE is the base of both stages: the official slim image for real builds. Where no
# registry can be reached, make image-test passes a bookworm base made with debootstrap
# (packaging/bookworm-root.sh: python3.11, its venv module, python-is-python3, CA certificates).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# strip (binutils) for the compiled extensions below; build stage only.
RUN if ! command -v strip >/dev/null && command -v apt-get >/dev/null; then \
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends binutils >/dev/null; fi
WORKDIR /src
COPY pyproject.toml README.md /src/
COPY agent /src/agent
COPY protocols /src/protocols
COPY buffer /src/buffer
COPY config /src/config
RUN python -m venv /opt/edge-agent
RUN /opt/edge-agent/bin/pip wheel --no-deps --wheel-dir /wheels /src
RUN /opt/edge-agent/bin/pip install /wheels/plant_edge_agent-*.whl
# The runtime needs neither pip nor setuptools nor the dependencies' own test suites; debug
# symbols in compiled extensions (uvloop ships ~10 MB of them) go.
RUN /opt/edge-agent/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && find /opt/edge-agent/lib -depth -type d -path '*/site-packages/*' \( -name tests -o -name test \) \
      -exec rm -rf {} + \
 && if command -v strip >/dev/null; then \
      find /opt/edge-agent/lib -name '*.so' -exec strip --strip-unneeded {} +; fi
# Smoke: the entry point starts and every configuration model (all protocols) imports.
RUN /opt/edge-agent/bin/edge-agent --version && /opt/edge-agent/bin/edge-agent config schema >/dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="plant-edge-agent" \
      org.opencontainers.image.description="PLC signals in, downtime and scrap events out, exactly once"
RUN groupadd --system --gid 10001 edge-agent \
 && useradd --system --uid 10001 --gid edge-agent --home-dir /var/lib/edge-agent \
      --shell /usr/sbin/nologin edge-agent \
 && install -d -o edge-agent -g edge-agent -m 0700 /var/lib/edge-agent \
 && install -d -m 0755 /etc/edge-agent
COPY --from=build /opt/edge-agent /opt/edge-agent
ENV PATH=/opt/edge-agent/bin:${PATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The CLI reads these as defaults, so `docker run -e EDGE_AGENT_LOG_FORMAT=json IMAGE` or another
# config path needs no new command line (EDGE_AGENT_LOG_LEVEL works the same way).
ENV EDGE_AGENT_CONFIG=/etc/edge-agent/config.yaml EDGE_AGENT_LOG_FORMAT=text
USER 10001:10001
WORKDIR /var/lib/edge-agent
# The buffer: keep it on a volume so an upgrade (a new container) finds the pending events.
VOLUME ["/var/lib/edge-agent"]
# Health, readiness, status and metrics. The default health.listen is 127.0.0.1 inside the
# container; set it to 0.0.0.0:9780 and publish it on the host's loopback to scrape /metrics.
EXPOSE 9780
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9780/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]
RUN ["edge-agent", "--version"]
ENTRYPOINT ["edge-agent"]
CMD ["run"]
