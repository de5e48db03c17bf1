#!/usr/bin/env bash
# Build the Stratus container images offline, from the OS packages and a
# wheelhouse built on the host. No registry is needed: the base system comes
# from debootstrap (the Debian mirror), everything above it from apt inside
# `docker build` and from the wheelhouse. Idempotent and cached: an image is
# rebuilt only when its inputs (a hash stored in the label org.stratus.inputs)
# changed.
#
#   scripts/docker-images.sh            install/start what is missing, build
#   scripts/docker-images.sh --env      also print the exports for compose
#   STRATUS_DOCKER_BASE=official scripts/docker-images.sh
#                                       build FROM the official python:3.11-slim
#                                       (needs a registry) instead of the local one
#
# Images:  stratus/debian:bookworm      debootstrap --variant=minbase, docker import
#          stratus/python:3.11-slim     python3 + venv from Debian (stands in for python:3.11-slim)
#          stratus/rabbitmq:3.10        rabbitmq-server from Debian (for rabbitmq:3.13-management)
#          stratus/zookeeper:3.8        zookeeper + JRE from Debian (for zookeeper:3.9)
#          stratus/prometheus:2.42      prometheus from Debian (for prom/prometheus:v2.55.1)
#          stratus/app:latest           the venv with the project (docker/Dockerfile.base):
#                                       every package of the repository (a directory with an
#                                       __init__.py, as pyproject.toml finds them) and its data
#          stratus/<component>:latest   orchestrator worker gateway dashboard (the whole stack, compose/)
#                                       and users rides catalog order (their own directories'
#                                       files run them directly; in compose/ they are apps
#                                       that the orchestrator builds from their packages)
#          stratus/deploy:latest        the whole stack's one-shot `deploy` service: the
#                                       built-in apps' manifests and sources in /opt/stratus-src
#                                       (docker/deploy.Dockerfile, python -m stratus.deploy_builtin)
# The compose files default to the official images; the names to use here are
# written to .docker-cache/images.env and to compose/.env and orchestrator/.env.
#
# Exit status: 0 built or up to date; 3 no Docker engine can be used here;
# 4 the base images cannot be made here (no Debian mirror, no registry for the
# official bases): both print the reason. Anything else: a Stratus build failed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE="$ROOT/.docker-cache"
PREFIX=${STRATUS_IMAGE_PREFIX:-stratus}
BASE_KIND=${STRATUS_DOCKER_BASE:-local}
PRINT_ENV=0
[ "${1:-}" = "--env" ] && PRINT_ENV=1
COMPONENTS=(orchestrator worker gateway dashboard users rides catalog order)
# The project's packages, found as pyproject.toml's packages.find finds them:
# every top-level directory with an __init__.py, but the tests and benchmarks.
PACKAGES=()
for d in */; do
  d=${d%/}
  case "$d" in tests|benchmarks) continue ;; esac
  [ -f "$d/__init__.py" ] && PACKAGES+=("$d")
done
mkdir -p "$CACHE"

log() { echo "docker-images: $*" >&2; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else return 1; fi; }
no_engine() { log "no Docker engine: $*"; exit 3; }
no_base() { log "the base images cannot be built here: $*"; exit 4; }

