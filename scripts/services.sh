#!/usr/bin/env bash
# Install (when missing) and start (when not running) the servers Stratus
# stands on: RabbitMQ and ZooKeeper, from the OS packages, and Prometheus (the
# metrics history behind the dashboard), also from the OS packages, run as the
# project's own process. Idempotent: running it twice does no harm, and it
# never stops a server it did not start (one exception below).
#   scripts/services.sh install|start|stop|status|env|prometheus-config [rabbitmq] [zookeeper] [prometheus]
# (start/stop/status take the components to act on; default: all of them;
# prometheus-config prints the Prometheus config start would run with.)
#
# Several nodes (docs/cluster.md):
#   STRATUS_BROKER_NODES=N (default 1): N > 1 runs a RabbitMQ cluster of N
#     nodes as this project's own processes, rabbit1@localhost ... rabbitN@localhost,
#     sharing one Erlang cookie, data under $STATE_DIR/rabbitmq-cluster/rabbit<i>/.
#     Node i (1-based) listens on AMQP P+i-1, management P+i-1+10000,
#     prometheus P+i-1+10020, Erlang distribution P+i-1+20000, where
#     P = STRATUS_BROKER_PORT (default 5672: 5672/15672/15692/25672 for node 1).
#     When P is 5672 and the OS package's own single node (the system service)
#     holds it, that node is stopped first: the cluster replaces it (the one
#     server this script stops without having started it). Set
#     STRATUS_BROKER_PORT (e.g. 5682) to run the cluster beside it instead.
#   STRATUS_ZK_NODES=N (default 1): N > 1 runs a ZooKeeper ensemble of N
#     servers, data under $STATE_DIR/zookeeper-ensemble/<i>/; server i serves
#     clients on Z+i-1, its quorum port is Z+i-1+707 and its election port
#     Z+i-1+1707, where Z = STRATUS_ZK_PORT (default 2181: 2181/2888/3888).
#     A single ZooKeeper this script started on Z is stopped first.
#   With either, `start` prints the exports to use (STRATUS_SECRETS_DIR, where
#   each component's account file lists every node's URL, and
#   STRATUS_AMQP_MANAGEMENT_URL with every node's management API,
#   comma-separated; STRATUS_ZK_HOSTS with every server) and writes them to
#   $STATE_DIR/services.env; `env` prints them again.
#
# Broker accounts: no `guest`. `start` makes the platform's own accounts
# (bus/broker_accounts.py, docs/architecture.md) with generated passwords and
# writes each one's STRATUS_AMQP_URL to $STATE_DIR/secrets/broker-<component>.url
# (STRATUS_SECRETS_DIR to put them elsewhere), readable by this user alone.
#   `stop` stops every node and server of this state dir that it started,
#   whatever STRATUS_*_NODES says now.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${STRATUS_STATE_DIR:-$ROOT/var}
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$ROOT/$STATE_DIR" ;; esac
# The platform's broker accounts (bootstrap_accounts), read by bus/settings.py.
SECRETS_DIR=${STRATUS_SECRETS_DIR:-$STATE_DIR/secrets}
case "$SECRETS_DIR" in /*) ;; *) SECRETS_DIR="$ROOT/$SECRETS_DIR" ;; esac
ZK_DIR="$STATE_DIR/zookeeper"
ZK_SH=/usr/share/zookeeper/bin/zkServer.sh
PROM_DIR="$STATE_DIR/prometheus"
PROM_TARGETS=${STRATUS_PROMETHEUS_SD_DIR:-$PROM_DIR/targets}
case "$PROM_TARGETS" in /*) ;; *) PROM_TARGETS="$ROOT/$PROM_TARGETS" ;; esac
PROM_RETENTION=${STRATUS_PROMETHEUS_RETENTION:-2d}
# host:port of STRATUS_PROMETHEUS_URL (the dashboard reads Prometheus there)
PROM_ADDR=$(python3 -c 'import os, urllib.parse as u; p = u.urlparse(os.environ.get("STRATUS_PROMETHEUS_URL") or "http://127.0.0.1:9090"); print((p.hostname or "127.0.0.1") + ":" + str(p.port or 9090))')
PROM_HOST=${PROM_ADDR%:*}
PROM_PORT=${PROM_ADDR##*:}
RABBITMQ_METRICS=${STRATUS_RABBITMQ_METRICS:-127.0.0.1:15692}

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

port_open() { # host port
  python3 - "$1" "$2" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(0.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); sys.exit(0)
except OSError:
    sys.exit(1)
PY
}

zk_ok() {
  python3 - <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", 2181), timeout=1)
    s.sendall(b"ruok"); sys.exit(0 if s.recv(4) == b"imok" else 1)
except OSError:
    sys.exit(1)
PY
}

install() {
  local need=()
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || need+=(rabbitmq-server)
  [ -x "$ZK_SH" ] || need+=(zookeeper)
  if [ ${#need[@]} -gt 0 ]; then
    echo "services: installing ${need[*]} from the OS packages"
    sudo_ apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if ! prom_bin >/dev/null; then
    echo "services: installing prometheus from the OS packages"
    sudo_ apt-get update -qq
    local was_up=0; port_open "$PROM_HOST" "$PROM_PORT" && was_up=1
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package may start its own system service (its own config, port 9090):
    # this install started it, so stop and disable it; ours runs with our config.
    if [ "$was_up" = 0 ]; then
      if [ -d /run/systemd/system ]; then sudo_ systemctl disable --now prometheus >/dev/null 2>&1 || true
      elif [ -x /etc/init.d/prometheus ]; then sudo_ /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi
    fi
  fi
}

# etc/prometheus.yml with this machine's values: the targets directory, and
# every RabbitMQ node's metrics endpoint (STRATUS_RABBITMQ_METRICS, a comma list).
prometheus_config() {
  local rmq; rmq=$(printf '%s' "$RABBITMQ_METRICS" | sed -e 's/ //g' -e 's/,/", "/g')
  sed -e "s#@TARGETS_DIR@#$PROM_TARGETS#" -e "s#@RABBITMQ_METRICS@#$rmq#" "$ROOT/etc/prometheus.yml"
}

prom_bin() { command -v prometheus 2>/dev/null || { [ -x /usr/bin/prometheus ] && echo /usr/bin/prometheus; }; }

# The pid in our pid file, if that process is the Prometheus this script started.
prom_pid() {
  local pid; pid=$(cat "$PROM_DIR/prometheus.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q -- "--config.file=$PROM_DIR/prometheus.yml" \
    && echo "$pid"
}

prom_ready() {
  python3 - "$PROM_HOST" "$PROM_PORT" <<'PY'
import sys, urllib.request
try:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sys.exit(0 if opener.open(f"http://{sys.argv[1]}:{sys.argv[2]}/-/ready", timeout=1).status == 200 else 1)
except OSError:
    sys.exit(1)
PY
}

# Prometheus, as this project's own process: config rendered from
# etc/prometheus.yml into $STATE_DIR/prometheus/, scraping every 5 s what the
# orchestrator's file service discovery lists in $PROM_TARGETS/*.json and
# RabbitMQ's rabbitmq_prometheus endpoint. Already running (ours): a changed
# config is reloaded (SIGHUP). Something else on the port: left alone.
start_prometheus() {
  mkdir -p "$PROM_DIR/data" "$PROM_TARGETS"
  prometheus_config > "$PROM_DIR/prometheus.yml.new"
  local changed=0
  cmp -s "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml" || changed=1
  mv "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml"
  local pid
  if pid=$(prom_pid); then
    if [ "$changed" = 1 ]; then kill -HUP "$pid"; echo "services: Prometheus config reloaded"; fi
    echo "services: Prometheus already running on $PROM_ADDR (pid $pid)"
    return
  fi
  if port_open "$PROM_HOST" "$PROM_PORT"; then
    echo "services: $PROM_ADDR is taken by a server this script did not start: Stratus's targets are" \
         "in $PROM_TARGETS for it to read" >&2
    return
  fi
  local bin; bin=$(prom_bin) || { echo "services: prometheus is not installed" >&2; exit 1; }
  echo "services: starting Prometheus"
  setsid nohup "$bin" --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time="$PROM_RETENTION" --web.listen-address="$PROM_ADDR" \
    >>"$PROM_DIR/prometheus.log" 2>&1 </dev/null &
  echo $! > "$PROM_DIR/prometheus.pid"
  for _ in $(seq 1 120); do prom_ready && break; sleep 0.5; done
  prom_ready || { echo "services: Prometheus did not start; see $PROM_DIR/prometheus.log" >&2; exit 1; }
  echo "services: Prometheus up on $PROM_ADDR (targets: $PROM_TARGETS, retention $PROM_RETENTION)"
}

stop_prometheus() {
  local pid
  pid=$(prom_pid) || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$PROM_DIR/prometheus.pid"
}

start_rabbitmq() {
  if port_open 127.0.0.1 5672; then echo "services: RabbitMQ already listening on 5672"; return; fi
  echo "services: starting RabbitMQ"
  # No systemd here: the package's init script starts it as the rabbitmq user.
  sudo_ /etc/init.d/rabbitmq-server start >/dev/null 2>&1 || sudo_ runuser -u rabbitmq -- rabbitmq-server -detached
  for _ in $(seq 1 120); do port_open 127.0.0.1 5672 && break; sleep 0.5; done
  port_open 127.0.0.1 5672 || { echo "services: RabbitMQ did not start" >&2; exit 1; }
  sudo_ rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 || true
  echo "services: RabbitMQ up on 127.0.0.1:5672"
}

# Tenancy and metrics need two of the plugins RabbitMQ ships: the management
# HTTP API (15672: the platform creates each tenant's broker account through
# it) and the Prometheus endpoint (15692). Then the platform's own accounts
# (bootstrap_accounts). Idempotent; enabling a plugin on a running node needs no restart.
configure_rabbitmq() {
  local want=(rabbitmq_management rabbitmq_prometheus) missing=()
  local enabled; enabled=$(sudo_ rabbitmq-plugins list -e -m 2>/dev/null || true)
  for p in "${want[@]}"; do grep -qx "$p" <<<"$enabled" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "services: enabling RabbitMQ plugins ${missing[*]}"
    sudo_ rabbitmq-plugins enable -q "${missing[@]}" >/dev/null
  fi
  bootstrap_accounts "amqp://127.0.0.1:5672/%2F" sudo_ rabbitmqctl -q
  for _ in $(seq 1 60); do port_open 127.0.0.1 15672 && break; sleep 0.5; done
}

# The platform's broker accounts (bus/broker_accounts.py: one per component,
# the least permissions each needs, generated passwords) and no `guest`,
# through rabbitmqctl (root, the Erlang cookie): never through an account.
# Each account's STRATUS_AMQP_URL goes to $SECRETS_DIR/broker-<component>.url
# (mode 0600, the directory 0700), its password kept across restarts; the
# accounts are written again at every start (a broker whose data was wiped
# gets them back). `guest` is deleted, also from a broker of an older release.
#   bootstrap_accounts NODE-URLS CTL...   (CTL: the rabbitmqctl command line)
bootstrap_accounts() {
  local nodes=$1; shift
  local defs
  defs=$(umask 077; PYTHONPATH="$ROOT" python3 -m bus.broker_accounts --secrets "$SECRETS_DIR" --nodes "$nodes") || {
    echo "services: could not write the broker accounts to $SECRETS_DIR" >&2; exit 1; }
  printf '%s' "$defs" | "$@" import_definitions --format json >/dev/null || {
    echo "services: RabbitMQ refused the platform's accounts (rabbitmqctl import_definitions)" >&2; exit 1; }
  local users; users=$("$@" list_users 2>/dev/null || true)
  if grep -qE '^guest[[:space:]]' <<<"$users"; then
    "$@" delete_user guest >/dev/null
    echo "services: RabbitMQ account guest deleted"
  fi
  echo "services: RabbitMQ accounts of the platform in $SECRETS_DIR (broker-<component>.url)"
}

start_zookeeper() {
  if zk_ok; then echo "services: ZooKeeper already answering on 2181"; return; fi
  echo "services: starting ZooKeeper"
  mkdir -p "$ZK_DIR/data" "$ZK_DIR/log"
  sed "s#@DATADIR@#$ZK_DIR/data#" "$ROOT/etc/zoo.cfg" > "$ZK_DIR/zoo.cfg"
  ZOO_LOG_DIR="$ZK_DIR/log" ZOOPIDFILE="$ZK_DIR/zookeeper.pid" "$ZK_SH" start "$ZK_DIR/zoo.cfg" >/dev/null
  for _ in $(seq 1 120); do zk_ok && break; sleep 0.5; done
  zk_ok || { echo "services: ZooKeeper did not start; see $ZK_DIR/log" >&2; exit 1; }
  echo "services: ZooKeeper up on 127.0.0.1:2181"
}

# --- several nodes (STRATUS_BROKER_NODES, STRATUS_ZK_NODES > 1) -------------
BROKER_NODES=${STRATUS_BROKER_NODES:-1}
ZK_NODES=${STRATUS_ZK_NODES:-1}
BROKER_PORT=${STRATUS_BROKER_PORT:-5672}
ZK_PORT=${STRATUS_ZK_PORT:-2181}
for v in BROKER_NODES ZK_NODES BROKER_PORT ZK_PORT; do
  case "${!v}" in ''|*[!0-9]*) echo "services: STRATUS_$v must be a positive integer, got '${!v}'" >&2; exit 2 ;; esac
done
if [ "$BROKER_NODES" -lt 1 ] || [ "$BROKER_NODES" -gt 9 ] || [ "$ZK_NODES" -lt 1 ] || [ "$ZK_NODES" -gt 9 ]; then
  echo "services: STRATUS_BROKER_NODES and STRATUS_ZK_NODES take 1 to 9 (3 or 5 for a cluster)" >&2; exit 2
fi
# Prometheus scrapes RabbitMQ's metrics on every node of a cluster.
if [ "$BROKER_NODES" -gt 1 ] && [ -z "${STRATUS_RABBITMQ_METRICS:-}" ]; then
  RABBITMQ_METRICS=$(for ((i = 0; i < BROKER_NODES; i++)); do printf '127.0.0.1:%d\n' $((BROKER_PORT + 10020 + i)); done | paste -sd, -)
fi
RMQ_CLUSTER_DIR="$STATE_DIR/rabbitmq-cluster"
ZK_ENS_DIR="$STATE_DIR/zookeeper-ensemble"
RMQ_LIB=/usr/lib/rabbitmq/bin
WAIT_S=${STRATUS_SERVICES_WAIT:-90}   # bound on each wait for a node or server

rmq_amqp() { echo $((BROKER_PORT + $1 - 1)); }
rmq_mgmt() { echo $((BROKER_PORT + $1 - 1 + 10000)); }
rmq_prom() { echo $((BROKER_PORT + $1 - 1 + 10020)); }
rmq_dist() { echo $((BROKER_PORT + $1 - 1 + 20000)); }
zk_client() { echo $((ZK_PORT + $1 - 1)); }

# Environment of cluster node i, for the server and for the CLI tools: the
# cookie is $RMQ_CLUSTER_DIR/.erlang.cookie (HOME), everything else under the node's dir.
rmq_env() {
  local i=$1 d="$RMQ_CLUSTER_DIR/rabbit$1"
  echo HOME="$RMQ_CLUSTER_DIR" RABBITMQ_NODENAME="rabbit$i@localhost" RABBITMQ_USE_LONGNAME=false \
    RABBITMQ_NODE_PORT="$(rmq_amqp "$i")" RABBITMQ_DIST_PORT="$(rmq_dist "$i")" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/rabbit.pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
}
rmq_ctl() { # i rabbitmqctl-args... (the CLI needs only the cookie and the node's name)
  local i=$1; shift
  env HOME="$RMQ_CLUSTER_DIR" RABBITMQ_CONF_ENV_FILE="$RMQ_CLUSTER_DIR/rabbit$i/rabbitmq-env.conf" \
    timeout 120 "$RMQ_LIB/rabbitmqctl" -q -n "rabbit$i@localhost" "$@"
}

# The pid of cluster node i (a directory's node), if that process is ours.
rmq_node_pid() { # node dir
  local pid; pid=$(cat "$1/rabbit.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -qxF -- "RABBITMQ_MNESIA_BASE=$1/mnesia" \
    && echo "$pid"
}

# The OS package's own node (the system service) is running.
system_rabbit_running() {
  pgrep -u rabbitmq -f 'beam.*rabbit' >/dev/null 2>&1
}

stop_system_rabbit() {
  echo "services: stopping the OS package's single RabbitMQ node (the cluster takes its ports;" \
       "STRATUS_BROKER_NODES=1 $0 start brings it back)"
  if [ -d /run/systemd/system ]; then sudo_ systemctl stop rabbitmq-server >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/rabbitmq-server ]; then sudo_ /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true; fi
  system_rabbit_running && { sudo_ timeout 60 rabbitmqctl -q stop >/dev/null 2>&1 || true; }
  for _ in $(seq 1 $((WAIT_S * 2))); do port_open 127.0.0.1 "$BROKER_PORT" || break; sleep 0.5; done
  ! port_open 127.0.0.1 "$BROKER_PORT" || { echo "services: the system RabbitMQ node did not stop" >&2; exit 1; }
}

rmq_cluster_member() { # i: node i lists rabbit1 among its cluster's nodes
  rmq_ctl "$1" cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
sys.exit(0 if "rabbit1@localhost" in (s.get("disk_nodes") or []) + (s.get("running_nodes") or []) else 1)'
}

start_rabbitmq_cluster() {
  local n=$BROKER_NODES i d pid
  mkdir -p "$RMQ_CLUSTER_DIR"
  if [ ! -s "$RMQ_CLUSTER_DIR/.erlang.cookie" ]; then
    (umask 077; python3 -c 'import secrets, string; print("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)), end="")' \
      > "$RMQ_CLUSTER_DIR/.erlang.cookie")
  fi
  chmod 400 "$RMQ_CLUSTER_DIR/.erlang.cookie"
  # Ports: every node's must be free, or be that node's own (already running).
  for i in $(seq 1 "$n"); do
    d="$RMQ_CLUSTER_DIR/rabbit$i"
    rmq_node_pid "$d" >/dev/null && continue
    for port in $(rmq_amqp "$i") $(rmq_mgmt "$i") $(rmq_prom "$i") $(rmq_dist "$i"); do
      port_open 127.0.0.1 "$port" || continue
      if [ "$i" = 1 ] && [ "$BROKER_PORT" = 5672 ] && system_rabbit_running; then
        stop_system_rabbit; continue
      fi
      echo "services: port $port (rabbit$i) is taken by a server this script did not start;" \
           "set STRATUS_BROKER_PORT to another base" >&2
      exit 1
    done
  done
  local started=()
  for i in $(seq 1 "$n"); do
    d="$RMQ_CLUSTER_DIR/rabbit$i"
    if pid=$(rmq_node_pid "$d"); then echo "services: rabbit$i@localhost already running (pid $pid)"; continue; fi
    mkdir -p "$d/mnesia" "$d/log"
    cat > "$d/rabbitmq.conf" <<CONF
# Rendered by scripts/services.sh for rabbit$i@localhost (STRATUS_BROKER_NODES=$n).
management.tcp.port = $(rmq_mgmt "$i")
prometheus.tcp.port = $(rmq_prom "$i")
# A node cut off from the majority pauses rather than diverging.
cluster_partition_handling = pause_minority
CONF
    echo '[rabbitmq_management,rabbitmq_prometheus].' > "$d/enabled_plugins"
    : > "$d/rabbitmq-env.conf"
    echo "services: starting rabbit$i@localhost (AMQP $(rmq_amqp "$i"), management $(rmq_mgmt "$i"))"
    # Every node at once: nodes of an existing cluster wait for their peers at boot.
    # shellcheck disable=SC2046
    (cd "$d" && exec env $(rmq_env "$i") setsid "$RMQ_LIB/rabbitmq-server") >>"$d/log/server.out" 2>&1 </dev/null &
    started+=("$i")
  done
  for i in $(seq 1 "$n"); do
    d="$RMQ_CLUSTER_DIR/rabbit$i"
    for _ in $(seq 1 $((WAIT_S * 2))); do port_open 127.0.0.1 "$(rmq_amqp "$i")" && break; sleep 0.5; done
    # (a node opens its AMQP port at the end of its boot)
    port_open 127.0.0.1 "$(rmq_amqp "$i")" && rmq_node_pid "$d" >/dev/null || {
      echo "services: rabbit$i@localhost did not start; see $d/log" >&2; exit 1; }
  done
  # Join nodes 2..n to rabbit1 (once: a joined node remembers its cluster).
  for i in $(seq 2 "$n"); do
    rmq_cluster_member "$i" && continue
    echo "services: joining rabbit$i@localhost to rabbit1@localhost"
    rmq_ctl "$i" stop_app >/dev/null
    if ! rmq_ctl "$i" join_cluster rabbit1@localhost >/dev/null 2>&1; then
      rmq_ctl "$i" reset >/dev/null   # data of some other cluster: start it afresh
      rmq_ctl "$i" join_cluster rabbit1@localhost >/dev/null
    fi
    rmq_ctl "$i" start_app >/dev/null   # returns once the app runs
  done
  # The platform's accounts, once for the cluster (users are cluster-wide);
  # each account's URL lists every node.
  local nodes; nodes=$(for i in $(seq 1 "$n"); do printf 'amqp://127.0.0.1:%d/%%2F\n' "$(rmq_amqp "$i")"; done | paste -sd, -)
  bootstrap_accounts "$nodes" rmq_ctl 1
  for _ in $(seq 1 $((WAIT_S * 2))); do port_open 127.0.0.1 "$(rmq_mgmt 1)" && break; sleep 0.5; done
  local running; running=$(rmq_ctl 1 cluster_status --formatter json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["running_nodes"]))')
  [ "$running" -ge "$n" ] || { echo "services: only $running of $n RabbitMQ nodes run in the cluster" >&2; exit 1; }
  echo "services: RabbitMQ cluster of $n nodes up on 127.0.0.1:$(rmq_amqp 1)-$(rmq_amqp "$n")"
}

stop_rabbitmq_cluster() {
  local d pid i
  [ -d "$RMQ_CLUSTER_DIR" ] || return 0
  # Last node first, rabbit1 last (it then starts first, though every node waits for its peers).
  for d in $(ls -d "$RMQ_CLUSTER_DIR"/rabbit* 2>/dev/null | sort -r -V); do
    pid=$(rmq_node_pid "$d") || continue
    i=${d##*/rabbit}
    echo "services: stopping rabbit$i@localhost"
    rmq_ctl "$i" stop >/dev/null 2>&1 || true
    for _ in $(seq 1 $((WAIT_S * 4))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { echo "services: rabbit$i@localhost did not stop in ${WAIT_S}s: killed" >&2; kill -9 "$pid" 2>/dev/null || true; }
  done
  return 0
}

