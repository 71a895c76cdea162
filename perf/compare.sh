#!/usr/bin/env bash
# perf/compare.sh: ela-fast beside the raw link and the VPNs a user would pick
# instead (tinc 1.0, wireguard-go, boringtun, OpenVPN), all measured the same
# way in one run: iperf3 TCP (1 and 4 streams) and sockperf UDP ping-pong
# (64 B, round trip) over the overlay, ping, and the VPN processes' CPU.
# Prints a Markdown table and saves it with the raw logs under perf/results/.
#
# Needs root. Every system runs between fresh network namespaces that this
# script creates (prefix cmp<PID>), joined only to each other by veth pairs;
# nothing is configured in the root namespace and no outside address is used.
# Namespaces and the processes this script started are removed at exit.
#
# Env knobs (see perf/README.md, "Peers side by side"):
#   DURATION=10      iperf3 seconds per test      QUICK=1  defaults of 3 s and 3 s
#   LAT_SECS=5       sockperf seconds             PINGS=20 pings (0.05 s apart)
#   ROUNDS=1         rounds over all systems; the table shows medians
#   ONLY=a,b         systems to run (ids below)   SKIP=a,b systems to leave out
#   ELA_BIN=path     use this ela-fast instead of `cargo build --release`
#   ELA_BASE_BIN=path  also run an older ela-fast build (e.g. the group-key
#                    build before pairwise sessions) as rows ela-base-bf-1 and
#                    ela-base-relay, beside ela-bf-1 and ela-relay, in the
#                    same run (both in group mode: --key-file only)
#   ELA_ONE_CORE="0 1"  --cores of node A and node B in the one-core rows
#   ELA_TWO_CORES="0-1 0-1"  the same for the two-core rows
#   NO_OFFLOAD_ROW=0 leave out the --no-offload row
#   RELAY_CIPHER=blowfish RELAY_CORES= RELAY_ROLE=auto  the CN-CN-EN row
#                    (RELAY_CORES empty: one unpinned dataplane thread/node)
#   PEERS_ROOT=dir   where `cargo install boringtun-cli --root` goes
#                    (default ~/.cache/ela-fast-peers)
#   NO_INSTALL=1     never run apt-get / cargo install
#   RESULTS_DIR=dir  default perf/results
# System ids: raw ela-bf-1 ela-bf-2 ela-cc-1 ela-cc-2 ela-bf-1-nooff
#             ela-bf-1-busy (opt-in --busy-poll-us $BUSY_POLL_US, default 200)
#             ela-relay ela-en-up tinc wireguard-go boringtun openvpn-bf openvpn-gcm
# Every row's note gives the iperf3 sender's TCP retransmits; ela-relay
# (CN→CN→EN) and ela-en-up (EN→CN→CN) are the edge-link legs.
set -euo pipefail

KNOBS=""   # the knobs set by the caller, for the "command" line of the table
for v in QUICK DURATION LAT_SECS PINGS ROUNDS ONLY SKIP ELA_BIN ELA_BASE_BIN ELA_ONE_CORE ELA_TWO_CORES NO_OFFLOAD_ROW BUSY_POLL_US \
         RELAY_CIPHER RELAY_CORES RELAY_ROLE; do
    case ${!v:-} in
        "") ;;
        *" "*) KNOBS="$KNOBS $v=\"${!v}\"" ;;
        *) KNOBS="$KNOBS $v=${!v}" ;;
    esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

if [ "${QUICK:-0}" = 1 ]; then DURATION=${DURATION:-3}; LAT_SECS=${LAT_SECS:-3}; fi
DURATION=${DURATION:-10}
LAT_SECS=${LAT_SECS:-5}
PINGS=${PINGS:-20}
ROUNDS=${ROUNDS:-1}
ROUNDS_TAG=""; [ "$ROUNDS" = 1 ] || ROUNDS_TAG=1
ONLY=${ONLY:-}
SKIP=${SKIP:-}
ELA_ONE_CORE=${ELA_ONE_CORE:-"0 1"}
ELA_TWO_CORES=${ELA_TWO_CORES:-"0-1 0-1"}
NO_OFFLOAD_ROW=${NO_OFFLOAD_ROW:-1}
PEERS_ROOT=${PEERS_ROOT:-${HOME:-/root}/.cache/ela-fast-peers}
NO_INSTALL=${NO_INSTALL:-0}
RESULTS_DIR=${RESULTS_DIR:-$REPO/perf/results}

ALL_SYSTEMS="raw ela-bf-1 ela-bf-2 ela-cc-1 ela-cc-2 ela-bf-1-nooff ela-bf-1-busy ela-relay ela-en-up ela-base-bf-1 ela-base-relay ela-base-en-up tinc wireguard-go boringtun openvpn-bf openvpn-gcm"

PFX=cmp$$                      # namespace / interface prefix, unique per run
UA=10.9.0.1 UB=10.9.0.2 UC=10.9.0.3   # underlay (veth) addresses
OA=10.0.0.1 OB=10.0.0.2 OC=10.0.0.3   # overlay addresses
SOCKPERF_PORT=11111
IPERF_PORT=5201

