# The local stand-in for the official zookeeper image, from Debian's zookeeper
# (3.8) and a headless JRE. It takes the official image's settings
# (ZOO_TICK_TIME, ZOO_4LW_COMMANDS_WHITELIST, ...; data in /data and /datalog)
# so one compose file drives either image.
ARG DEBIAN_IMAGE=stratus/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends zookeeper default-jre-headless \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && sed -i -E 's/^(ZOO_LOG_DIR|ZOO_LOG4J_PROP)=(.*)$/\1=${\1:-\2}/' /usr/share/zookeeper/bin/zkEnv.sh \
 && mkdir -p /data /datalog /conf /logs \
 && chown -R zookeeper:zookeeper /data /datalog /conf /logs
COPY zookeeper-entrypoint.sh /usr/local/bin/zookeeper-entrypoint.sh
ENV ZOOCFGDIR=/conf ZOO_LOG_DIR=/logs PATH=/usr/share/zookeeper/bin:$PATH
USER zookeeper
VOLUME ["/data", "/datalog"]
EXPOSE 2181
HEALTHCHECK --interval=3s --timeout=3s --start-period=30s --retries=5 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2181 && echo srvr >&3 && grep -q Mode <&3"]
ENTRYPOINT ["/usr/local/bin/zookeeper-entrypoint.sh"]
CMD ["zkServer.sh", "start-foreground", "/conf/zoo.cfg"]