# --- 1. tools and engine -------------------------------------------------------
ensure_tools() {
  local need=()
  command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need+=(docker.io)
  # docker-compose 1.29 for the tests, unless `docker compose` (v2) is there.
  command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
  # debootstrap only while the base image is still to be made.
  if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ] \
     && [ "$BASE_KIND" != official ] && ! docker image inspect "$PREFIX/debian:bookworm" >/dev/null 2>&1; then
    need+=(debootstrap)
  fi
  # A reachable engine needs no local dockerd.
  if docker info >/dev/null 2>&1; then
    need=("${need[@]/docker.io}")
  fi
  local want=()
  for p in "${need[@]}"; do [ -n "$p" ] && want+=("$p"); done
  [ ${#want[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || no_engine "missing ${want[*]} and no apt-get to install them"
  log "installing ${want[*]} from the OS packages"
  sudo_ apt-get update -qq >/dev/null || no_engine "cannot run apt-get (not root, no sudo)"
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null \
    || no_engine "apt-get install ${want[*]} failed"
}

ensure_engine() {
  docker info >/dev/null 2>&1 && return 0
  local dockerd; dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
  [ -x "$dockerd" ] || no_engine "dockerd is not installed"
  if [ "$(id -u)" != 0 ]; then
    local why; why=$(docker info 2>&1 >/dev/null | grep -v '^$' | tail -n 1 || true)
    no_engine "docker info fails for $(id -un) (${why:-no answer}), and only root can start dockerd"
  fi
  if [ -S /var/run/docker.sock ] && pgrep -x dockerd >/dev/null 2>&1; then
    log "dockerd runs but does not answer yet; waiting"
  else
    local logf=/var/log/stratus-dockerd.log
    log "starting dockerd in the background (log: $logf)"
    # 9>&-: the daemon must not inherit the build lock (fd 9), or it holds it for good.
    nohup setsid "$dockerd" >>"$logf" 2>&1 </dev/null 9>&- &
  fi
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  no_engine "dockerd did not answer within 60 s (see /var/log/stratus-dockerd.log)"
}

# --- helpers ---------------------------------------------------------------------
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
image_label() { docker image inspect -f "{{index .Config.Labels \"org.stratus.inputs\"}}" "$1" 2>/dev/null || true; }
hash_of() { # hash_of EXTRA_STRING FILE... : the inputs of one image
  local extra=$1; shift
  { echo "$extra"; for f in "$@"; do echo "== $f"; cat "$f"; done; } | sha256sum | cut -c1-16
}
# build_image TAG HASH DOCKER_BUILD_ARGS... : skip when TAG carries HASH already
build_image() {
  local tag=$1 hash=$2 fail=${BUILD_FAIL_CODE:-1}; shift 2
  if [ "$(image_label "$tag")" = "$hash" ]; then
    log "$tag is up to date"
    return 0
  fi
  log "building $tag"
  local t0=$SECONDS
  local blog="$CACHE/build-${tag//[\/:]/_}.log"
  if ! DOCKER_BUILDKIT=0 docker build --label "org.stratus.inputs=$hash" -t "$tag" "$@" >"$blog" 2>&1; then
    tail -n 30 "$blog" >&2
    log "building $tag failed (full log: $blog)"
    [ "$fail" = 4 ] && no_base "$tag needs apt inside docker build (is the Debian mirror reachable?)"
    exit "$fail"
  fi
  log "built $tag in $((SECONDS - t0)) s"
}

# --- 2. base images from the OS packages ---------------------------------------------
build_debian() {
  local tag=$PREFIX/debian:bookworm
  [ -n "$(image_id "$tag")" ] && { log "$tag exists"; return 0; }
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || no_base "debootstrap is missing"
  local dir="$CACHE/rootfs-bookworm"
  rm -rf "$dir"
  log "debootstrap --variant=minbase bookworm (about a minute)"
  local t0=$SECONDS
  sudo_ debootstrap --variant=minbase bookworm "$dir" "${STRATUS_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
    > "$CACHE/debootstrap.log" 2>&1 || { tail -n 5 "$CACHE/debootstrap.log" >&2; no_base "debootstrap failed (is the Debian mirror reachable?), see $CACHE/debootstrap.log"; }
  sudo_ rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  sudo_ tar -C "$dir" -c . | docker import -c 'CMD ["/bin/bash"]' -c 'ENV LANG=C.UTF-8' \
    -c "LABEL org.stratus.inputs=debootstrap-minbase-bookworm" - "$tag" >/dev/null
  sudo_ rm -rf "$dir"
  log "imported $tag in $((SECONDS - t0)) s"
}

build_local_bases() {
  build_debian
  local deb; deb=$(image_id "$PREFIX/debian:bookworm")
  local f
  for spec in python:3.11-slim rabbitmq:3.10 zookeeper:3.8 prometheus:2.42; do
    local name=${spec%%:*}
    local files=(docker/local/$name.Dockerfile)
    for f in docker/local/$name*; do [ "$f" != "docker/local/$name.Dockerfile" ] && files+=("$f"); done
    BUILD_FAIL_CODE=4 build_image "$PREFIX/$spec" "$(hash_of "$deb" "${files[@]}")" \
      --build-arg "DEBIAN_IMAGE=$PREFIX/debian:bookworm" -f "docker/local/$name.Dockerfile" docker/local
  done
}

# --- 3. wheelhouse and 4. the Stratus images ------------------------------------------
source_files() { # what the wheel holds: the modules and pyproject.toml's package data
  find "${PACKAGES[@]}" -type f \( -name '*.py' -o -name '*.csv' -o -name '*.yaml' -o -name '*.json' \
    -o -path '*/templates/*.html' -o -path '*/static/*' \) \
    ! -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort
}

build_wheelhouse() {
  local py="$ROOT/.venv/bin/python"
  [ -x "$py" ] || py=python3
  local src="$CACHE/src" out="$CACHE/wheels"
  rm -rf "$src" "$out"
  mkdir -p "$src" "$out"
  # A clean copy of the sources: setuptools' build/ in the tree could carry stale modules.
  tar -c pyproject.toml $(source_files) | tar -x -C "$src"
  log "building the wheelhouse (the project and its dependencies)"
  "$py" -m pip wheel -q --disable-pip-version-check -w "$out" "$src" > "$CACHE/wheel.log" 2>&1 \
    || { log "pip wheel failed, see $CACHE/wheel.log"; exit 1; }
  rm -rf wheelhouse/deps wheelhouse/app
  mkdir -p wheelhouse/deps wheelhouse/app
  mv "$out"/stratus-*.whl wheelhouse/app/
  mv "$out"/*.whl wheelhouse/deps/
  rm -rf "$src" "$out"
}

build_stratus() {
  local pyimg
  if [ "$BASE_KIND" = official ]; then
    pyimg=python:3.11-slim
    [ -n "$(image_id "$pyimg")" ] || docker pull -q "$pyimg" >/dev/null 2>&1 || no_base "cannot pull $pyimg"
  else
    pyimg=$PREFIX/python:3.11-slim
  fi
  local app=$PREFIX/app:latest
  local apphash
  apphash=$(hash_of "$(image_id "$pyimg")" docker/Dockerfile.base docker/healthcheck.py .dockerignore \
            pyproject.toml $(source_files))
  if [ "$(image_label "$app")" != "$apphash" ]; then
    build_wheelhouse
    build_image "$app" "$apphash" --build-arg "PYTHON_IMAGE=$pyimg" -f docker/Dockerfile.base .
  else
    log "$app is up to date"
  fi
  local appid; appid=$(image_id "$app")
  for c in "${COMPONENTS[@]}"; do
    [ -f "$c/Dockerfile" ] || { log "$c/Dockerfile is missing; skipping"; continue; }
    # No context: the component Dockerfiles copy nothing.
    build_image "$PREFIX/$c:latest" "$(hash_of "$appid" "$c/Dockerfile")" \
      --build-arg "APP_IMAGE=$app" - < "$c/Dockerfile"
  done
}

# The directories the built-in apps' packages hold (rideshare/ and toystore/ list them,
# themselves included, in their package.txt).
deploy_dirs() {
  cat rideshare/package.txt toystore/package.txt | sed 's/^[[:space:]]*//; s/[[:space:]]*$//' | grep -v -e '^#' -e '^$' \
    | LC_ALL=C sort -u
}

deploy_files() { # as stratus.builtin.members packs them: no caches, no links
  local dirs; mapfile -t dirs < <(deploy_dirs)
  find "${dirs[@]}" -type f ! -path '*/__pycache__/*' ! -path '*/.git/*' ! -path '*/.pytest_cache/*' \
    ! -path '*/.mypy_cache/*' ! -name '*.pyc' ! -name '*.pyo' | LC_ALL=C sort
}

build_deploy() {
  local tag=$PREFIX/deploy:latest app=$PREFIX/app:latest
  local files; mapfile -t files < <(deploy_files)
  local hash; hash=$(hash_of "$(image_id "$app")" docker/deploy.Dockerfile "${files[@]}")
  if [ "$(image_label "$tag")" = "$hash" ]; then
    log "$tag is up to date"
    return 0
  fi
  local ctx="$CACHE/deploy-context"
  rm -rf "$ctx"
  mkdir -p "$ctx/src"
  tar -c "${files[@]}" | tar -x -C "$ctx/src"
  build_image "$tag" "$hash" --build-arg "APP_IMAGE=$app" -f docker/deploy.Dockerfile "$ctx"
  rm -rf "$ctx"
}

write_env() {
  local gid; gid=$(stat -c %g /var/run/docker.sock 2>/dev/null || echo 0)
  local body
  if [ "$BASE_KIND" = official ]; then
    body="STRATUS_IMAGE_PREFIX=$PREFIX
STRATUS_DOCKER_GID=$gid"
  else
    body="STRATUS_IMAGE_PREFIX=$PREFIX
STRATUS_RABBITMQ_IMAGE=$PREFIX/rabbitmq:3.10
STRATUS_ZOOKEEPER_IMAGE=$PREFIX/zookeeper:3.8
STRATUS_PROMETHEUS_IMAGE=$PREFIX/prometheus:2.42
STRATUS_DOCKER_GID=$gid"
  fi
  printf '%s\n' "$body" > "$CACHE/images.env"
  # docker-compose reads .env next to the compose file: the local images then
  # need no exports. Only files this script wrote are replaced.
  local marker="# written by scripts/docker-images.sh: the images built on this machine"
  for d in compose orchestrator; do
    if [ ! -e "$d/.env" ] || head -1 "$d/.env" | grep -qF "$marker"; then
      printf '%s\n%s\n' "$marker" "$body" > "$d/.env"
    fi
  done
  if [ $PRINT_ENV = 1 ]; then sed 's/^/export /' "$CACHE/images.env"; fi
}

main() {
  local t0=$SECONDS
  # One build at a time (two `make test` runs may overlap): they share the wheelhouse and the tags.
  exec 9>"$CACHE/images.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 900 9 || { log "another build holds $CACHE/images.lock for 15 min"; exit 1; }
  fi
  ensure_tools
  ensure_engine
  if [ "$BASE_KIND" != official ]; then build_local_bases; fi
  build_stratus
  build_deploy
  write_env
  # Drop the untagged images earlier builds of ours left behind (ours only: by label).
  docker image prune -f --filter label=org.stratus.inputs >/dev/null 2>&1 || true
  log "images ready in $((SECONDS - t0)) s"
}
main
