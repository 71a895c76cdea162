#!/usr/bin/env bash
# End-to-end medians: real cipher vs null cipher, overlay vs underlay.
# Needs root (network namespaces), iperf3 and ping. See perf/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
OUT=perf/out
mkdir -p "$OUT"
cargo build --release -q
cargo build --release -q --features ela-dataplane/null-cipher --target-dir target/null-cipher
for build in real null; do
    bin=target/release/ela-fast
    [ "$build" = null ] && bin=target/null-cipher/release/ela-fast
    for r in $(seq 1 "$ROUNDS"); do
        echo "== $build cipher, round $r" >&2
        "$bin" demo --json --no-failover --pings 50 --iperf-secs 5 > "$OUT/$build-$r.json"
    done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d
def tput(d):
    t = d.get("throughput")
    if isinstance(t, dict) and t.get("overlay_bps"):
        return t["overlay_bps"], t.get("underlay_bps")
    if isinstance(t, list) and t:
        return t[0].get("overlay_bps"), t[0].get("underlay_bps")
    return None, None
rows = {}
for build in ("real", "null"):
    vals = {"ov_p50": [], "un_p50": [], "ov_p99": [], "ov_bps": [], "un_bps": []}
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/{build}-{r}.json"))
        vals["ov_p50"].append(get(d, "latency.overlay.p50_us"))
        vals["ov_p99"].append(get(d, "latency.overlay.p99_us"))
        vals["un_p50"].append(get(d, "latency.underlay.p50_us"))
        o, u = tput(d)
        vals["ov_bps"].append(o)
        vals["un_bps"].append(u)
    rows[build] = {k: statistics.median([x for x in v if x is not None]) if any(x is not None for x in v) else None for k, v in vals.items()}
print(f"{'build':6} {'overlay p50 µs':>15} {'overlay p99 µs':>15} {'underlay p50 µs':>16} {'overlay Mb/s':>13} {'underlay Mb/s':>14}")
for b, v in rows.items():
    f = lambda x, s=1: "-" if x is None else f"{x / s:.0f}"
    print(f"{b:6} {f(v['ov_p50']):>15} {f(v['ov_p99']):>15} {f(v['un_p50']):>16} {f(v['ov_bps'], 1e6):>13} {f(v['un_bps'], 1e6):>14}")
PY
