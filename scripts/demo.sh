#!/usr/bin/env bash
# The main job on embedded defaults: two coderd-sim replicas on the local Postgres, a chatcache
# sidecar in front of each, and chatload driving chats through the sidecars with its no-loss
# check. Everything runs on loopback and stops when the script ends.
#
# Knobs (environment): CHATS_USERS (4), CHATS_PER_USER (5), TURNS (5), SUBSCRIBERS (3),
# PGURL (postgres://postgres@127.0.0.1:5432), DEMO_DB (chatcache_demo; dropped and recreated),
# KEEP=1 keeps the demo database. Binaries come from $CARGO_TARGET_DIR (default target/).
set -euo pipefail
cd "$(dirname "$0")/.."

PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
DB=${DEMO_DB:-chatcache_demo}
[[ $DB =~ ^[a-z_][a-z0-9_]*$ ]] || { echo "demo: DEMO_DB must be a plain lower-case name" >&2; exit 2; }
LOGS=$(mktemp -d /tmp/chatcache-demo.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -z "${KEEP:-}" ]]; then
        psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    echo "demo: logs in $LOGS"
}
trap cleanup EXIT

if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    echo "demo: starting the local Postgres"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi

for port in 3000 3001 8080 8081 9090 9091; do
    if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "demo: port $port is already in use; stop what listens there first" >&2
        exit 2
    fi
done

echo "demo: building (release; the first build takes a few minutes)"
cargo build --release -p chatcache -p coderd-sim --bins -q
BIN=${CARGO_TARGET_DIR:-target}/release

psql -q "$PGURL/postgres" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
psql -q "$PGURL/postgres" -c "CREATE DATABASE $DB" >/dev/null
URL="$PGURL/$DB"
$BIN/coderd-sim migrate --database-url "$URL"
$BIN/coderd-sim seed --database-url "$URL" --users "${CHATS_USERS:-4}" \
    --chats-per-user "${CHATS_PER_USER:-5}" --out "$LOGS/seed.json"

wait_port() {
    for _ in $(seq 1 100); do
        (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "demo: port $1 never opened; see $LOGS" >&2
    exit 1
}

# Two coderd replicas with coderd's own #23218 cache on, relaying parts to each other.
PEERS="a=127.0.0.1:3000,b=127.0.0.1:3001"
for r in a:3000 b:3001; do
    name=${r%%:*}; port=${r##*:}
    $BIN/coderd-sim serve --listen "127.0.0.1:$port" --database-url "$URL" --replica "$name" \
        --stream-cache on --peers "$PEERS" > "$LOGS/sim-$name.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
done

# One chatcache per replica, on embedded defaults plus the four documented overrides.
for s in 8080:9090:3000 8081:9091:3001; do
    IFS=: read -r port admin up <<< "$s"
    CHATCACHE_LISTEN_ADDR="127.0.0.1:$port" CHATCACHE_ADMIN_ADDR="127.0.0.1:$admin" \
    CHATCACHE_UPSTREAM_URL="http://127.0.0.1:$up" CHATCACHE_DATABASE_URL="$URL" \
        $BIN/chatcache > "$LOGS/chatcache-$port.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
done
for admin in 9090 9091; do
    for _ in $(seq 1 100); do
        curl -fs "http://127.0.0.1:$admin/ready" >/dev/null && break
        sleep 0.1
    done
done

echo "demo: chatload through the sidecars"
status=0
$BIN/chatload run --targets http://127.0.0.1:8080,http://127.0.0.1:8081 \
    --seed-file "$LOGS/seed.json" --turns "${TURNS:-5}" \
    --subscribers-per-chat "${SUBSCRIBERS:-3}" --reconnect-each-turn --edit-every 3 \
    --scrape http://127.0.0.1:9090/metrics,http://127.0.0.1:9091/metrics \
    --database-url "$URL" --json "$LOGS/chatload.json" || status=$?

echo
if [[ $status -eq 0 ]]; then
    echo "demo: PASS - every subscriber holds exactly the history Postgres holds (0 lost," \
        "0 duplicated, 0 out of order)"
else
    echo "demo: FAIL - chatload exit $status; see the table above and $LOGS"
fi
echo
echo "chatcache metrics (both sidecars): catch-ups served from memory (hit), Postgres reads by"
echo "reason, hole repairs (messages coderd's stream skipped), subscriptions passed to coderd:"
for admin in 9090 9091; do
    curl -fs "http://127.0.0.1:$admin/metrics" \
        | grep -E '^chatcache_(catchup_total|db_reads_total|fail_open_total|hole_repairs_total|full_refreshes_total|listen_reconnects_total)' \
        | sed "s/^/  :$admin /"
done
exit $status
