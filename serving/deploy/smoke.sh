#!/usr/bin/env bash
# Builds the service's images and proves them by running them: serving/deploy/README.md, "What smoke.sh proves".
#
#   bash serving/deploy/smoke.sh [STAGE ...]     STAGE: images, all-in-one, compose, k8s, bento (default: all)
#
# Uses docker when its daemon answers, else podman. Where python:3.11-slim-bookworm cannot be pulled (no registry)
# and podman + debootstrap are there (as root), it builds a stand-in of it from Debian's own packages. Prints one
# line per check ("ok", "FAIL" or "skip"), then the measurements; exits 1 if a check failed, 77 (automake's "skip")
# when no container engine can run. Only ever talks to 127.0.0.1 and the containers it starts; removes them on exit,
# so it can be run again. The settings (environment):
#   BRAINTUMOR_SMOKE_ENGINE   docker | podman (default: detected)
#   BRAINTUMOR_SMOKE_IMAGE    the MRI slice to send (default: the first glioma slice of ../shared/data/brisc2025)
#   BRAINTUMOR_SMOKE_PYTHON   a Python with braintumor installed, for the host reference and the SDK calls
#                             (default: the repository's .venv)
#   BRAINTUMOR_SMOKE_PORT     first of the host ports it publishes on 127.0.0.1 (default 3100: HTTP 3100-3109,
#                             gRPC 50100-50109, Triton 8100-8109)
#   BRAINTUMOR_SMOKE_REBUILD  1: build without the layer cache
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEPLOY="$ROOT/serving/deploy"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(images all-in-one compose k8s bento)
VERSION=0.1.0
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
PORT0=${BRAINTUMOR_SMOKE_PORT:-3100}
OFFSET=$((PORT0 - 3100))
HTTP_PORT=$((3100 + OFFSET)); GRPC_PORT=$((50100 + OFFSET)); TRITON_PORT=$((8100 + OFFSET))
PREFIX=braintumor-smoke
WORK="$(mktemp -d "${TMPDIR:-/tmp}/braintumor-smoke.XXXXXX")"
FAILED=0
declare -a MEASURED=()
declare -a CLEANUP=()

say() { printf '%s\n' "$*"; }
ok() { say "ok   $*"; }
fail() { say "FAIL $*"; FAILED=1; }
skip() { say "skip $*"; }
measure() { MEASURED+=("$*"); }
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }

cleanup() {
    local i
    for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[i]}" >/dev/null 2>&1; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- the engine ------------------------------------------------------------------------------------------------
