# The local stand-in for the official rabbitmq image, from Debian's
# rabbitmq-server (3.10). Same interface where Stratus relies on it: AMQP on
# 5672, data in /var/lib/rabbitmq, logs on stdout. No guest: the accounts are
# the definitions the stack mounts at /etc/rabbitmq/stratus (compose/).
ARG DEBIAN_IMAGE=stratus/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends rabbitmq-server \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && mkdir -p /etc/rabbitmq/conf.d /var/lib/rabbitmq /var/log/rabbitmq \
 && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
# The management API (tenants' broker accounts) and the Prometheus endpoint.
RUN rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus \
 && chown rabbitmq:rabbitmq /etc/rabbitmq/enabled_plugins
COPY rabbitmq.conf /etc/rabbitmq/rabbitmq.conf
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=- RABBITMQ_CONFIG_FILE=/etc/rabbitmq/rabbitmq
WORKDIR /var/lib/rabbitmq
USER rabbitmq
VOLUME /var/lib/rabbitmq
EXPOSE 5672 15672 15692
HEALTHCHECK --interval=3s --timeout=3s --start-period=60s --retries=5 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/5672"]
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
