# Shared helpers for the tools/*.sh scripts. Source it; do not run it.

# Repository root, from the location of this file (works from any cwd).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="$REPO_ROOT/build/guest"

# ensure_pkgs PKG...: apt-get install the Debian packages that are not installed yet.
ensure_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# pkg_version PKG: the installed version of a Debian package.
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }
