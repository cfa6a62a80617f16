# The discovery-mdc image that compose.yaml builds for its worker and frontend services.
#   docker build -t discovery-mdc .
#   docker run --rm discovery-mdc --help
# The base image and every Python package are pinned (requirements.lock); bump them on purpose.
FROM python:3.11.17-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src
# Dependencies first, so a code change rebuilds only the layers below.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md LICENSE ./
COPY discovery_mdc ./discovery_mdc
# Built with the pinned setuptools above (no download); `pip check` fails the build when the
# lock does not satisfy pyproject.toml.
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && useradd --system --uid 10001 --create-home mdc \
    # Mount points owned by the app user, so new named volumes inherit that ownership.
    && mkdir -p /models /cache \
    && chown mdc:mdc /models /cache

USER mdc
WORKDIR /home/mdc
ENV DYN_MDC_CACHE_DIR=/cache

ENTRYPOINT ["discovery-mdc"]
CMD ["--help"]
