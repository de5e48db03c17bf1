# The local stand-in for the official python:3.11-slim, built from the Debian
# packages on top of the debootstrapped stratus/debian:bookworm (no registry needed).
ARG DEBIAN_IMAGE=stratus/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && ln -sf /usr/bin/python3 /usr/local/bin/python \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
CMD ["python3"]