log() { printf '%s [compare] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TUN devices)"

STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$RESULTS_DIR"
[ -e "$RESULTS_DIR/.gitignore" ] || printf '*\n' > "$RESULTS_DIR/.gitignore"
LOGS=$RESULTS_DIR/compare-$STAMP
OUT_MD=$RESULTS_DIR/compare-$STAMP.md
mkdir -p "$LOGS"
W=$(mktemp -d /tmp/ela-compare.XXXXXX)   # keys and configs; removed at exit
: > "$W/pids"        # "pid starttime what" of every process started
: > "$W/netns"       # namespaces created
: > "$W/results.tsv"

# ---------------------------------------------------------------- cleanup

proc_start() { # start time of a pid (field 22 of /proc/PID/stat), empty if gone
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    s=${s##*) }
    set -- $s
    [ "$1" = Z ] && return 0
    echo "${20}"
}

alive_as() { [ -n "$2" ] && [ "$(proc_start "$1")" = "$2" ]; }

# Stops every process this script started (checking the start time, so a
# recycled pid is never signalled), then deletes the namespaces it made.
teardown() {
    local pid st what left=0
    while read -r pid st what; do
        alive_as "$pid" "$st" && kill -TERM "$pid" 2>/dev/null || true
    done < "$W/pids"
    for _ in $(seq 1 50); do
        left=0
        while read -r pid st what; do
            alive_as "$pid" "$st" && left=1
        done < "$W/pids"
        [ $left = 0 ] && break
        sleep 0.1
    done
    while read -r pid st what; do
        if alive_as "$pid" "$st"; then
            log "killing $what (pid $pid) with SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done < "$W/pids"
    : > "$W/pids"
    local ns
    while read -r ns; do
        [ -n "$ns" ] || continue
        if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then
            log "warning: processes left in $ns: $(ip netns pids "$ns" | tr '\n' ' ')"
        fi
        ip netns del "$ns" 2>/dev/null || true
    done < "$W/netns"
    : > "$W/netns"
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    teardown
    rm -rf "$W"
    exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- installs

APT_UPDATED=0
apt_install() { # apt_install PKG...: 0 if installed
    [ "$NO_INSTALL" = 1 ] && return 1
    command -v apt-get >/dev/null || return 1
    log "apt-get install $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >> "$LOGS/install.log" 2>&1; then
        if [ $APT_UPDATED = 0 ]; then
            APT_UPDATED=1
            apt-get update -q >> "$LOGS/install.log" 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >> "$LOGS/install.log" 2>&1 || return 1
        else
            return 1
        fi
    fi
}

need() { # need CMD PKG: the command, installing PKG if it is missing
    command -v "$1" >/dev/null && return 0
    apt_install "$2" || true
    command -v "$1" >/dev/null
}

BORINGTUN=""
find_boringtun() {
    BORINGTUN=$(command -v boringtun-cli || true)
    [ -n "$BORINGTUN" ] && return 0
    if [ -x "$PEERS_ROOT/bin/boringtun-cli" ]; then BORINGTUN=$PEERS_ROOT/bin/boringtun-cli; return 0; fi
    [ "$NO_INSTALL" = 1 ] && return 1
    command -v cargo >/dev/null || return 1
    log "cargo install boringtun-cli --root $PEERS_ROOT (a few minutes)"
    CARGO_TARGET_DIR=$PEERS_ROOT/build cargo install --locked boringtun-cli --root "$PEERS_ROOT" \
        >> "$LOGS/install.log" 2>&1 \
        || CARGO_TARGET_DIR=$PEERS_ROOT/build cargo install boringtun-cli --root "$PEERS_ROOT" \
        >> "$LOGS/install.log" 2>&1 || return 1
    [ -x "$PEERS_ROOT/bin/boringtun-cli" ] && BORINGTUN=$PEERS_ROOT/bin/boringtun-cli
}

selected() { # selected ID: is this system to be run?
    local id=$1
    if [ -n "$ONLY" ]; then
        case ",$ONLY," in *",$id,"*) ;; *) return 1 ;; esac
    fi
    case ",$SKIP," in *",$id,"*) return 1 ;; esac
    [ "$id" = ela-bf-1-nooff ] && [ "$NO_OFFLOAD_ROW" = 0 ] && return 1
    case $id in ela-base-*) [ -n "${ELA_BASE_BIN:-}" ] || return 1 ;; esac
    return 0
}

if [ -n "$ONLY" ]; then
    for id in ${ONLY//,/ }; do
        case " $ALL_SYSTEMS " in *" $id "*) ;; *) die "unknown system '$id' in ONLY (known: $ALL_SYSTEMS)" ;; esac
    done
fi

need ip iproute2 || die "ip (iproute2) is required"
need iperf3 iperf3 || die "iperf3 is required"
need sockperf sockperf || die "sockperf is required"
need ping iputils-ping || die "ping is required"
command -v python3 >/dev/null || die "python3 is required (parses iperf3 JSON, renders the table)"

want() { for id in "$@"; do selected "$id" && return 0; done; return 1; }
if want tinc; then need tincd tinc || true; fi
if want openvpn-bf openvpn-gcm; then need openvpn openvpn || true; need openssl openssl || true; fi
if want wireguard-go boringtun; then need wg wireguard-tools || true; fi
if want wireguard-go; then need wireguard-go wireguard-go || true; fi
if want boringtun; then find_boringtun || true; fi
if want ela-relay ela-en-up ela-base-relay ela-base-en-up; then need nft nftables || true; fi
if [ -n "${ELA_BASE_BIN:-}" ]; then
    [ -x "$ELA_BASE_BIN" ] || die "ELA_BASE_BIN=$ELA_BASE_BIN is not an executable"
fi

ELA_BIN=${ELA_BIN:-}
if want ela-bf-1 ela-bf-2 ela-cc-1 ela-cc-2 ela-bf-1-nooff ela-bf-1-busy ela-relay ela-en-up; then
    if [ -z "$ELA_BIN" ]; then
        log "cargo build --release"
        cargo build --release -q || die "cargo build failed"
        ELA_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/ela-fast
        ELA_BUILT=1
    fi
    [ -x "$ELA_BIN" ] || die "ELA_BIN=$ELA_BIN is not an executable"
