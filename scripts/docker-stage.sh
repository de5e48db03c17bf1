#!/usr/bin/env bash
# The Docker stage of `make test`: build (or reuse) the images, then run the
# tests marked @pytest.mark.docker in tests/e2e/docker against real stacks.
#
# - No Docker engine can be used here (not installable, not root, dockerd does
#   not start), or the base images cannot be made (no Debian mirror): print why
#   and exit 0, so the process suites decide `make test`.
# - The images do not build, or a test fails: exit non-zero.
# Images are cached between runs (scripts/docker-images.sh skips any image
# whose inputs hash is unchanged); a warm run is the tests only.
#   DOCKER_PYTEST_ARGS="-k failover" scripts/docker-stage.sh
#   STRATUS_SKIP_DOCKER=1 skips the stage.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
t0=$SECONDS
say() { echo "docker stage: $*"; }

if [ -n "${STRATUS_SKIP_DOCKER:-}" ]; then
  say "skipped (STRATUS_SKIP_DOCKER is set)"
  exit 0
fi

scripts/docker-images.sh
rc=$?
if [ $rc -eq 3 ]; then
  say "skipped: no Docker engine can be used on this machine (reason above)"
  exit 0
elif [ $rc -eq 4 ]; then
  say "skipped: the base images cannot be built on this machine (reason above)"
  exit 0
elif [ $rc -ne 0 ]; then
  say "FAILED: the images did not build (exit $rc)"
  exit $rc
fi
build_s=$((SECONDS - t0))

set -a
# shellcheck disable=SC1091
. "$ROOT/.docker-cache/images.env"
set +a
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3

# The tests keep each stack's logs here; keep two days of them.
find "$ROOT/.docker-cache/test-logs" -type f -mtime +2 -delete 2>/dev/null || true
say "images ready in ${build_s} s; running the Docker tests"
# shellcheck disable=SC2086
"$PY" -m pytest -q -m docker -p no:cacheprovider ${DOCKER_PYTEST_ARGS:-} tests/e2e/docker
rc=$?
say "finished in $((SECONDS - t0)) s (images ${build_s} s), pytest exit $rc"
exit $rc
