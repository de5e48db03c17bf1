#!/bin/bash
# Render /conf/zoo.cfg from the same variables the official zookeeper image reads.
set -e
cat > /conf/zoo.cfg <<CFG
dataDir=/data
dataLogDir=/datalog
clientPort=2181
tickTime=${ZOO_TICK_TIME:-2000}
initLimit=${ZOO_INIT_LIMIT:-5}
syncLimit=${ZOO_SYNC_LIMIT:-2}
maxClientCnxns=${ZOO_MAX_CLIENT_CNXNS:-60}
standaloneEnabled=${ZOO_STANDALONE_ENABLED:-true}
admin.enableServer=${ZOO_ADMINSERVER_ENABLED:-false}
4lw.commands.whitelist=${ZOO_4LW_COMMANDS_WHITELIST:-srvr}
autopurge.snapRetainCount=${ZOO_AUTOPURGE_SNAPRETAINCOUNT:-3}
autopurge.purgeInterval=${ZOO_AUTOPURGE_PURGEINTERVAL:-1}
CFG
for kv in ${ZOO_CFG_EXTRA:-}; do echo "$kv" >> /conf/zoo.cfg; done
[ -f /data/myid ] || echo "${ZOO_MY_ID:-1}" > /data/myid
# Log to the console (docker logs), as the official image does.
export ZOO_LOG4J_PROP="${ZOO_LOG4J_PROP:-INFO,CONSOLE}" ZOO_LOG_DIR=/logs
exec "$@"