fi

version_of() { local v; v=$(_version_of "$@" 2>/dev/null || true); echo "${v:-?}"; }
_version_of() {
    case $1 in
        ela) "$ELA_BIN" --version 2>/dev/null | head -1 ;;
        tinc) tincd --version 2>/dev/null | head -1 | awk '{print $3}' ;;
        openvpn) openvpn --version 2>/dev/null | head -1 | awk '{print $2}' ;;
        # (never run `wireguard-go --flag` for this: it may take the flag
        # for an interface name and create it in the current namespace)
        wireguard-go) dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || echo "(version unknown)" ;;
        boringtun) "$BORINGTUN" --version 2>/dev/null | awk '{print $2}' ;;
        iperf3) iperf3 --version 2>/dev/null | head -1 | awk '{print $2}' ;;
        sockperf) sockperf --version 2>/dev/null | head -1 | sed 's/.*version //' ;;
    esac
}

# ---------------------------------------------------------------- namespaces

ns() { echo "$PFX$1"; }   # ns a -> cmp1234a

add_ns() {
    local n; n=$(ns "$1")
    ip netns add "$n"
    echo "$n" >> "$W/netns"
    ip -n "$n" link set lo up
}

# Two namespaces a, b; one veth pair (u0 in each); underlay 10.9.0.1/.2.
make_pair() {
    add_ns a; add_ns b
    ip link add u0 netns "$(ns a)" type veth peer name u0 netns "$(ns b)"
    ip -n "$(ns a)" addr add $UA/24 dev u0
    ip -n "$(ns b)" addr add $UB/24 dev u0
    ip -n "$(ns a)" link set u0 up
    ip -n "$(ns b)" link set u0 up
}

# Three namespaces a, b, c on a bridge in a fourth (s), each by its own veth
# pair; underlay 10.9.0.1/.2/.3.
make_triple() {
    add_ns s; add_ns a; add_ns b; add_ns c
    ip -n "$(ns s)" link add br0 type bridge
    ip -n "$(ns s)" link set br0 up
    local h ip
    for h in a b c; do
        case $h in a) ip=$UA ;; b) ip=$UB ;; c) ip=$UC ;; esac
        ip link add "p$h" netns "$(ns s)" type veth peer name u0 netns "$(ns $h)"
        ip -n "$(ns s)" link set "p$h" master br0
        ip -n "$(ns s)" link set "p$h" up
        ip -n "$(ns $h)" addr add "$ip/24" dev u0
        ip -n "$(ns $h)" link set u0 up
    done
}

# bg HOST WHAT LOGFILE CMD...: start CMD in namespace HOST in the background
# and record its pid (ip netns exec execs the command: same pid).
LAST_PID=""
bg() {
    local h=$1 what=$2 logf=$3; shift 3
    ip netns exec "$(ns "$h")" "$@" >> "$logf" 2>&1 < /dev/null &
    LAST_PID=$!
    local st=""
    for _ in 1 2 3 4 5; do st=$(proc_start "$LAST_PID"); [ -n "$st" ] && break; sleep 0.02; done
    echo "$LAST_PID ${st:-0} $what" >> "$W/pids"
}

# nsx HOST CMD...: run in namespace HOST (foreground)
nsx() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

wait_ping() { # wait_ping HOST DST SECS
    local h=$1 dst=$2 secs=$3 i
    for i in $(seq 1 $((secs * 4))); do
        nsx "$h" ping -c 1 -W 1 "$dst" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    return 1
}

