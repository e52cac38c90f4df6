#!/usr/bin/env bash
# Build the freestanding test guests with the machine's binutils.
# usage: guests/build.sh OUTDIR   (writes OUTDIR/<name>.bin, flat, linked at 0x2000)
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-$src/build}
mkdir -p "$out"
for s in "$src"/*.S; do
  name=$(basename "$s" .S)
  as --64 -o "$out/$name.o" "$s"
  ld -m elf_x86_64 -Ttext=0x2000 -e _start -o "$out/$name.elf" "$out/$name.o"
  objcopy -O binary "$out/$name.elf" "$out/$name.bin"
  nm "$out/$name.elf" > "$out/$name.sym"
done
