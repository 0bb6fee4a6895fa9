#!/bin/bash
# Copy train.beton and val.beton to node-local storage and verify the copy: one task per node, started
# by slurm/lib/pretrain.sh (STAGE_DATA). Usage: stage_data.sh SRC_DIR DEST_DIR RESERVE_MB
#
# Exit 0: DEST_DIR holds verified copies. Exit 3: the local disk is too small (leaving RESERVE_MB free);
# exit 4: a copy differs from its source; exit 2: bad arguments. Nothing half-written is ever left under
# a final name: each file is written to a temporary name, checked (size, sha256), then renamed, so nodes
# that share the destination (a shared $TMPDIR) replace one verified copy with another.
set -euo pipefail

if [[ $# -ne 3 ]]; then
    echo "usage: stage_data.sh SRC_DIR DEST_DIR RESERVE_MB" >&2
    exit 2
fi
src=$1 dest=$2 reserve_mb=$3
node=${SLURMD_NODENAME:-$(hostname -s)}
say() { printf '[%s] [stage %s] %s\n' "$(date '+%F %T')" "$node" "$*"; }

files=("$src/train.beton" "$src/val.beton")
need=0
for file in "${files[@]}"; do
    if [[ ! -f $file ]]; then
        say "error: $file does not exist"
        exit 2
    fi
    need=$(( need + $(stat -c %s "$file") ))
done
mkdir -p "$dest"
free=$(( $(df -Pk "$dest" | awk 'NR == 2 {print $4}') * 1024 ))
if (( need + reserve_mb * 1024 * 1024 > free )); then
    say "too little space in $dest: $(( need >> 20 )) MiB needed + ${reserve_mb} MiB reserve, $(( free >> 20 )) MiB free"
    rmdir "$dest" 2>/dev/null || true
    exit 3
fi

start=$SECONDS
for file in "${files[@]}"; do
    out=$dest/$(basename "$file")
    tmp=$out.partial.$node.$$
    # The source is read once: the hash of the stream that was written is compared with the copy's.
    read_hash=$(tee "$tmp" <"$file" | sha256sum | cut -d' ' -f1)
    copy_hash=$(sha256sum "$tmp" | cut -d' ' -f1)
    if [[ $(stat -c %s "$tmp") != $(stat -c %s "$file") || $read_hash != "$copy_hash" ]]; then
        say "error: the copy of $file in $tmp differs from the source (size or sha256)"
        rm -f "$tmp"
        exit 4
    fi
    mv -f "$tmp" "$out"
    say "$(basename "$file"): $(( $(stat -c %s "$out") >> 20 )) MiB, sha256 $copy_hash"
done
say "staged $(( need >> 20 )) MiB to $dest in $(( SECONDS - start )) s"