cpu_ticks() { # sum of utime+stime (all threads) of the given pids
    local t=0 pid s
    for pid in "$@"; do
        s=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        s=${s##*) }
        set -- $s
        t=$((t + ${12} + ${13}))
    done
    echo $t
}

# ---------------------------------------------------------------- measuring

# measure ID CLIENT SERVER DST VPN_PIDS...: ping, sockperf, iperf3 -P1 / -P4
# from namespace CLIENT to DST (in SERVER); appends one result line.
measure() {
    local id=$1 cli=$2 srv=$3 dst=$4; shift 4
    local pids="$*" lf=$LOGS/$id
    bg "$srv" "sockperf server ($id)" "$lf.sockperf-server.log" sockperf server -i "$dst" -p $SOCKPERF_PORT
    bg "$srv" "iperf3 server ($id)" "$lf.iperf3-server.log" iperf3 -s -p $IPERF_PORT
    sleep 1

    local ping_ms p50 p99 t1 t4 cpu1
    ping_ms=$(nsx "$cli" ping -c "$PINGS" -i 0.05 -q "$dst" 2>&1 | tee "$lf.ping.log" \
        | sed -n 's#^rtt [^=]*= [0-9.]*/\([0-9.]*\)/.*#\1#p' || true)

    local c0 c1 w0 w1 cpul=""
    c0=$(cpu_ticks $pids); w0=$(date +%s.%N)
    timeout $((LAT_SECS + 30)) ip netns exec "$(ns "$cli")" \
        sockperf ping-pong -i "$dst" -p $SOCKPERF_PORT -m 64 -t "$LAT_SECS" --full-rtt \
        > "$lf.sockperf.log" 2>&1 || log "$id: sockperf failed (see $lf.sockperf.log)"
    c1=$(cpu_ticks $pids); w1=$(date +%s.%N)
    [ -n "$pids" ] && cpul=$(cpu_pct "$c0" "$c1" "$w0" "$w1")
    p50=$(sed -n 's/.*percentile 50\.000 = *\([0-9.]*\).*/\1/p' "$lf.sockperf.log" | head -1)
    p99=$(sed -n 's/.*percentile 99\.000 = *\([0-9.]*\).*/\1/p' "$lf.sockperf.log" | head -1)

    c0=$(cpu_ticks $pids); w0=$(date +%s.%N)
    timeout $((DURATION + 30)) ip netns exec "$(ns "$cli")" \
        iperf3 -c "$dst" -p $IPERF_PORT -t "$DURATION" -P 1 -J > "$lf.iperf3-P1.json" 2>&1 \
        || log "$id: iperf3 -P 1 failed (see $lf.iperf3-P1.json)"
    c1=$(cpu_ticks $pids); w1=$(date +%s.%N)
    t1=$(iperf_bps "$lf.iperf3-P1.json")
    cpu1=""
    [ -n "$pids" ] && cpu1=$(cpu_pct "$c0" "$c1" "$w0" "$w1")
    sleep 1
    timeout $((DURATION + 30)) ip netns exec "$(ns "$cli")" \
        iperf3 -c "$dst" -p $IPERF_PORT -t "$DURATION" -P 4 -J > "$lf.iperf3-P4.json" 2>&1 \
        || log "$id: iperf3 -P 4 failed (see $lf.iperf3-P4.json)"
    t4=$(iperf_bps "$lf.iperf3-P4.json")
    local r1 r4
    r1=$(iperf_retr "$lf.iperf3-P1.json"); r4=$(iperf_retr "$lf.iperf3-P4.json")
    NOTE="${NOTE:+$NOTE; }TCP retransmits ${r1:-?} (1 stream) ${r4:-?} (4 streams)"
    log "$id: 1 stream ${t1:-?} b/s, 4 streams ${t4:-?} b/s, sockperf RTT p50 ${p50:-?} p99 ${p99:-?} us, ping ${ping_ms:-?} ms, VPN CPU ${cpu1:-?} % (1 stream) ${cpul:-?} % (ping-pong)"
    result "$id" "$t1" "$t4" "$p50" "$p99" "$ping_ms" "$cpu1" "$cpul" ""
}

cpu_pct() { # ticks0 ticks1 wall0 wall1 -> CPU % (100 = one core)
    python3 -c "import os, sys; a = [float(x) for x in sys.argv[1:]]; print(f'{(a[1]-a[0])/os.sysconf(\"SC_CLK_TCK\")/(a[3]-a[2])*100:.0f}')" "$@"
}
iperf_retr() { # the sender's TCP retransmits over the run
    python3 - "$1" <<'PY' 2>/dev/null || true
import json, sys
try:
    print(json.load(open(sys.argv[1]))["end"]["sum_sent"]["retransmits"])
except Exception:
    pass
PY
}
iperf_bps() {
    python3 - "$1" <<'PY' 2>/dev/null || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(f'{d["end"]["sum_received"]["bits_per_second"]:.0f}')
except Exception:
    pass
PY
}

LABEL=""   # set by each system before it measures
KIND=""    # raw | ela | peer
NOTE=""    # a remark shown after the label
result() { # id tcp1 tcp4 p50 p99 ping cpu_stream cpu_pingpong note
    local note=${9:-$NOTE}
    [ -n "$9" ] && [ -n "$NOTE" ] && note="$NOTE; $9"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$1" "$KIND" "$LABEL" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$note" >> "$W/results.tsv"
}
fail() { result "$1" "" "" "" "" "" "" "" "$2"; log "$1: $2"; }
unavailable() { fail "$1" "not available: $2"; }

# ---------------------------------------------------------------- systems

sys_raw() {
    LABEL="raw veth, no VPN"; KIND=raw
    make_pair
    measure raw a b $UB
}

# ela_node HOST ADDR CORES CIPHER ROLE EXTRA [BOOTSTRAP]
ela_node() {
    local h=$1 addr=$2 cores=$3 cipher=$4 role=$5 extra=$6 boot=${7:-}
    local uip
    case $h in a) uip=$UA ;; b) uip=$UB ;; c) uip=$UC ;; esac
    local args=(--key-file "$W/ela.key" --listen "$uip:7000" --addr "$addr"
                --cipher "$cipher" --control "$W/ela-$h.sock" --role "$role")
    [ -n "$cores" ] && args+=(--cores "$cores")
    [ -n "$boot" ] && args+=(--bootstrap "$boot")
    [ -n "$extra" ] && args+=($extra)
    echo "+ ela-fast ${args[*]}" >> "$LOGS/$CUR.ela-$h.log"
    bg "$h" "ela-fast $h ($CUR)" "$LOGS/$CUR.ela-$h.log" "${EBIN:-$ELA_BIN}" "${args[@]}"
    ELA_PIDS="$ELA_PIDS $LAST_PID"
}

ela_status() { nsx "$1" "${EBIN:-$ELA_BIN}" status --control "$W/ela-$1.sock" --json 2>/dev/null; }

wait_members() { # wait_members HOST N SECS
    local h=$1 n=$2 secs=$3 i m
    for i in $(seq 1 $((secs * 4))); do
        m=$(ela_status "$h" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["members"]))' 2>/dev/null || true)
        [ "${m:-0}" -ge "$n" ] && return 0
        sleep 0.25
    done
    return 1
}

