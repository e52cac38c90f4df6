#!/usr/bin/env bash
# Build the freestanding guests with the machine's binutils.
# usage: guests/build.sh OUTDIR
# For each NAME.S writes NAME.elf (linked at the address named by a
# "link-address:" line in the source, default 0x2000), NAME.bin (flat image)
# and NAME.sym (nm output).
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-$src/build}
mkdir -p "$out"
for s in "$src"/*.S; do
  name=$(basename "$s" .S)
  link=$(sed -n 's/.*link-address: *\(0x[0-9a-fA-F]*\).*/\1/p' "$s" | head -n 1)
  as --64 -o "$out/$name.o" "$s"
  ld -m elf_x86_64 -Ttext="${link:-0x2000}" --build-id=none -z noexecstack -z norelro -e _start \
     -o "$out/$name.elf" "$out/$name.o"
  strip --strip-all "$out/$name.elf" -o "$out/$name.stripped.elf"
  objcopy -O binary "$out/$name.elf" "$out/$name.bin"
  nm "$out/$name.elf" > "$out/$name.sym"
done
