#!/usr/bin/env sh
# The Swarm stack's secrets (compose/docker-stack.yml), made before `docker
# stack deploy` into DIR (mode 0700, every file 0600):
#   broker-<component>.url   each platform component's broker account
#                            (python -m bus.broker_accounts, as compose's
#                            `secrets` service runs it: no guest)
#   definitions.json         those accounts for RabbitMQ to load at boot
#   zookeeper                the platform's ZooKeeper identity's secret (bus/zk.py)
# Then: STRATUS_STACK_SECRETS=DIR docker stack deploy -c compose/docker-stack.yml <stack>
#
# Kept: a second run changes nothing (passwords are kept, and definitions.json
# is only written again when an account file was missing), since Swarm refuses
# to change a secret that a service uses. To rotate them, remove the stack and
# DIR. Standard library only: PYTHON (default python3) with this checkout.
#   compose/stack-secrets.sh DIR [amqp://rabbitmq:5672/%2F]
set -eu
DIR=${1:?usage: compose/stack-secrets.sh DIR [broker nodes URL]}
NODES=${2:-amqp://rabbitmq:5672/%2F}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
umask 077
mkdir -p "$DIR"
chmod 0700 "$DIR"

missing=0
for c in orchestrator gateway worker admin; do
  [ -s "$DIR/broker-$c.url" ] || missing=1
done
if [ $missing -eq 1 ] || [ ! -s "$DIR/definitions.json" ]; then
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m bus.broker_accounts --secrets "$DIR" --nodes "$NODES" \
    > "$DIR/definitions.json.new"
  mv "$DIR/definitions.json.new" "$DIR/definitions.json"
fi
if [ ! -s "$DIR/zookeeper" ]; then
  "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$DIR/zookeeper.new"
  mv "$DIR/zookeeper.new" "$DIR/zookeeper"
fi
chmod 0600 "$DIR"/*
echo "stack secrets ready in $DIR: $(ls "$DIR" | tr '\n' ' ')"