# sys_ela ID CIPHER "CORES_A CORES_B" EXTRA
sys_ela() {
    local id=$1 cipher=$2 cores=$3 extra=$4 ca cb
    read -r ca cb <<< "$cores"
    KIND=ela
    local ncores=1; [[ "$ca" == *[-,]* ]] && ncores=2
    LABEL="ela-fast $(ela_cipher_name "$cipher"), $ncores core$([ $ncores = 1 ] || echo s)/node (A --cores $ca, B --cores $cb)${extra:+ $extra}${TAG:-}"
    make_pair
    ELA_PIDS=""
    [ -e "$W/ela.key" ] || "${EBIN:-$ELA_BIN}" keygen --out "$W/ela.key" >/dev/null
    ela_node a $OA "$ca" "$cipher" core "$extra"
    wait_members a 1 10 || { fail "$id" "node A did not start (see $LOGS/$id.ela-a.log)"; return 0; }
    ela_node b $OB "$cb" "$cipher" core "$extra" "$UA:7000"
    if ! wait_members b 2 20 || ! wait_ping a $OB 20; then
        fail "$id" "overlay did not come up (see $LOGS/$id.ela-*.log)"; return 0
    fi
    ela_status a > "$LOGS/$id.status-a.json" || true
    ela_check "$LOGS/$id.status-a.json" "$cipher"
    sleep 1
    measure "$id" a b $OB $ELA_PIDS
    ela_status a > "$LOGS/$id.status-a-after.json" || true
    ela_status b > "$LOGS/$id.status-b-after.json" || true
}

# ela_check STATUS_JSON CIPHER: adds the offloads the node reports to the
# label, and a note when it reports another cipher or none (a binary that
# ignores --cipher must not be listed as if it used it).
ela_check() {
    local got
    got=$(python3 - "$1" "$2" <<'PY' 2>/dev/null || true
import json, sys
d = json.load(open(sys.argv[1]))
c = d.get("cipher")
o = d.get("offload")
off = ""
if isinstance(o, dict):
    on = [k for k, v in o.items() if v is True]
    off = "offload " + ("on" if on and len(on) == len(o) else "+".join(on) if on else "off")
note = ""
if c is None:
    note = "node does not report its cipher"
elif c != sys.argv[2]:
    note = f"node reports cipher {c}!"
print(f"{off}\t{note}")
PY
)
    local off=${got%%$'\t'*} note=${got#*$'\t'}
    [ -n "$off" ] && LABEL="$LABEL, $off"
    [ -n "$note" ] && { NOTE=$note; log "$CUR: $note"; }
    return 0
}

ela_cipher_name() { case $1 in blowfish) echo "Blowfish" ;; chacha20-poly1305) echo "ChaCha20-Poly1305" ;; *) echo "$1" ;; esac; }

# CN a (10.0.0.1) and CN b (10.0.0.2) over UDP; c (10.0.0.3) has UDP dropped
# on its underlay interface by nftables, so it joins over TCP as an edge node
# whose primary CN is b (nearest smaller address). Measured a -> c: one UDP
# hop a->b, one TCP hop b->c, both encrypted end to end.
sys_ela_relay() {
    local id=${RELAY_ID:-ela-relay} cipher=${RELAY_CIPHER:-blowfish} cores=${RELAY_CORES:-}
    KIND=ela
    local path="CN→CN→EN relay (UDP then TCP)"
    [ "${RELAY_UP:-0}" = 1 ] && path="EN→CN→CN, up the edge link (TCP then UDP)"
    LABEL="ela-fast $(ela_cipher_name "$cipher"), $path${cores:+, --cores $cores}${TAG:-}"
    command -v nft >/dev/null || { unavailable $id "nft (nftables) missing"; return 0; }
    make_triple
    nsx c nft -f - <<EOF
table inet ${PFX}_udpblock {
    chain i { type filter hook input priority 0; iifname "u0" meta l4proto udp drop; }
    chain o { type filter hook output priority 0; oifname "u0" meta l4proto udp drop; }
}
EOF
    ELA_PIDS=""
    [ -e "$W/ela.key" ] || "${EBIN:-$ELA_BIN}" keygen --out "$W/ela.key" >/dev/null
    ela_node a $OA "$cores" "$cipher" core ""
    wait_members a 1 10 || { fail $id "node A did not start"; return 0; }
    ela_node b $OB "$cores" "$cipher" core "" "$UA:7000"
    wait_members b 2 20 || { fail $id "CN b did not join"; return 0; }
    ela_node c $OC "$cores" "$cipher" "${RELAY_ROLE:-auto}" "" "$UB:7000"
    if ! wait_members a 3 30 || ! wait_ping a $OC 20; then
        fail $id "edge node did not come up (see $LOGS/$id.ela-c.log)"; return 0
    fi
    sleep 1
    ela_status c > "$LOGS/$id.status-c.json" || true
    local role primary
    role=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("role"))' "$LOGS/$id.status-c.json" 2>/dev/null || true)
    primary=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("primary"))' "$LOGS/$id.status-c.json" 2>/dev/null || true)
    log "$id: node c is role=$role primary=$primary"
    if [ "$role" != edge ]; then
        fail $id "node c became '$role', not an edge node"; return 0
    fi
    ela_check "$LOGS/$id.status-c.json" "$cipher"
    if [ "${RELAY_UP:-0}" = 1 ]; then
        # EN c → CN a: up the EN's TCP link to b, relayed to a over UDP.
        measure $id c a $OA $ELA_PIDS
    else
        measure $id a c $OC $ELA_PIDS
    fi
    local i; for i in a b c; do ela_status $i > "$LOGS/$id.status-$i-after.json" || true; done
}

