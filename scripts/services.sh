#!/usr/bin/env bash
# Install (when missing) and start (when not running) the two servers Stratus
# stands on: RabbitMQ and ZooKeeper, from the OS packages. Idempotent: running
# it twice does no harm, and it never stops a server it did not start.
#   scripts/services.sh install|start|stop|status
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE_DIR=${STRATUS_STATE_DIR:-$ROOT/var}
case "$STATE_DIR" in /*) ;; *) STATE_DIR="$ROOT/$STATE_DIR" ;; esac
ZK_DIR="$STATE_DIR/zookeeper"
ZK_SH=/usr/share/zookeeper/bin/zkServer.sh

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
  # Only the ZooKeeper this script started (its pid file); RabbitMQ is a system service.
  if [ -f "$ZK_DIR/zookeeper.pid" ]; then
    ZOO_LOG_DIR="$ZK_DIR/log" ZOOPIDFILE="$ZK_DIR/zookeeper.pid" "$ZK_SH" stop "$ZK_DIR/zoo.cfg" >/dev/null || true
  fi
}

status() {
  port_open 127.0.0.1 5672 && echo "rabbitmq: up" || echo "rabbitmq: down"
  port_open 127.0.0.1 15672 && echo "rabbitmq management: up" || echo "rabbitmq management: down"
  zk_ok && echo "zookeeper: up" || echo "zookeeper: down"
}

case "${1:-start}" in
  install) install ;;
  start) install; start_rabbitmq; configure_rabbitmq; start_zookeeper ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
