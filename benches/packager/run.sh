#!/usr/bin/env bash
# Packager benchmarks: create (cold and warm), tarball size, unpack time
# against `tar -xzf` of the same tarball, and time to the first task on a
# fresh worker cache, for a small environment (six) and a large one (numpy,
# scipy, pandas). Prints one JSON line per result, then ratio lines.
#
#   benches/packager/run.sh            # both environments
#   ENVS=small REPS=5 benches/packager/run.sh
#
# Needs: python3 (3.11 here) with PyPI access; GNU tar and gzip.
set -euo pipefail
cd "$(dirname "$0")/../.."

ENVS=${ENVS:-"small large"}
REPS=${REPS:-3}   # unpack / first-task repetitions (median reported)
HITS=${HITS:-20}  # cache-hit repetitions
WORK=${WORK:-$(mktemp -d /tmp/drover-pack-bench.XXXXXX)}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q --release --bin drover
BIN=$CARGO_TARGET_DIR/release/drover
PY=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')

spec_small() { echo "{\"python\":\"$PY\",\"requirements\":[\"six==1.17.0\"]}"; }
spec_large() {
  echo "{\"python\":\"$PY\",\"requirements\":[\"numpy==2.1.3\",\"scipy==1.14.1\",\"pandas==2.2.3\",\
\"python-dateutil==4.0.0\",\"pytz==2026.6\",\"tzdata==2026.6\"]}"
}
import_small="import six"
import_large="import numpy, scipy.linalg, pandas"

now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.4f", b-a}'; }
median() { sort -g | awk '{v[NR]=$1} END{print (NR%2)? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
json() { # system workload env n wall_s [extra json fields]
  awk -v s="$1" -v w="$2" -v e="$3" -v n="$4" -v t="$5" -v x="${6:-}" 'BEGIN{
    printf "{\"system\":\"%s\",\"workload\":\"%s\",\"env\":\"%s\",\"n\":%d,\"wall_s\":%.4f,\"tasks_per_s\":%.3f%s}\n",
      s, w, e, n, t, (t>0? n/t : 0), (x==""? "" : "," x)}'
}

for env in $ENVS; do
  d=$WORK/$env
  rm -rf "$d"; mkdir -p "$d"
  "spec_$env" > "$d/spec.json"
  # Download the wheels into pip's cache first, so "cold" measures building,
  # not the network.
  python3 -m pip download -q -d "$d/wheels" --only-binary=:all: \
    $(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["requirements"]))' "$d/spec.json")

  t=$(now)
  "$BIN" pack --cache-dir "$d/cache" create -v "$d/spec.json" -o "$d/env.tar.gz" 2> "$d/create.log" >/dev/null
  cold=$(since "$t")
  grep -q "built in" "$d/create.log"
  stats=$(grep -o '[0-9]* entries, [0-9.]* MB of files' "$d/create.log")
  entries=${stats%% entries*}
  content_mb=$(echo "$stats" | awk '{print $3}')
  size=$(stat -c %s "$d/env.tar.gz")
  phases=$(grep -E '^  [a-z ]+: [0-9.]+ s$' "$d/create.log" | awk -F': ' '{gsub(/ s$/,"",$2); gsub(/^ +/,"",$1); gsub(/ /,"_",$1); printf "%s\"%s_s\":%s", (NR>1?",":""), $1, $2}')
  json drover-pack create-cold "$env" 1 "$cold" "\"entries\":$entries,\"content_mb\":$content_mb,\"tarball_mb\":$(awk -v s="$size" 'BEGIN{printf "%.1f", s/1e6}'),$phases"

  t=$(now)
  for _ in $(seq "$HITS"); do
    "$BIN" pack --cache-dir "$d/cache" create "$d/spec.json" -o "$d/hit.tar.gz" 2> "$d/hit.log" >/dev/null
    grep -q "cache hit" "$d/hit.log"
  done
  json drover-pack create-warm "$env" "$HITS" "$(since "$t")"

  # Unpack: ours (verifies the BLAKE3 of the bytes on the way) and GNU tar
  # (with gzip), each into a fresh directory, alternating which goes first;
  # the tarball is in the page cache for both. Nothing is deleted between
  # runs, and we wait $SETTLE s after deleting: ext4 skips inodes freed in
  # the last ~30 s when allocating, which made whoever ran right after an
  # `rm -rf` 2-3x slower.
  hashed=$d/$(basename "$(ls "$d"/cache/envs/*.tar.gz)")
  cp "$d/env.tar.gz" "$hashed"
  sync; sleep "${SETTLE:-30}"
  : > "$d/pack.t"; : > "$d/tar.t"; : > "$d/pack1.t"
  # The same with 1 writer thread instead of the default 4 (why 4 is the
  # default).
  ours1() { t=$(now); DROVER_UNPACK_THREADS=1 "$BIN" pack run --unpack-dir "$d/w$1" "$hashed" -- true; since "$t" >> "$d/pack1.t"; echo >> "$d/pack1.t"; }
  ours() { t=$(now); "$BIN" pack run --unpack-dir "$d/u$1" "$hashed" -- true; since "$t" >> "$d/pack.t"; echo >> "$d/pack.t"; }
  theirs() { mkdir -p "$d/t$1"; t=$(now); tar -xzf "$hashed" -C "$d/t$1"; since "$t" >> "$d/tar.t"; echo >> "$d/tar.t"; }
  for i in $(seq "$REPS"); do
    if [ $((i % 2)) = 1 ]; then ours "$i"; theirs "$i"; ours1 "$i"; else ours1 "$i"; theirs "$i"; ours "$i"; fi
  done
  pack_s=$(median < "$d/pack.t"); tar_s=$(median < "$d/tar.t")
  json drover-pack unpack "$env" 1 "$pack_s" "\"reps\":$REPS,\"tarball_mb\":$(awk -v s="$size" 'BEGIN{printf "%.1f", s/1e6}')"
  json tar-xzf unpack "$env" 1 "$tar_s" "\"reps\":$REPS"
  json drover-pack-1-writer unpack "$env" 1 "$(median < "$d/pack1.t")" "\"reps\":$REPS"

  # Time to the first task on a fresh worker cache: unpack + start Python +
  # import the packages. Then the same task once the environment is there.
  eval "imp=\$import_$env"
  : > "$d/first.t"; : > "$d/next.t"
  for i in $(seq "$REPS"); do
    t=$(now); "$BIN" pack --cache-dir "$d/fresh$i" run "$hashed" -- python3 -c "$imp"; since "$t" >> "$d/first.t"; echo >> "$d/first.t"
    t=$(now); "$BIN" pack --cache-dir "$d/fresh$i" run "$hashed" -- python3 -c "$imp"; since "$t" >> "$d/next.t"; echo >> "$d/next.t"
  done
  json drover-pack first-task "$env" 1 "$(median < "$d/first.t")" "\"reps\":$REPS"
  json drover-pack next-task "$env" 1 "$(median < "$d/next.t")" "\"reps\":$REPS"
  awk -v e="$env" -v p="$pack_s" -v t="$tar_s" 'BEGIN{printf "# %s: tar -xzf / drover unpack = %.2fx (>1: drover faster)\n", e, t/p}'
  rm -rf "$d"/[utw][0-9]* "$d"/fresh[0-9]*
done
echo "# work dir: $WORK"