ENGINE=${BRAINTUMOR_SMOKE_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null; then ENGINE=podman
    else say "skip no container engine: no docker daemon answers and podman is not installed"; exit 77; fi
fi
E() { "$ENGINE" "$@"; }
HOME_TMPFS=rw,mode=1777
[ "$ENGINE" = podman ] && HOME_TMPFS=rw,U

PY=${BRAINTUMOR_SMOKE_PYTHON:-}
[ -z "$PY" ] && { [ -x "$ROOT/.venv/bin/python" ] && PY="$ROOT/.venv/bin/python" || PY=python3; }
if ! "$PY" -c "import braintumor.clients" 2>/dev/null; then
    say "FAIL no Python with braintumor installed ($PY); set BRAINTUMOR_SMOKE_PYTHON"; exit 1
fi
client() { "$PY" "$DEPLOY/smoke_client.py" "$@"; }

IMAGE=${BRAINTUMOR_SMOKE_IMAGE:-}
if [ -z "$IMAGE" ]; then
    IMAGE=$(find "$ROOT/../shared/data/brisc2025/classification_task" -path '*/glioma/*.jpg' 2>/dev/null | sort | head -1)
fi
[ -f "$IMAGE" ] || { say "FAIL no MRI slice to send: set BRAINTUMOR_SMOKE_IMAGE=FILE (a BRISC 2025 .jpg)"; exit 1; }
say "engine $ENGINE ($(E --version 2>&1 | head -1)); slice $(basename "$IMAGE"); work dir $WORK"

# HTTP status of a GET on 127.0.0.1 (000 when nothing answers)
http_code() { curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$1$2" 2>/dev/null || true; }

# wait_http PORT PATH TIMEOUT [CONTAINER]: until PATH answers 200; fails early when CONTAINER stops running
wait_http() {
    local deadline=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ "$(http_code "$1" "$2")" = 200 ] && return 0
        if [ -n "${4:-}" ] && [ "$(E inspect -f '{{.State.Running}}' "$4" 2>/dev/null)" != true ]; then return 1; fi
        sleep 0.5
    done
    return 1
}

image_size() { E image inspect -f '{{.Size}}' "$1" 2>/dev/null; }

# -- podman on this host: the runtime and ulimits --------------------------------------------------------------
# podman's default ulimits (and crun, on some cgroup layouts) cannot be applied on every host; then a private
# containers.conf (CONTAINERS_CONF, read by podman, podman-compose and podman kube play alike) turns them off.
podman_can_run() { podman run --rm --network none "$BASE_IMAGE" true 2>"$WORK/podman-run.err"; }
fix_podman() {
    [ "$ENGINE" = podman ] || return 0
    podman_can_run && return 0
    {
        printf '[containers]\ndefault_ulimits = []\n'
        command -v runc >/dev/null && printf '\n[engine]\nruntime = "runc"\n'
    } >"$WORK/containers.conf"
    export CONTAINERS_CONF="$WORK/containers.conf"
    if podman_can_run; then
        ok "podman runs containers with $(tr '\n' ' ' <"$WORK/containers.conf")(CONTAINERS_CONF)"
    else
        fail "podman cannot run a container: $(tail -1 "$WORK/podman-run.err")"; exit 1
    fi
}

# -- the base image: pulled, or a stand-in from Debian's packages ----------------------------------------------
prepare_base() {
    if E image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        local kind
        kind=$(E image inspect -f '{{index .Config.Labels "org.braintumor.stand-in"}}' "$BASE_IMAGE" 2>/dev/null)
        ok "base $BASE_IMAGE present${kind:+ (stand-in: $kind)}"
        return 0
    fi
    local t_pull; t_pull=$(now)
    if timeout 90 "$ENGINE" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then ok "base $BASE_IMAGE pulled"; return 0; fi
    say "     (no pull of $BASE_IMAGE after $(since "$t_pull") s: no registry)"
    if [ "$ENGINE" != podman ] || ! command -v debootstrap >/dev/null || [ "$(id -u)" != 0 ]; then
        fail "base $BASE_IMAGE cannot be pulled, and a stand-in needs podman, debootstrap and root"; exit 1
    fi
    # What the official image has that matters here: Python 3.11 with a shared libpython (Triton's python-backend
    # stub links against libpython3.11.so.1.0), venv and pip, CA certificates, a `python` command, C.UTF-8.
    # Not the same build: Debian's python3.11 (3.11.2) under /usr, where the official one is 3.11.x under /usr/local.
    local t0 rootfs="$WORK/rootfs" mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    t0=$(now)
    if ! debootstrap --variant=minbase \
            --include=python3,python3-venv,python3-pip,libpython3.11,ca-certificates,passwd,netbase,tzdata \
            bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1; then
        fail "base stand-in: debootstrap failed: $(tail -2 "$WORK/debootstrap.log" | tr '\n' ' ')"; exit 1
    fi
    mountpoint -q "$rootfs/proc" && umount "$rootfs/proc"
    # the host's CA bundle: pip inside the build must trust whatever the host trusts (a proxy's CA included)
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    # the official image's Python is not "externally managed" (PEP 668): pip installs into it (bentoml containerize)
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --change 'LABEL org.braintumor.stand-in="debootstrap bookworm, Debian python3.11"' \
        - "$BASE_IMAGE" >/dev/null 2>"$WORK/import.log" || { fail "base stand-in: $(tail -1 "$WORK/import.log")"; exit 1; }
    rm -rf "$rootfs"
    ok "base stand-in $BASE_IMAGE built from Debian bookworm in $(since "$t0") s ($(mb "$(image_size "$BASE_IMAGE")"))"
}

# -- images ----------------------------------------------------------------------------------------------------
build() {  # build TARGET TAG
    local t0 args=(build --network host --target "$1" -t "$2" -f "$ROOT/Dockerfile")
    [ "${BRAINTUMOR_SMOKE_REBUILD:-0}" = 1 ] && args+=(--no-cache)
    [ "$ENGINE" = podman ] && args+=(--format docker)  # the OCI format has no HEALTHCHECK: podman would drop it
    t0=$(now)
    if E "${args[@]}" "$ROOT" >"$WORK/build-$1.log" 2>&1; then
        local size; size=$(image_size "$2")
        ok "build --target $1 -> $2 in $(since "$t0") s, $(mb "$size")"
        measure "image $2: $(mb "$size") (target $1, built in $(since "$t0") s)"
    else
        fail "build --target $1: $(grep -E 'error|Error|ERROR' "$WORK/build-$1.log" | tail -3 | tr '\n' ' ')"
        tail -30 "$WORK/build-$1.log"
        return 1
    fi
}

# -- the host's own `braintumor serve`: the label every container must agree with -------------------------------
REFERENCE=""
host_reference() {
    local bin log="$WORK/host-serve.log" pid t0
    bin="$(dirname "$PY")/braintumor"
    [ -x "$bin" ] || { fail "host reference: no braintumor command next to $PY"; return 1; }
    t0=$(now)
    "$bin" serve --model-repository "$ROOT/model_repository" --http-port $((HTTP_PORT + 9)) \
        --grpc-port $((GRPC_PORT + 9)) --grpc-metrics-port $((GRPC_PORT + 8)) --triton-http-port $((TRITON_PORT + 7)) \
        --triton-grpc-port $((TRITON_PORT + 8)) --triton-metrics-port $((TRITON_PORT + 9)) >"$log" 2>&1 &
    pid=$!
    CLEANUP+=("kill -TERM $pid; wait $pid")
    if ! wait_http $((HTTP_PORT + 9)) /readyz 180; then
        fail "host reference: braintumor serve not ready in 180 s: $(tail -3 "$log" | tr '\n' ' ')"
        kill -TERM "$pid"; wait "$pid"; return 1
    fi
    REFERENCE=$(client label --url "127.0.0.1:$((HTTP_PORT + 9))" --protocol http "$IMAGE" 2>&1 | cut -d' ' -f1)
    kill -TERM "$pid"; wait "$pid"
    ok "host reference: braintumor serve on the host says $REFERENCE (ready in $(since "$t0") s, stopped)"
}

# -- all-in-one: HTTP, gRPC, key, uid, read-only root, HEALTHCHECK, SIGTERM -------------------------------------
health_status() {  # the HEALTHCHECK state; podman without systemd runs no timer, so run the check once ourselves
    if [ "$ENGINE" = podman ]; then podman healthcheck run "$1" >/dev/null 2>&1 && echo healthy || echo unhealthy
    else E inspect -f '{{.State.Health.Status}}' "$1"; fi
}

all_in_one() {
    local c=$PREFIX-all-in-one key t0 ready code out uid pids stop_s exit_code alive=0 p
    key=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    E rm -f "$c" >/dev/null 2>&1
    CLEANUP+=("$ENGINE rm -f $c")
    t0=$(now)
    # --read-only with tmpfs where the Kubernetes manifests mount emptyDirs (/tmp, the home directory), writable by
    # user 10001 as an emptyDir with fsGroup is (podman ignores a tmpfs mode there; its U option chowns instead)
    if ! E run -d --name "$c" --read-only --tmpfs /tmp:rw,mode=1777 --tmpfs "/home/braintumor:$HOME_TMPFS" \
            --shm-size 1g -e BRAINTUMOR_API_KEY="$key" \
            -p "127.0.0.1:$HTTP_PORT:3000" -p "127.0.0.1:$GRPC_PORT:50051" "braintumor:$VERSION" \
            >/dev/null 2>"$WORK/run-all-in-one.err"; then
        fail "all-in-one: the container did not start: $(tail -1 "$WORK/run-all-in-one.err")"; return 1
    fi
    if ! wait_http "$HTTP_PORT" /readyz 240 "$c"; then
        fail "all-in-one not ready in 240 s (state $(E inspect -f '{{.State.Status}} exit {{.State.ExitCode}}' "$c"))"
        E logs "$c" 2>&1 | tail -25; return 1
    fi
    ready=$(since "$t0")
    ok "all-in-one ready in $ready s (run to /readyz 200)"
    measure "all-in-one ready: $ready s from \`run\` to /readyz"

    out=$(client label --url "127.0.0.1:$HTTP_PORT" --protocol http --key "$key" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] && ok "HTTP /analyze with the key: $out (host: $REFERENCE)" \
        || fail "HTTP /analyze with the key: $out (host: ${REFERENCE:-none})"
    out=$(client label --url "127.0.0.1:$GRPC_PORT" --protocol grpc --key "$key" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] && ok "gRPC Analyze with the key: $out (host: $REFERENCE)" \
        || fail "gRPC Analyze with the key: $out (host: ${REFERENCE:-none})"
    code=$(client status --url "127.0.0.1:$HTTP_PORT" "$IMAGE" 2>&1)
    [ "${code%% *}" = 401 ] && ok "HTTP /analyze without a key: 401" || fail "HTTP /analyze without a key: $code"
    code=$(client status --url "127.0.0.1:$HTTP_PORT" --key wrong-key "$IMAGE" 2>&1)
    [ "${code%% *}" = 401 ] && ok "HTTP /analyze with a wrong key: 401" || fail "HTTP /analyze with a wrong key: $code"
    out=$(client label --url "127.0.0.1:$GRPC_PORT" --protocol grpc "$IMAGE" 2>&1)
    [[ "$out" == AuthenticationError* ]] && ok "gRPC Analyze without a key: ${out%%:*}" \
        || fail "gRPC Analyze without a key: $out"

    uid=$(E exec "$c" sh -c 'id -u; awk "/^Uid:/ {print \$2}" /proc/1/status' | tr '\n' ' ')
    [ "$uid" = "10001 10001 " ] && ok "runs as uid 10001 (exec and PID 1)" || fail "uid: $uid"
    if [ "$(E inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$c")" = true ] \
            && ! E exec "$c" sh -c 'touch /opt/venv/x || touch /home/x' 2>/dev/null \
            && E exec "$c" sh -c 'touch /tmp/x && touch /home/braintumor/x'; then
        ok "read-only root file system (writes refused outside /tmp and /home/braintumor, the emptyDir mounts)"
    else
        fail "read-only root: a write outside the tmpfs mounts succeeded, or one inside failed"
    fi
    code=$(health_status "$c")
    [ "$code" = healthy ] && ok "HEALTHCHECK: $code" || fail "HEALTHCHECK: $code"

    # every process of the container, by host PID: none may outlive it
    pids=$(E top "$c" hpid 2>/dev/null | tail -n +2 | tr -s ' \n' ' ')
    [ "$ENGINE" = docker ] && pids=$(docker top "$c" -o pid | tail -n +2 | tr -s ' \n' ' ')
    t0=$(now)
    E kill --signal TERM "$c" >/dev/null
    exit_code=$(timeout 30 "$ENGINE" wait "$c" 2>/dev/null | tail -1)
    stop_s=$(since "$t0")
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    measure "all-in-one SIGTERM to exit: $stop_s s (exit code ${exit_code:-none})"
    if awk -v s="$stop_s" 'BEGIN { exit !(s < 10) }' && [ "$exit_code" = 0 ] && [ "$alive" = 0 ]; then
        ok "SIGTERM: exited 0 in $stop_s s, none of its $(wc -w <<<"$pids") processes left"
    else
        fail "SIGTERM: exit code ${exit_code:-none} after $stop_s s, $alive of $(wc -w <<<"$pids") processes left"
        E logs "$c" 2>&1 | tail -15
    fi
}

# -- compose: triton-cpu + gateway + grpc as separate containers -------------------------------------------------
COMPOSE=()
find_compose() {
    if [ "$ENGINE" = docker ] && docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
    elif [ "$ENGINE" = docker ] && command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
    elif [ "$ENGINE" = podman ] && command -v podman-compose >/dev/null; then COMPOSE=(podman-compose)
    elif [ "$ENGINE" = podman ] && [ -x "$(dirname "$PY")/podman-compose" ]; then COMPOSE=("$(dirname "$PY")/podman-compose")
    else return 1; fi
}

service_container() {  # the container of compose service $1 in project $PREFIX
    E ps -a --filter "label=com.docker.compose.project=$PREFIX" --filter "label=com.docker.compose.service=$1" \
        --format '{{.Names}}' | head -1
}

compose_stack() {
    if ! find_compose; then
        skip "compose: neither docker compose nor podman-compose is installed (pip install podman-compose)"; return 0
    fi
    local t0 ready out triton code deadline recovered gw
    # the published ports moved into this script's range, on loopback only
    export BRAINTUMOR_TRITON_KEY BRAINTUMOR_API_KEY PUBLISH_ADDRESS=127.0.0.1 PUBLISH_GATEWAY=$((HTTP_PORT + 2)) \
        PUBLISH_GRPC=$((GRPC_PORT + 2)) PUBLISH_GRPC_METRICS=$((GRPC_PORT + 3)) PUBLISH_TRITON_HTTP=$((TRITON_PORT + 0)) \
        PUBLISH_TRITON_GRPC=$((TRITON_PORT + 1)) PUBLISH_TRITON_METRICS=$((TRITON_PORT + 2))
    BRAINTUMOR_TRITON_KEY=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    BRAINTUMOR_API_KEY=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    local dc=("${COMPOSE[@]}" -p "$PREFIX" -f "$DEPLOY/docker-compose.yml")
    "${dc[@]}" down >/dev/null 2>&1
    CLEANUP+=("$(printf '%q ' "${dc[@]}") down")
    t0=$(now)
    # the core services by name: `proxy` is nginx:1.27-alpine and the monitoring profile other registries' images
    if ! "${dc[@]}" up -d triton gateway grpc >"$WORK/compose-up.log" 2>&1; then
        fail "compose up: $(grep -iE 'error' "$WORK/compose-up.log" | tail -3 | tr '\n' ' ')"; return 1
    fi
    if ! wait_http "$PUBLISH_GATEWAY" /readyz 300; then
        fail "compose: the gateway was not ready in 300 s"
        for s in triton gateway grpc; do say "--- $s"; E logs "$(service_container $s)" 2>&1 | tail -8; done
        return 1
    fi
    ready=$(since "$t0")
    ok "compose up triton gateway grpc (${COMPOSE[*]}): gateway /readyz 200 after $ready s"
    measure "compose (triton-cpu + gateway + grpc) ready: $ready s from \`up\` to the gateway's /readyz"
    triton=$(service_container triton); gw=$(service_container gateway)
    # the answer has to come from the other container: the gateway's own runs no tritonserver
    if E top "$gw" args 2>/dev/null | grep -q '[t]ritonserver'; then fail "compose: the gateway container runs a tritonserver"
    else ok "compose: the gateway container runs no tritonserver; it calls $(E exec "$gw" printenv BRAINTUMOR_TRITON_URL)"; fi
    out=$(client label --url "127.0.0.1:$PUBLISH_GATEWAY" --protocol http --key "$BRAINTUMOR_API_KEY" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] \
        && ok "compose: /analyze through the gateway container -> Triton container: $out (host: $REFERENCE)" \
        || fail "compose: /analyze through the gateway container: $out (host: ${REFERENCE:-none})"
    out=$(client label --url "127.0.0.1:$PUBLISH_GRPC" --protocol grpc --key "$BRAINTUMOR_API_KEY" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] \
        && ok "compose: gRPC Analyze through the grpc container: $out (host: $REFERENCE)" \
        || fail "compose: gRPC Analyze through the grpc container: $out (host: ${REFERENCE:-none})"
    code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$PUBLISH_TRITON_HTTP/v2/models/brain_tumor/config")
    [ "$code" != 200 ] && ok "compose: Triton's model config without the Triton key: $code" \
        || fail "compose: Triton answers its model config without the key"

    # Triton stopped: the gateway says 503 with Retry-After; started again: it answers again
    E stop -t 10 "$triton" >/dev/null 2>&1
    code=$(client status --url "127.0.0.1:$PUBLISH_GATEWAY" --key "$BRAINTUMOR_API_KEY" "$IMAGE" 2>&1)
    [ "${code%% *}" = 503 ] && [ "${code##* }" != - ] \
        && ok "compose: Triton stopped -> /analyze 503, Retry-After ${code##* }" \
        || fail "compose: Triton stopped -> /analyze gave '$code' (want 503 with Retry-After)"
    t0=$(now)
    E start "$triton" >/dev/null 2>&1
    deadline=$(($(date +%s) + 180)); recovered=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        out=$(client label --url "127.0.0.1:$PUBLISH_GATEWAY" --protocol http --key "$BRAINTUMOR_API_KEY" "$IMAGE" 2>&1)
        [ "${out%% *}" = "$REFERENCE" ] && { recovered=$(since "$t0"); break; }
        sleep 1
    done
    [ -n "$recovered" ] && ok "compose: Triton started again -> /analyze answers ($out) after $recovered s" \
        || fail "compose: the gateway did not recover within 180 s of Triton's start: $out"
    [ -n "$recovered" ] && measure "compose: /analyze answered again $recovered s after \`start\` of the Triton container"
    "${dc[@]}" down >/dev/null 2>&1
}

# -- Kubernetes: schemas, then the base manifests as pods (podman kube play) -------------------------------------
K8S_VERSIONS=(1.30.0 1.37.0)
kustomize_render() {  # kustomize_render DIR OUT
    if command -v kubectl >/dev/null; then kubectl kustomize "$1" >"$2"
    elif command -v kustomize >/dev/null; then kustomize build "$1" >"$2"
    else return 2; fi
}

pod_ip() { E inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1" 2>/dev/null; }

wait_url() {  # wait_url URL TIMEOUT
    local deadline=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        [ "$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$1" 2>/dev/null)" = 200 ] && return 0
        sleep 1
    done
    return 1
}

k8s_manifests() {
    local validate v overlay rc
    validate="$(dirname "$PY")/kubernetes-validate"
    [ -x "$validate" ] || validate=$(command -v kubernetes-validate)
    for overlay in base overlays/gpu; do
        kustomize_render "$DEPLOY/k8s/$overlay" "$WORK/k8s-${overlay##*/}.yaml"; rc=$?
        [ $rc = 2 ] && { skip "k8s: neither kubectl nor kustomize is installed to render $overlay"; return 0; }
        [ $rc != 0 ] && { fail "k8s: kustomize cannot render $overlay"; continue; }
        if [ -z "$validate" ]; then skip "k8s: kubernetes-validate is not installed (pip install kubernetes-validate)"
            continue; fi
        for v in "${K8S_VERSIONS[@]}"; do
            if "$validate" --strict --quiet -k "$v" "$WORK/k8s-${overlay##*/}.yaml" >"$WORK/validate.log" 2>&1; then
                ok "k8s: $overlay rendered ($(grep -c '^kind:' "$WORK/k8s-${overlay##*/}.yaml") objects) is valid for Kubernetes $v (strict)"
            else
                fail "k8s: $overlay against Kubernetes $v: $(head -3 "$WORK/validate.log" | tr '\n' ' ')"
            fi
        done
    done
}

k8s_pods() {
    [ "$ENGINE" = podman ] || { skip "k8s pods: podman kube play needs podman"; return 0; }
    [ -f "$WORK/k8s-base.yaml" ] || { skip "k8s pods: no rendered base manifests"; return 0; }
    local net=$PREFIX-k8s tkey akey s tip gip rip t0 ready out code vols="$WORK/k8s-volumes"
    for s in braintumor-triton-key braintumor-api-key; do
        if podman secret inspect "$s" >/dev/null 2>&1; then
            fail "k8s pods: a podman secret $s exists already; remove it (podman secret rm $s) to run this"; return 1
        fi
    done
    tkey=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n'); akey=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    # kube play reads a secretKeyRef from a podman secret holding {"key": base64(value)}
    printf '{"key": "%s"}' "$(printf %s "$tkey" | base64 -w0)" | podman secret create braintumor-triton-key - >/dev/null
    printf '{"api-key": "%s"}' "$(printf %s "$akey" | base64 -w0)" | podman secret create braintumor-api-key - >/dev/null
    CLEANUP+=("podman secret rm braintumor-triton-key braintumor-api-key")
    podman network exists "$net" || podman network create "$net" >/dev/null   # with DNS, unlike the default one
    CLEANUP+=("podman network rm -f $net")
    "$PY" "$DEPLOY/kube_play.py" "$WORK/k8s-base.yaml" --only braintumor-triton --volumes "$vols" \
        >"$WORK/play-triton.yaml" 2>"$WORK/kube-play.txt" || { fail "k8s pods: $(cat "$WORK/kube-play.txt")"; return 1; }
    podman kube play --down "$WORK/play-triton.yaml" >/dev/null 2>&1
    CLEANUP+=("podman kube play --down $WORK/play-triton.yaml")
    t0=$(now)
    podman kube play --network "$net" "$WORK/play-triton.yaml" >"$WORK/play.log" 2>&1 \
        || { fail "k8s pods: kube play (Triton): $(grep -i error "$WORK/play.log" | tail -2)"; return 1; }
    tip=$(pod_ip braintumor-triton-pod-0-triton)
    wait_url "http://$tip:8000/v2/health/ready" 240 \
        || { fail "k8s pods: the Triton pod ($tip) was not ready in 240 s"; podman logs braintumor-triton-pod-0-triton 2>&1 | tail -8; return 1; }
    # no Service DNS here: the ConfigMap's braintumor-triton is the Triton pod's address, through hostAliases
    "$PY" "$DEPLOY/kube_play.py" "$WORK/k8s-base.yaml" --only braintumor-gateway --only braintumor-grpc \
        --volumes "$vols" --host-alias "braintumor-triton=$tip" >"$WORK/play-front.yaml" 2>/dev/null
    podman kube play --down "$WORK/play-front.yaml" >/dev/null 2>&1
    CLEANUP+=("podman kube play --down $WORK/play-front.yaml")
    podman kube play --network "$net" "$WORK/play-front.yaml" >"$WORK/play.log" 2>&1 \
        || { fail "k8s pods: kube play (gateway, gRPC): $(grep -i error "$WORK/play.log" | tail -2)"; return 1; }
    gip=$(pod_ip braintumor-gateway-pod-0-gateway); rip=$(pod_ip braintumor-grpc-pod-0-grpc)
    wait_url "http://$gip:3000/readyz" 240 \
        || { fail "k8s pods: the gateway pod ($gip) was not ready in 240 s"; podman logs braintumor-gateway-pod-0-gateway 2>&1 | tail -8; return 1; }
    ready=$(since "$t0")
    ok "k8s pods: Deployments triton, gateway, grpc of base played; gateway /readyz 200 after $ready s ($(cat "$WORK/kube-play.txt"))"
    measure "k8s base as pods (podman kube play): gateway ready $ready s after the Triton pod was played"
    out=$(client label --url "$gip:3000" --protocol http --key "$akey" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] \
        && ok "k8s pods: /analyze through the gateway pod -> Triton pod: $out (host: $REFERENCE)" \
        || fail "k8s pods: /analyze through the gateway pod: $out (host: ${REFERENCE:-none})"
    out=$(client label --url "$rip:50051" --protocol grpc --key "$akey" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] \
        && ok "k8s pods: gRPC Analyze through the grpc pod: $out (host: $REFERENCE)" \
        || fail "k8s pods: gRPC Analyze through the grpc pod: $out (host: ${REFERENCE:-none})"
    code=$(client status --url "$gip:3000" "$IMAGE" 2>&1)
    [ "${code%% *}" = 401 ] && ok "k8s pods: /analyze without the Secret's API key: 401" \
        || fail "k8s pods: /analyze without a key: $code"
    out=""
    for s in braintumor-gateway-pod-0-gateway braintumor-grpc-pod-0-grpc; do
        out+="$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$s") "
    done
    [ "$out" = "true 10001:10001 true 10001:10001 " ] && ok "k8s pods: gateway and grpc run as 10001 with a read-only root" \
        || fail "k8s pods: read-only root and user of gateway, grpc: $out"
    podman kube play --down "$WORK/play-front.yaml" >/dev/null 2>&1
    podman kube play --down "$WORK/play-triton.yaml" >/dev/null 2>&1
}

# -- the BentoML way: bentofile.yaml -> Bento -> image (bentoml containerize), run beside triton-cpu -------------
bento() {
    local bentoml ctx="$WORK/bento-ctx" net=$PREFIX-bento t0 size tkey akey out ready
    bentoml="$(dirname "$PY")/bentoml"
    [ -x "$bentoml" ] || bentoml=$(command -v bentoml)
    [ -n "$bentoml" ] || { skip "bento: bentoml is not installed (the serve extra)"; return 0; }
    export BENTOML_HOME="$WORK/bentoml"  # the Bento store of this run only
    # the build context: the bentofile, the braintumor wheel and the serve extra's requirements; nothing else
    mkdir -p "$ctx/serving/deploy" "$ctx/dist"
    cp "$DEPLOY/bentofile.yaml" "$ctx/serving/deploy/"
    "$PY" "$DEPLOY/serve_requirements.py" >"$ctx/dist/requirements-serve.txt"
    t0=$(now)
    if ! "$PY" -m pip wheel -q --no-deps -w "$ctx/dist" "$ROOT" >"$WORK/bento.log" 2>&1 \
            || ! (cd "$ctx" && "$bentoml" build -f serving/deploy/bentofile.yaml .) >>"$WORK/bento.log" 2>&1; then
        fail "bento: bentoml build: $(grep -iE 'error' "$WORK/bento.log" | tail -2 | tr '\n' ' ')"; return 1
    fi
    ok "bento: bentoml build made $(grep -o 'Bento(tag="[^"]*")' "$WORK/bento.log" | tail -1) in $(since "$t0") s"
    local opts=(--opt network=host)
    [ "$ENGINE" = podman ] && opts+=(--opt format=docker)
    t0=$(now)
    if ! "$bentoml" containerize braintumor-gateway:latest --backend "$ENGINE" "${opts[@]}" \
            -t "braintumor-bento:$VERSION" >"$WORK/containerize.log" 2>&1; then
        fail "bento: bentoml containerize: $(grep -iE 'error' "$WORK/containerize.log" | tail -2 | tr '\n' ' ')"; return 1
    fi
    size=$(image_size "braintumor-bento:$VERSION")
    ok "bento: bentoml containerize --backend $ENGINE -> braintumor-bento:$VERSION in $(since "$t0") s, $(mb "$size")"
    measure "image braintumor-bento:$VERSION: $(mb "$size") (bentoml containerize, $(since "$t0") s)"
    # run it as the gateway in front of the triton-cpu image
    tkey=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n'); akey=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    E rm -f "$PREFIX-bento" "$PREFIX-bento-triton" >/dev/null 2>&1
    E network exists "$net" 2>/dev/null || E network create "$net" >/dev/null
    CLEANUP+=("$ENGINE network rm -f $net" "$ENGINE rm -f $PREFIX-bento-triton" "$ENGINE rm -f $PREFIX-bento")
    E run -d --name "$PREFIX-bento-triton" --network "$net" --network-alias triton --shm-size 1g \
        -e BRAINTUMOR_TRITON_KEY="$tkey" "braintumor-triton-cpu:$VERSION" >/dev/null 2>"$WORK/run.err"
    t0=$(now)
    E run -d --name "$PREFIX-bento" --network "$net" -e BRAINTUMOR_TRITON_KEY="$tkey" -e BRAINTUMOR_API_KEY="$akey" \
        -p "127.0.0.1:$((HTTP_PORT + 4)):3000" "braintumor-bento:$VERSION" >/dev/null 2>>"$WORK/run.err"
    if ! wait_http $((HTTP_PORT + 4)) /readyz 240 "$PREFIX-bento"; then
        fail "bento: the Bento's container was not ready in 240 s"; E logs "$PREFIX-bento" 2>&1 | tail -10; return 1
    fi
    ready=$(since "$t0")
    out=$(client label --url "127.0.0.1:$((HTTP_PORT + 4))" --protocol http --key "$akey" "$IMAGE" 2>&1)
    [ -n "$REFERENCE" ] && [ "${out%% *}" = "$REFERENCE" ] \
        && ok "bento: /analyze through the Bento's container -> triton-cpu: $out (host: $REFERENCE), ready in $ready s" \
        || fail "bento: /analyze through the Bento's container: $out (host: ${REFERENCE:-none})"
    out=$(client status --url "127.0.0.1:$((HTTP_PORT + 4))" "$IMAGE" 2>&1)
    [ "${out%% *}" = 401 ] && ok "bento: /analyze without a key: 401" || fail "bento: /analyze without a key: $out"
    E rm -f "$PREFIX-bento" "$PREFIX-bento-triton" >/dev/null 2>&1
}

# -- main ------------------------------------------------------------------------------------------------------
T_START=$(now)
if want images || want all-in-one || want compose || want k8s || want bento; then
    prepare_base
    fix_podman
fi
if want images; then
    build gateway "braintumor-gateway:$VERSION" || exit 1
    build all-in-one "braintumor:$VERSION" || exit 1
    build triton-cpu "braintumor-triton-cpu:$VERSION" || exit 1
fi
if want all-in-one || want compose || want k8s || want bento; then host_reference; fi
if want all-in-one; then all_in_one; fi
if want compose; then compose_stack; fi
if want k8s; then k8s_manifests; k8s_pods; fi
if want bento; then bento; fi

say ""
say "measured ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, engine $ENGINE):"
for m in "${MEASURED[@]}"; do say "  $m"; done
say "  whole run: $(since "$T_START") s"
[ "$FAILED" = 0 ] && say "all checks passed" || say "some checks FAILED"
exit "$FAILED"