# --- ZooKeeper ensemble -------------------------------------------------------
zk_ask() { # port word: the server's answer to a four-letter word
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
    s.sendall(sys.argv[2].encode())   # the server answers and closes
    out = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        out += b
    print(out.decode(errors="replace"))
except OSError:
    sys.exit(1)
PY
}
zk_serving() { zk_ask "$1" srvr 2>/dev/null | grep -qE '^Mode: (leader|follower|standalone)'; }

zk_server_pid() { # server dir
  local pid; pid=$(cat "$1/zookeeper.pid" 2>/dev/null) || return 1
  if [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q -- "QuorumPeerMain $1/zoo.cfg"; then
    echo "$pid"
  else
    pgrep -f -- "QuorumPeerMain $1/zoo.cfg\$" | head -n 1 | grep .
  fi
}

start_zookeeper_ensemble() {
  local n=$ZK_NODES i d pid port
  for i in $(seq 1 "$n"); do
    d="$ZK_ENS_DIR/$i"
    zk_server_pid "$d" >/dev/null && continue
    for port in $(zk_client "$i") $(($(zk_client "$i") + 707)) $(($(zk_client "$i") + 1707)); do
      port_open 127.0.0.1 "$port" || continue
      if [ "$port" = "$ZK_PORT" ] && [ -f "$ZK_DIR/zookeeper.pid" ] && kill -0 "$(cat "$ZK_DIR/zookeeper.pid")" 2>/dev/null; then
        echo "services: stopping the single ZooKeeper (the ensemble takes its port)"
        ZOO_LOG_DIR="$ZK_DIR/log" ZOOPIDFILE="$ZK_DIR/zookeeper.pid" "$ZK_SH" stop "$ZK_DIR/zoo.cfg" >/dev/null || true
        for _ in $(seq 1 $((WAIT_S * 2))); do port_open 127.0.0.1 "$port" || break; sleep 0.5; done
        port_open 127.0.0.1 "$port" || continue
      fi
      echo "services: port $port (ZooKeeper server $i) is taken by a server this script did not start;" \
           "set STRATUS_ZK_PORT to another base" >&2
      exit 1
    done
  done
  local servers=""
  for i in $(seq 1 "$n"); do
    port=$(zk_client "$i"); servers+="server.$i=127.0.0.1:$((port + 707)):$((port + 1707))"$'\n'
  done
  for i in $(seq 1 "$n"); do
    d="$ZK_ENS_DIR/$i"
    if pid=$(zk_server_pid "$d"); then echo "services: ZooKeeper server $i already running (pid $pid)"; continue; fi
    mkdir -p "$d/data" "$d/log"
    echo "$i" > "$d/data/myid"
    # etc/zoo.cfg's settings (tickTime 200: 1 s sessions), a little more
    # slack for followers (initLimit 10 s, syncLimit 2 s), and the servers.
    { sed -e "s#@DATADIR@#$d/data#" -e "s#^clientPort=.*#clientPort=$(zk_client "$i")#" \
          -e 's#^initLimit=.*#initLimit=50#' -e 's#^syncLimit=.*#syncLimit=10#' "$ROOT/etc/zoo.cfg"
      printf '%s' "$servers"; } > "$d/zoo.cfg"
    echo "services: starting ZooKeeper server $i (clients on $(zk_client "$i"))"
    # Debian's ZooKeeper logs through slf4j with no binding: slf4j-simple
    # (when installed) writes its log to zookeeper.out.
    local cp="/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"
    [ -f /usr/share/java/slf4j-simple.jar ] && cp+=":/usr/share/java/slf4j-simple.jar"
    (cd "$d" && exec setsid /usr/bin/java "-Dzookeeper.log.dir=$d/log" -Dzookeeper.log.file=zookeeper.log \
        -Dorg.slf4j.simpleLogger.showDateTime=true "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss.SSS" \
        -Xmx128m -XX:+UseSerialGC -cp "$cp" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$d/zoo.cfg") >>"$d/log/zookeeper.out" 2>&1 </dev/null &
    echo $! > "$d/zookeeper.pid"
  done
  local ok
  for i in $(seq 1 "$n"); do
    ok=0
    for _ in $(seq 1 $((WAIT_S * 2))); do zk_serving "$(zk_client "$i")" && { ok=1; break; }; sleep 0.5; done
    [ "$ok" = 1 ] || { echo "services: ZooKeeper server $i does not serve; see $ZK_ENS_DIR/$i/log" >&2; exit 1; }
  done
  echo "services: ZooKeeper ensemble of $n servers up on 127.0.0.1:$(zk_client 1)-$(zk_client "$n")"
}

stop_zookeeper_ensemble() {
  local d pid
  [ -d "$ZK_ENS_DIR" ] || return 0
  for d in "$ZK_ENS_DIR"/*/; do
    d=${d%/}
    pid=$(zk_server_pid "$d") || continue
    echo "services: stopping ZooKeeper server ${d##*/}"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    rm -f "$d/zookeeper.pid"
  done
  return 0
}

# The settings that reach every node and server, as shell exports.
exports() {
  python3 - "$BROKER_NODES" "$BROKER_PORT" "$ZK_NODES" "$ZK_PORT" "$RABBITMQ_METRICS" "$SECRETS_DIR" <<'PY'
import os, shlex, sys, urllib.parse as u
nb, pb, nz, pz = (int(a) for a in sys.argv[1:5])
metrics = sys.argv[5]   # every node's metrics endpoint, as listed above
out = {"STRATUS_BROKER_NODES": str(nb), "STRATUS_ZK_NODES": str(nz)}
if nb > 1:
    # each component's account (its file lists every node): no credentials here
    out["STRATUS_SECRETS_DIR"] = sys.argv[6]
    # every node's management API: the platform fails over between them (bus/broker_admin.py)
    out["STRATUS_AMQP_MANAGEMENT_URL"] = ",".join(f"http://127.0.0.1:{pb + 10000 + i}" for i in range(nb))
    out["STRATUS_RABBITMQ_METRICS"] = metrics
if nz > 1:
    out["STRATUS_ZK_HOSTS"] = ",".join(f"127.0.0.1:{pz + i}" for i in range(nz))
for k, v in out.items():
    print(f"export {k}={shlex.quote(v)}")
PY
}

print_exports() {
  mkdir -p "$STATE_DIR"
  exports > "$STATE_DIR/services.env"
  echo "services: use these settings (also in $STATE_DIR/services.env: . $STATE_DIR/services.env):"
  sed 's/^/  /' "$STATE_DIR/services.env"
}

stop() {
  # Only the ZooKeeper servers, RabbitMQ cluster nodes and the Prometheus
  # this script started (their pid files); the single RabbitMQ is a system service.
  if want prometheus; then stop_prometheus; fi
  if want zookeeper; then
    if [ -f "$ZK_DIR/zookeeper.pid" ]; then
      ZOO_LOG_DIR="$ZK_DIR/log" ZOOPIDFILE="$ZK_DIR/zookeeper.pid" "$ZK_SH" stop "$ZK_DIR/zoo.cfg" >/dev/null || true
    fi
    stop_zookeeper_ensemble
  fi
  if want rabbitmq; then stop_rabbitmq_cluster; fi
}

status() {
  if want rabbitmq; then
    if [ "$BROKER_NODES" -gt 1 ]; then
      for i in $(seq 1 "$BROKER_NODES"); do
        port_open 127.0.0.1 "$(rmq_amqp "$i")" && echo "rabbitmq rabbit$i@localhost: up on $(rmq_amqp "$i")" \
          || echo "rabbitmq rabbit$i@localhost: down"
      done
    else
      port_open 127.0.0.1 5672 && echo "rabbitmq: up" || echo "rabbitmq: down"
      port_open 127.0.0.1 15672 && echo "rabbitmq management: up" || echo "rabbitmq management: down"
    fi
  fi
  if want zookeeper; then
    if [ "$ZK_NODES" -gt 1 ]; then
      for i in $(seq 1 "$ZK_NODES"); do
        mode=$(zk_ask "$(zk_client "$i")" srvr 2>/dev/null | sed -n 's/^Mode: //p')
        echo "zookeeper server $i: ${mode:-down} on $(zk_client "$i")"
      done
    else
      zk_ok && echo "zookeeper: up" || echo "zookeeper: down"
    fi
  fi
  if want prometheus; then prom_ready && echo "prometheus: up on $PROM_ADDR" || echo "prometheus: down"; fi
}

# The components named after the command (default: all).
COMMAND=${1:-start}
[ $# -gt 0 ] && shift
COMPONENTS=" ${*:-rabbitmq zookeeper prometheus} "
for c in $COMPONENTS; do
  case "$c" in rabbitmq|zookeeper|prometheus) ;; *) echo "services: unknown component $c" >&2; exit 2 ;; esac
done
want() { [[ "$COMPONENTS" == *" $1 "* ]]; }

start() {
  install
  if want rabbitmq; then
    if [ "$BROKER_NODES" -gt 1 ]; then start_rabbitmq_cluster; else start_rabbitmq; configure_rabbitmq; fi
  fi
  if want zookeeper; then
    if [ "$ZK_NODES" -gt 1 ]; then start_zookeeper_ensemble; else start_zookeeper; fi
  fi
  if want prometheus; then start_prometheus; fi
  if [ "$BROKER_NODES" -gt 1 ] || [ "$ZK_NODES" -gt 1 ]; then print_exports; fi
}

case "$COMMAND" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) exports ;;
  prometheus-config) prometheus_config ;;
  *) echo "usage: $0 install|start|stop|status|env|prometheus-config [rabbitmq] [zookeeper] [prometheus]" >&2; exit 2 ;;
esac
