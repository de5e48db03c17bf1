# The local stand-in for the official prom/prometheus image, from Debian's
# prometheus package (2.42) on the debootstrapped stratus/debian:bookworm (no
# registry needed). Same interface where Stratus relies on it
# (compose/docker-compose.yml): the binary is the entrypoint, so a compose
# `command:` is its flags for either image; the config in
# /etc/prometheus/prometheus.yml, the data in /prometheus, the API on 9090; a
# non-root user; `wget` for the health check (the official image has
# busybox's).
ARG DEBIAN_IMAGE=stratus/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
# policy-rc.d: the package's maintainer scripts must not start a daemon inside the build.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /usr/sbin/policy-rc.d \
 && mkdir -p /prometheus /etc/prometheus \
 && chown -R prometheus:prometheus /prometheus \
 && /usr/bin/prometheus --version
USER prometheus
WORKDIR /prometheus
VOLUME /prometheus
EXPOSE 9090
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=5 \
  CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9090/-/ready"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