sys_tinc() {
    local id=tinc
    KIND=peer
    LABEL="tinc $(version_of tinc), Blowfish-CBC + SHA1 (default), router mode, UDP"
    command -v tincd >/dev/null || { unavailable $id "tincd missing"; return 0; }
    make_pair
    local h uip oip name other
    for h in a b; do
        mkdir -p "$W/tinc-$h/hosts"
        case $h in a) oip=$OA ;; b) oip=$OB ;; esac
        { echo "Name = $h"; echo "Mode = router"; echo "AddressFamily = ipv4"
          echo "Interface = tinc0"; [ $h = a ] && echo "ConnectTo = b"; } > "$W/tinc-$h/tinc.conf"
        printf '#!/bin/sh\nip addr add %s/24 dev "$INTERFACE"\nip link set "$INTERFACE" up\n' "$oip" \
            > "$W/tinc-$h/tinc-up"
        chmod +x "$W/tinc-$h/tinc-up"
    done
    for h in a b; do
        case $h in a) uip=$UA oip=$OA ;; b) uip=$UB oip=$OB ;; esac
        # Cipher/Digest/MACLength are tinc 1.0's defaults, written out.
        printf 'Address = %s\nPort = 655\nSubnet = %s/32\nCipher = blowfish\nDigest = sha1\nMACLength = 4\nCompression = 0\n' \
            "$uip" "$oip" > "$W/tinc-$h/hosts/$h"
        tincd -c "$W/tinc-$h" -K 2048 < /dev/null >> "$LOGS/$id.keygen.log" 2>&1
    done
    cp "$W/tinc-a/hosts/a" "$W/tinc-b/hosts/a"
    cp "$W/tinc-b/hosts/b" "$W/tinc-a/hosts/b"
    local pids=""
    for h in b a; do
        bg $h "tincd $h" "$LOGS/$id.tincd-$h.log" tincd -c "$W/tinc-$h" -D -d1 --pidfile="$W/tinc-$h.pid"
        pids="$pids $LAST_PID"
    done
    wait_ping a $OB 30 || { fail $id "tunnel did not come up (see $LOGS/$id.tincd-*.log)"; return 0; }
    sleep 1
    measure $id a b $OB $pids
}

# wg_conf HOST IFACE PORT: keys, listen port, peer, address, MTU 1420
wg_conf() {
    local h=$1 ifc=$2 o peer_uip oip peer_oip
    case $h in a) o=b oip=$OA peer_oip=$OB peer_uip=$UB ;; b) o=a oip=$OB peer_oip=$OA peer_uip=$UA ;; esac
    nsx $h wg set "$ifc" listen-port 51820 private-key "$W/wg-$h.key" \
        peer "$(cat "$W/wg-$o.pub")" endpoint "$peer_uip:51820" allowed-ips "$peer_oip/32"
    nsx $h ip addr add "$oip/24" dev "$ifc"
    nsx $h ip link set "$ifc" mtu 1420 up
}

wg_keys() {
    local h
    for h in a b; do
        (umask 077; wg genkey > "$W/wg-$h.key")
        wg pubkey < "$W/wg-$h.key" > "$W/wg-$h.pub"
    done
}

wait_file() { local i; for i in $(seq 1 $(($2 * 10))); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }

# A userspace WireGuard (COMMAND... IFACE, with @SIDE@ in COMMAND replaced
# by a or b) on each side of a fresh pair,
# configured with wg over its UAPI socket, then measured. The socket lives
# in /var/run/wireguard/IFACE.sock (shared across namespaces), so each side
# gets an interface name of its own: ${PFX}<letter><side>.
wg_userspace_pair() {
    local id=$1 letter=$2; shift 2
    make_pair; wg_keys
    local h ifc pids=""
    for h in a b; do
        ifc=${PFX}$letter$h
        bg $h "$id $h" "$LOGS/$id.$h.log" "${@//@SIDE@/$h}" "$ifc"
        pids="$pids $LAST_PID"
        wait_file "/var/run/wireguard/$ifc.sock" 10 || { fail $id "$id did not start (see $LOGS/$id.$h.log)"; return 0; }
        wg_conf $h "$ifc"
    done
    wait_ping a $OB 20 || { fail $id "tunnel did not come up"; return 0; }
    sleep 1
    measure $id a b $OB $pids
}

sys_wireguard_go() {
    local id=wireguard-go
    KIND=peer
    LABEL="wireguard-go $(version_of wireguard-go), ChaCha20-Poly1305"
    command -v wireguard-go >/dev/null || { unavailable $id "wireguard-go missing"; return 0; }
    command -v wg >/dev/null || { unavailable $id "wg (wireguard-tools) missing"; return 0; }
    wg_userspace_pair $id w env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f
}

sys_boringtun() {
    local id=boringtun
    KIND=peer
    [ -n "$BORINGTUN" ] || find_boringtun || true
    LABEL="boringtun-cli $(version_of boringtun), ChaCha20-Poly1305, 4 threads (default)"
    [ -n "$BORINGTUN" ] || { unavailable $id "boringtun-cli missing (cargo install failed or NO_INSTALL=1)"; return 0; }
    command -v wg >/dev/null || { unavailable $id "wg (wireguard-tools) missing"; return 0; }
    wg_userspace_pair $id b "$BORINGTUN" --foreground --disable-drop-privileges --log "$LOGS/$id.@SIDE@.out"
}

