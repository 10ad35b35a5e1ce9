#!/usr/bin/env bash
# Builds this checkout's release binaries and copies the ones benches/compare.sh runs into DIR.
#   benches/collect-bins.sh DIR
set -euo pipefail
dir=$1
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
target=${CARGO_TARGET_DIR:-$root/target}
cargo build -q --release --bin drover
mkdir -p "$dir"
cp "$target/release/drover" "$dir/drover"
# `cargo bench --no-run` names each bench executable on stderr.
for bench in "workloads:drover" "scale:drover-master" "w4:drover-master"; do
    name=${bench%%:*} pkg=${bench#*:}
    exe=$(cargo bench -p "$pkg" --bench "$name" --no-run 2>&1 | sed -n "s/.*Executable .*(\(.*\/$name-[0-9a-f]*\)).*/\1/p" | tail -n1)
    [ -n "$exe" ] || { echo "no executable for bench $name" >&2; exit 1; }
    cp "$exe" "$dir/$name"
done
echo "binaries in $dir" >&2
