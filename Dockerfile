# The discovery-mdc image that compose.yaml builds for its worker and frontend services.
#   docker build -t discovery-mdc .
#   docker run --rm discovery-mdc --help
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY discovery_mdc ./discovery_mdc
RUN pip install . \
    && useradd --system --uid 10001 --create-home mdc \
    # Mount points owned by the app user, so new named volumes inherit that ownership.
    && mkdir -p /models /cache \
    && chown mdc:mdc /models /cache

USER mdc
WORKDIR /home/mdc
ENV DYN_MDC_CACHE_DIR=/cache

ENTRYPOINT ["discovery-mdc"]
CMD ["--help"]