# OpenVPN 2.6 p2p over UDP in TLS mode (static-key mode cannot use AEAD
# ciphers and is deprecated): self-signed EC certificates pinned with
# --peer-fingerprint, data channel cipher forced with --data-ciphers.
sys_openvpn() {
    local id=$1 cipher=$2
    KIND=peer
    local extra=()
    case $cipher in
        BF-CBC) LABEL="OpenVPN $(version_of openvpn) UDP, BF-CBC + HMAC-SHA1"
                extra=(--providers legacy default --auth SHA1) ;;
        *) LABEL="OpenVPN $(version_of openvpn) UDP, $cipher" ;;
    esac
    command -v openvpn >/dev/null || { unavailable $id "openvpn missing"; return 0; }
    command -v openssl >/dev/null || { unavailable $id "openssl missing"; return 0; }
    make_pair
    local h
    for h in a b; do
        [ -e "$W/ovpn-$h.crt" ] && continue
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
            -subj "/CN=$h" -keyout "$W/ovpn-$h.key" -out "$W/ovpn-$h.crt" >> "$LOGS/$id.openssl.log" 2>&1
    done
    fp() { openssl x509 -in "$1" -noout -fingerprint -sha256 | sed 's/.*=//'; }
    local pids="" uip ruip oip roip o
    local -a tls
    for h in b a; do
        case $h in
            a) o=b uip=$UA ruip=$UB oip=$OA roip=$OB tls=(--tls-client) ;;
            b) o=a uip=$UB ruip=$UA oip=$OB roip=$OA tls=(--tls-server --dh none) ;;
        esac
        bg $h "openvpn $h ($id)" "$LOGS/$id.$h.log" openvpn \
            --dev tun0 --dev-type tun --proto udp --local "$uip" --lport 1194 \
            --remote "$ruip" 1194 --ifconfig "$oip" "$roip" \
            "${tls[@]}" --cert "$W/ovpn-$h.crt" --key "$W/ovpn-$h.key" \
            --peer-fingerprint "$(fp "$W/ovpn-$o.crt")" \
            --data-ciphers "$cipher" "${extra[@]}" --verb 3
        pids="$pids $LAST_PID"
    done
    wait_ping a $OB 30 || { fail $id "tunnel did not come up (see $LOGS/$id.*.log)"; return 0; }
    sleep 1
    local used
    used=$(grep -ho "Data Channel: cipher '[^']*'" "$LOGS/$id.a.log" | tail -1 || true)
    log "$id: ${used:-data channel cipher not found in log}"
    measure $id a b $OB $pids
}

run_one() {
    case $1 in
        raw) sys_raw ;;
        ela-bf-1) sys_ela ela-bf-1 blowfish "$ELA_ONE_CORE" "" ;;
        ela-bf-2) sys_ela ela-bf-2 blowfish "$ELA_TWO_CORES" "" ;;
        ela-cc-1) sys_ela ela-cc-1 chacha20-poly1305 "$ELA_ONE_CORE" "" ;;
        ela-cc-2) sys_ela ela-cc-2 chacha20-poly1305 "$ELA_TWO_CORES" "" ;;
        ela-bf-1-nooff) sys_ela ela-bf-1-nooff blowfish "$ELA_ONE_CORE" "--no-offload" ;;
        ela-bf-1-busy) sys_ela ela-bf-1-busy blowfish "$ELA_ONE_CORE" "--busy-poll-us ${BUSY_POLL_US:-200}" ;;
        ela-relay) sys_ela_relay ;;
        ela-en-up) RELAY_ID=ela-en-up RELAY_UP=1 sys_ela_relay ;;
        ela-base-bf-1) EBIN=$ELA_BASE_BIN TAG=" [base build]"
                       sys_ela ela-base-bf-1 blowfish "$ELA_ONE_CORE" ""; EBIN= TAG= ;;
        ela-base-relay) EBIN=$ELA_BASE_BIN TAG=" [base build]" RELAY_ID=ela-base-relay
                        sys_ela_relay; EBIN= TAG= RELAY_ID= ;;
        ela-base-en-up) EBIN=$ELA_BASE_BIN TAG=" [base build]" RELAY_ID=ela-base-en-up RELAY_UP=1
                        sys_ela_relay; EBIN= TAG= RELAY_ID= RELAY_UP= ;;
        tinc) sys_tinc ;;
        wireguard-go) sys_wireguard_go ;;
        boringtun) sys_boringtun ;;
        openvpn-bf) sys_openvpn openvpn-bf BF-CBC ;;
        openvpn-gcm) sys_openvpn openvpn-gcm AES-256-GCM ;;
    esac
}

# ---------------------------------------------------------------- main

CMDLINE="sudo${KNOBS} perf/compare.sh"

{
    echo "date=$(date -Is)"
    echo "command=$CMDLINE"
    echo "kernel=$(uname -r)"
    echo "cpu=$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1) x $(nproc)"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "duration=$DURATION"
    echo "lat_secs=$LAT_SECS"
    echo "pings=$PINGS"
    echo "rounds=$ROUNDS"
    if [ -n "$ELA_BIN" ]; then
        if [ "${ELA_BUILT:-0}" = 1 ]; then
            rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)
            [ -n "$rev" ] && { git -C "$REPO" diff --quiet HEAD 2>/dev/null || rev="$rev, work tree modified"; }
            echo "ela-fast=$(version_of ela), built here${rev:+ at $rev}"
        else
            echo "ela-fast=$(version_of ela), ELA_BIN=$ELA_BIN (built outside this run)"
        fi
    fi
    if [ -n "${ELA_BASE_BIN:-}" ]; then
        echo "ela-fast base=$("$ELA_BASE_BIN" --version 2>/dev/null | head -1), ELA_BASE_BIN=$ELA_BASE_BIN"
    fi
    echo "iperf3=$(version_of iperf3)"
    echo "sockperf=$(version_of sockperf)"
} > "$W/meta"
cp "$W/meta" "$LOGS/meta.txt"
LOGS_ROOT=$LOGS

