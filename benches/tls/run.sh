#!/usr/bin/env bash
# W1 through `drover run` (10,000 lines of `true`, one local worker) with the
# connection plain, sealed under a password (HMAC records), and over TLS
# (with the password inside it), alternated in rounds so that all three see
# the same machine. Prints one line per run and a markdown table of medians.
#
#   cargo build --release -p drover && benches/tls/run.sh [ROUNDS] [N]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
drover=${DROVER:-$here/target/release/drover}
rounds=${1:-3}
n=${2:-10000}
work=$(mktemp -d /tmp/drover-tls-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
for _ in $(seq 1 "$n"); do echo true; done > "$work/tasks.txt"
printf 'bench-password\n' > "$work/pw" && chmod 600 "$work/pw"
"$drover" tls init "$work/certs" > /dev/null

run() { # mode -> tasks/s
    local extra=()
    case $1 in
        off) ;;
        password) extra=(--password-file "$work/pw") ;;
        tls) extra=(--password-file "$work/pw" --tls-cert "$work/certs/master.pem" --tls-key "$work/certs/master-key.pem") ;;
    esac
    local t0 t1
    t0=$(date +%s.%N)
    (cd "$work" && "$drover" run tasks.txt --workers 1 --cores 2 --memory 1000 --disk 1000 \
        --failed-dir "$work/failed" "${extra[@]}" > /dev/null 2> "$work/err") \
        || { cat "$work/err" >&2; exit 1; }
    t1=$(date +%s.%N)
    echo "$n / ($t1 - $t0)" | bc -l
}

declare -A all
for r in $(seq 1 "$rounds"); do
    # Order rotates each round so none is always first or last.
    case $((r % 3)) in
        1) order="off password tls" ;;
        2) order="tls off password" ;;
        0) order="password tls off" ;;
    esac
    for mode in $order; do
        rate=$(run "$mode")
        printf 'round %d %-8s %8.0f tasks/s\n' "$r" "$mode" "$rate"
        all[$mode]="${all[$mode]:-} $rate"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off=$(echo "${all[off]}" | median)
echo
echo "| connection | runs (tasks/s) | median | / off |"
echo "|---|---|---|---|"
for mode in off password tls; do
    med=$(echo "${all[$mode]}" | median)
    runs=$(for v in ${all[$mode]}; do printf '%.0f ' "$v"; done)
    printf '| %s | %s| %.0f | %.2f |\n' "$mode" "$runs" "$med" "$(echo "$med / $off" | bc -l)"
done
