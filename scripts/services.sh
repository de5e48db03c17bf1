#!/usr/bin/env bash
# Install (when missing) and start (when not running) the servers Stratus
# stands on: RabbitMQ and ZooKeeper, from the OS packages, and Prometheus (the
# metrics history behind the dashboard), also from the OS packages, run as the
# project's own process. Idempotent: running it twice does no harm, and it
# never stops a server it did not start.
#   scripts/services.sh install|start|stop|status
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${STRATUS_STATE_DIR:-$ROOT/var}
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$ROOT/$STATE_DIR" ;; esac
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

prom_bin() { command -v prometheus 2>/dev/null || { [ -x /usr/bin/prometheus ] && echo /usr/bin/prometheus; }; }

# The pid in our pid file, if that process is the Prometheus this script started.
prom_pid() {
  local pid; pid=$(cat "$PROM_DIR/prometheus.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--config.file=$PROM_DIR/prometheus.yml" \
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
  sed -e "s#@TARGETS_DIR@#$PROM_TARGETS#" -e "s#@RABBITMQ_METRICS@#$RABBITMQ_METRICS#" \
    "$ROOT/etc/prometheus.yml" > "$PROM_DIR/prometheus.yml.new"
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
# it) and the Prometheus endpoint (15692). The platform's own account (the one
# in STRATUS_AMQP_URL, guest by default) gets the `impersonator` tag, so that
# platform components may publish for a tenant with that tenant's validated
# user_id. Idempotent; enabling a plugin on a running node needs no restart.
configure_rabbitmq() {
  local want=(rabbitmq_management rabbitmq_prometheus) missing=()
  local enabled; enabled=$(sudo_ rabbitmq-plugins list -e -m 2>/dev/null || true)
  for p in "${want[@]}"; do grep -qx "$p" <<<"$enabled" || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "services: enabling RabbitMQ plugins ${missing[*]}"
    sudo_ rabbitmq-plugins enable -q "${missing[@]}" >/dev/null
  fi
  local user; user=$(python3 -c 'import os, urllib.parse as u; print(u.unquote(u.urlparse(os.environ.get("STRATUS_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F").username or "guest"))')
  if ! sudo_ rabbitmqctl -q list_users 2>/dev/null | grep -E "^$user\s" | grep -q impersonator; then
    sudo_ rabbitmqctl -q set_user_tags "$user" administrator impersonator >/dev/null
    echo "services: RabbitMQ account $user may publish for tenants (impersonator)"
  fi
  for _ in $(seq 1 60); do port_open 127.0.0.1 15672 && break; sleep 0.5; done
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

stop() {
  # Only the ZooKeeper and the Prometheus this script started (their pid
  # files); RabbitMQ is a system service.
  stop_prometheus
  if [ -f "$ZK_DIR/zookeeper.pid" ]; then
    ZOO_LOG_DIR="$ZK_DIR/log" ZOOPIDFILE="$ZK_DIR/zookeeper.pid" "$ZK_SH" stop "$ZK_DIR/zoo.cfg" >/dev/null || true
  fi
}

status() {
  port_open 127.0.0.1 5672 && echo "rabbitmq: up" || echo "rabbitmq: down"
  port_open 127.0.0.1 15672 && echo "rabbitmq management: up" || echo "rabbitmq management: down"
  zk_ok && echo "zookeeper: up" || echo "zookeeper: down"
  prom_ready && echo "prometheus: up on $PROM_ADDR" || echo "prometheus: down"
}

case "${1:-start}" in
  install) install ;;
  start) install; start_rabbitmq; configure_rabbitmq; start_zookeeper; start_prometheus ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