for round in $(seq 1 "$ROUNDS"); do
    for id in $ALL_SYSTEMS; do
        selected "$id" || continue
        log "== $id${ROUNDS_TAG:+ (round $round of $ROUNDS)}"
        CUR=$id
        if [ "$ROUNDS" != 1 ]; then LOGS=$LOGS_ROOT/round$round; mkdir -p "$LOGS"; fi
        set +e
        ( set -e; run_one "$id" )
        rc=$?
        set -e
        if [ $rc != 0 ]; then
            log "$id: script error (exit $rc); see $LOGS/"
            printf '%s\t\t%s\t\t\t\t\t\t\t\t%s\n' "$id" "$id" "script error (exit $rc), see logs" >> "$W/results.tsv"
        fi
        teardown
    done
done

LOGS=$LOGS_ROOT
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$W/meta"
cp "$W/meta" "$LOGS/meta.txt"
cp "$W/results.tsv" "$LOGS/results.tsv"

python3 - "$W/results.tsv" "$W/meta" > "$OUT_MD" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[2]) if "=" in l)

def num(s, scale=1.0):
    try:
        return float(s) / scale
    except (TypeError, ValueError):
        return None

FIELDS = ("t1", "t4", "p50", "p99", "ping", "cpu", "cpul")
SCALE = dict(t1=1e9, t4=1e9)
R, by_id = [], {}
for r in rows:
    r += [""] * (11 - len(r))
    id_, kind, label, *vals, note = r[:11]
    if id_ not in by_id:
        by_id[id_] = dict(id=id_, kind=kind, label=label, notes=[], **{k: [] for k in FIELDS})
        R.append(by_id[id_])
    e = by_id[id_]
    if kind and not e["kind"]:
        e["kind"], e["label"] = kind, label
    for k, v in zip(FIELDS, vals):
        x = num(v, SCALE.get(k, 1.0))
        if x is not None:
            e[k].append(x)
    if note and note not in e["notes"]:
        e["notes"].append(note)
for e in R:
    for k in FIELDS:
        e[k] = statistics.median(e[k]) if e[k] else None

tinc = next((r["t1"] for r in R if r["id"] == "tinc" and r["t1"]), None)
peers = [r for r in R if r["kind"] == "peer" and r["t1"]]
best = max(peers, key=lambda r: r["t1"]) if peers else None
raw = next((r["p50"] for r in R if r["id"] == "raw" and r["p50"] is not None), None)

def f(x, fmt):
    return "–" if x is None else fmt.format(x)

rounds = int(meta.get("rounds", "1"))
print(f"ela-fast vs peers, {meta.get('date', '')}: {meta.get('cpu', '')}, kernel {meta.get('kernel', '')}, "
      f"load average {meta.get('loadavg_start', '?')} at start, {meta.get('loadavg_end', '?')} at end.")
print(f"`{meta.get('command', '')}`: iperf3 {meta.get('iperf3', '')} TCP for {meta.get('duration')} s, "
      f"sockperf {meta.get('sockperf', '')} UDP ping-pong of 64 B for {meta.get('lat_secs')} s "
      f"(round-trip percentiles), ping avg of {meta.get('pings')} pings 50 ms apart; "
      f"CPU = the VPN processes' CPU (100 = one core) during the 1-stream iperf3 and during the ping-pong"
      + (f"; medians of {rounds} rounds." if rounds > 1 else "; one round."))
if meta.get("ela-fast"):
    print(f"ela-fast: {meta['ela-fast']}")
try:
    busy = max(float(meta.get("loadavg_start", "0").split()[0]), float(meta.get("loadavg_end", "0").split()[0]))
except ValueError:
    busy = 0.0
if busy > 1.0:
    print(f"**The machine was busy (1-minute load average up to {busy:.1f}): compare rows within this run only.**")
if best:
    print(f"Best peer (1 stream): {best['label']}.")
print()
print("| system | TCP 1 stream Gb/s | TCP 4 streams Gb/s | sockperf RTT p50 µs | p99 µs | ping avg ms "
      "| CPU % 1 stream | CPU % ping-pong | 1 stream vs tinc | 1 stream vs best peer | p50 over raw µs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in R:
    note = "; ".join(r["notes"])
    if note and r["t1"] is None and r["p50"] is None:
        print(f"| {r['label']} | {note} | | | | | | | | | |")
        continue
    vt = f(r["t1"] / tinc if (r["t1"] and tinc) else None, "{:.2f}×")
    vb = f(r["t1"] / best["t1"] if (r["t1"] and best) else None, "{:.2f}×")
    ovr = f(r["p50"] - raw if (r["p50"] is not None and raw is not None) else None, "{:+.0f}")
    label = r["label"] + (f" ({note})" if note else "")
    print(f"| {label} | {f(r['t1'], '{:.2f}')} | {f(r['t4'], '{:.2f}')} | {f(r['p50'], '{:.0f}')} | "
          f"{f(r['p99'], '{:.0f}')} | {f(r['ping'], '{:.3f}')} | {f(r['cpu'], '{:.0f}')} | {f(r['cpul'], '{:.0f}')} "
          f"| {vt} | {vb} | {ovr} |")
PY

cat "$OUT_MD"
log "table: $OUT_MD; logs: $LOGS/"
