#!/bin/bash
# Create an extra initramfs archive (newc cpio) to concatenate after build/guest/initramfs.cpio.
# The kernel unpacks every archive of a concatenated initrd in turn, later files replacing
# earlier ones, so this is how the lab adds test scripts, binaries and guest images.
#
# Usage: tools/mkcpio.sh OUT [--bin PROGRAM[:DST]]... [SRC:DST]...
#   SRC:DST          put file (or directory tree) SRC at DST inside the archive; parent
#                    directories are created, modes kept, symlinks followed
#   --bin PROGRAM    put a host program at its own path (or DST), together with the shared
#                    libraries and the ELF interpreter `ldd` lists, so it runs in the guest.
#                    PROGRAM may be a path or a name found in PATH. In the guest, call it
#                    by full path: busybox sh prefers its applets (ip!) to anything in PATH.
# Nothing may go under /dev /proc /sys /tmp /run: /init mounts filesystems over them.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '6,/^set /{/^#/p}' "$0" >&2; exit 2; }
OUT="$1"; shift
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

# add SRC DST: copy SRC to DST (an absolute path inside the archive).
add() {
    local src="$1" dst="$2"
    case "$dst" in
        /*) ;;
        *) echo "mkcpio: destination must be absolute: $dst" >&2; exit 2 ;;
    esac
    case "$dst/" in
        /dev/*|/proc/*|/sys/*|/tmp/*|/run/*)
            echo "mkcpio: $dst would be hidden by a mount made by /init" >&2; exit 2 ;;
    esac
    [ -e "$src" ] || { echo "mkcpio: no such file: $src" >&2; exit 2; }
    mkdir -p "$stage$(dirname "$dst")"
    cp -rL --preserve=mode "$src" "$stage$dst"
}

# add_bin PROGRAM[:DST]
add_bin() {
    local prog="${1%%:*}" dst lib
    [ "$prog" = "$1" ] && dst= || dst="${1#*:}"
    case "$prog" in */*) ;; *) prog="$(command -v "$prog")" || { echo "mkcpio: $1 not found" >&2; exit 2; } ;; esac
    [ -f "$prog" ] || { echo "mkcpio: no such program: $prog" >&2; exit 2; }
    # Default destination: the program's own path, its directory resolved (Debian's /bin is
    # a symlink to /usr/bin; the initramfs has real directories).
    [ -n "$dst" ] || dst="$(cd "$(dirname "$prog")" && pwd -P)/$(basename "$prog")"
    add "$prog" "$dst"
    # ldd lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x..)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x..)" (the interpreter). Static programs: no output.
    local deps
    deps="$(ldd "$prog" 2>/dev/null)" || return 0
    if grep -q 'not found' <<<"$deps"; then
        echo "mkcpio: $prog has missing libraries:" >&2; grep 'not found' <<<"$deps" >&2; exit 2
    fi
    # Libraries keep the paths ldd printed: those are where the guest's loader will look.
    for lib in $(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps"); do
        [ -e "$stage$lib" ] || add "$lib" "$lib"
    done
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin) [ $# -ge 2 ] || { echo "mkcpio: --bin needs an argument" >&2; exit 2; }
               add_bin "$2"; shift 2 ;;
        *:*)   add "${1%%:*}" "${1#*:}"; shift ;;
        *)     echo "mkcpio: expected SRC:DST or --bin PROGRAM, got: $1" >&2; exit 2 ;;
    esac
done

# GNU cpio writes the TRAILER!!! entry and pads the archive to a 512-byte block, so the
# next archive of a concatenation starts 4-byte aligned as the kernel requires.
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$OUT"
