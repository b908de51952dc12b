#!/usr/bin/env bash
# Builds the `api` image with podman on a Debian machine that has no docker daemon and cannot
# pull from a container registry, then runs it: the migrations job against PostgreSQL and the
# API under gunicorn, answering /healthz and /readyz. Safe to run again: each step that is
# already done (tools installed, base image present) is skipped, the check container and the
# check database are replaced. Not part of `make test` or CI: it needs root, podman and minutes.
#
#   deploy/build-local.sh                 # as root: every step
#   SKIP_RUN=1 deploy/build-local.sh      # build only
#   podman rmi localhost/saliency-base:bookworm   # to make the base image again
#
# The base image is made offline-ish: debootstrap fetches Debian packages from a Debian mirror
# (no registry), the root file system is imported as an image. pip inside the build uses this
# machine's own pip configuration (indexes, find-links, constraints), mounted read-only.
# The `worker` target is not built here: it starts from nvidia/cuda (a registry image) and
# installs multi-GB CUDA wheels.
set -euo pipefail
[[ $EUID -eq 0 ]] || { echo "run as root: podman (rootful), debootstrap and apt-get need it" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/var/tmp/saliency-build}              # rootfs, pip.conf, logs: never in the repo
BASE_IMAGE=${BASE_IMAGE:-localhost/saliency-base:bookworm}
API_IMAGE=${API_IMAGE:-localhost/saliency-audit-api:local}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}              # its python3 is 3.11, as pyproject requires
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-18000}                                 # 127.0.0.1:PORT -> the API's 8000
PG_ADMIN_URL=${PG_ADMIN_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
CHECK_DB=${CHECK_DB:-saliency_image_check}
BROKER_URL=${BROKER_URL:-redis://127.0.0.1:6379/15}
CONTAINER=saliency-audit-api-check

say() { printf '\n==> %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }

# This sandbox's quirks, harmless elsewhere: crun refuses hybrid cgroups ("cgroups in hybrid
# mode not supported"), so runc runs the containers; podman's default ulimits (nofile and
# nproc 1048576) are above what the runtime may set ("error setting rlimit type 7: operation
# not permitted"; nproc 32768 was the largest power of two it accepted), so both are pinned.
nofile=$(ulimit -Hn); [[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
nproc=$(ulimit -Hu); [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
RUNTIME=(--runtime "${OCI_RUNTIME:-runc}" --ulimit "nofile=$nofile:$nofile"
    --ulimit "nproc=$nproc:$nproc")

say "1/5 tools: podman, runc, slirp4netns, debootstrap, psql, curl (Debian packages)"
declare -A package=([podman]=podman [runc]=runc [slirp4netns]=slirp4netns
    [debootstrap]=debootstrap [psql]=postgresql-client [curl]=curl)
missing=()
for tool in "${!package[@]}"; do command -v "$tool" >/dev/null || missing+=("${package[$tool]}"); done
if ((${#missing[@]})); then
    run apt-get update
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
podman --version
mkdir -p "$WORK"

say "2/5 base image $BASE_IMAGE (debootstrap $DEBIAN_SUITE minbase + python3, python3-venv)"
if podman image exists "$BASE_IMAGE"; then
    echo "present: skipped (podman rmi $BASE_IMAGE to remake it)"
else
    rootfs=$WORK/rootfs
    start=$SECONDS
    run rm -rf "$rootfs"
    run debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR"
    # package lists and downloaded .debs are of no use in the image
    run rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb
    printf '+ tar -C %s -c . | podman import ... - %s\n' "$rootfs" "$BASE_IMAGE"
    tar --numeric-owner -C "$rootfs" -c . \
        | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
    run rm -rf "$rootfs"
    echo "base image made in $((SECONDS - start)) s"
fi

say "3/5 pip configuration for the build: this machine's, with its local indexes mounted"
# `pip config list` prints section.key='value' for every file and PIP_* variable pip reads;
# they become one pip.conf at /etc/pip.conf in the build, and every local path they name is
# mounted read-only at the same place (pip may still reach the network: --network host).
pip_conf=$WORK/pip.conf
mounts=(-v "$pip_conf:/etc/pip.conf:ro")
declare -A seen=() setting=() from_env=()
while IFS= read -r line; do
    [[ $line =~ ^(:env:|global|install|download)\.([a-z-]+)=\'(.*)\'$ ]] || continue
    section=${BASH_REMATCH[1]}; key=${BASH_REMATCH[2]}; value=${BASH_REMATCH[3]}
    # as in pip: a PIP_* variable wins over the files
    if [[ $section == :env: ]]; then section=global; from_env[$section.$key]=1
    elif [[ -n ${from_env[$section.$key]:-} ]]; then continue; fi
    setting[$section.$key]=$value
    for word in $value; do
        path=${word#file://}; path=${path%/}
        # a file index's pages (.../simple/) link to the files beside them: mount its parent
        [[ $word == file://* && $path == */simple ]] && path=${path%/simple}
        if [[ $path == /* && -e $path && -z ${seen[$path]:-} ]]; then
            seen[$path]=1
            mounts+=(-v "$path:$path:ro")
        fi
    done
done < <(python3 -m pip config list 2>/dev/null || true)
for section in global install download; do
    printf '[%s]\n' "$section"
    for name in "${!setting[@]}"; do
        if [[ $name == "$section".* ]]; then printf '%s = %s\n' "${name#*.}" "${setting[$name]}"; fi
    done
done > "$pip_conf"
cat "$pip_conf"

say "4/5 build target api as $API_IMAGE"
start=$SECONDS
run podman build "${RUNTIME[@]}" --format docker --network host "${mounts[@]}" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --target api -t "$API_IMAGE" -f "$REPO/Dockerfile" "$REPO"
echo "built in $((SECONDS - start)) s"
podman image ls "$API_IMAGE"

if [[ -n ${SKIP_RUN:-} ]]; then exit 0; fi

say "5/5 run: the migrations job, then the image's own CMD; GET /healthz, /readyz, HEALTHCHECK"
# slirp4netns, not the host network: the API binds 0.0.0.0:8000 as in production (published on
# 127.0.0.1:$PORT), and the container reaches this machine's loopback services at 10.0.2.2
net=(--network slirp4netns:allow_host_loopback=true)
db_url=${PG_ADMIN_URL%/*}/$CHECK_DB
envs=(-e "DATABASE_URL=${db_url/127.0.0.1/10.0.2.2}" -e "BROKER_URL=${BROKER_URL/127.0.0.1/10.0.2.2}")
cleanup() {
    podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
    psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS $CHECK_DB" || true
}
trap cleanup EXIT
cleanup
run psql "$PG_ADMIN_URL" -qc "CREATE DATABASE $CHECK_DB"
run podman run "${RUNTIME[@]}" --rm --no-healthcheck "${net[@]}" "${envs[@]}" "$API_IMAGE" \
    saliency-audit db upgrade
# no systemd here to time the HEALTHCHECK (podman logs "unable to get systemd connection to add
# healthchecks", harmless): it is run once by hand below
start_ms=$(($(date +%s%N) / 1000000))
run podman run "${RUNTIME[@]}" -d --name "$CONTAINER" --health-interval disable "${net[@]}" \
    -p "127.0.0.1:$PORT:8000" "${envs[@]}" "$API_IMAGE"
healthz=
for _ in $(seq 240); do
    healthz=$(curl -sf "http://127.0.0.1:$PORT/healthz") && break
    sleep 0.5
done
if [[ -z $healthz ]]; then
    podman logs "$CONTAINER" 2>&1 | tail -n 40
    echo "FAILED: /healthz did not answer within 2 minutes" >&2
    exit 1
fi
echo "GET /healthz -> $healthz ($(($(date +%s%N) / 1000000 - start_ms)) ms after podman run)"
echo "GET /readyz  -> $(curl -s "http://127.0.0.1:$PORT/readyz")"
run podman healthcheck run "$CONTAINER" && echo "HEALTHCHECK: healthy"
podman logs "$CONTAINER" 2>&1 | sed -n 1,3p     # sed reads it all: no SIGPIPE under pipefail
echo "removing the check container and database"
cleanup
trap - EXIT
podman image ls "$API_IMAGE"
