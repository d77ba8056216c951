# shellcheck shell=bash
# Shared helpers for Kiln's resource builders. Source it; do not run it.
#
# Every builder produces one artefact directory in the cache,
#   ${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}/<name>-<key>
# where <key> hashes everything the artefact is made from (scripts, config files, package
# versions). It is built in a temporary directory next to it and renamed into place, so a build
# that is killed half-way never leaves a half artefact behind. Builders print the artefact
# directory on stdout; everything else goes to stderr.

# shellcheck disable=SC2034 # used by the scripts that source this file
KILN_RESOURCES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KILN_CACHE_DIR=${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}

log() {
    echo "kiln-resources: $*" >&2
}

die() {
    echo "kiln-resources: error: $*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, through passwordless sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

# True when the Debian package is installed.
package_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Installed version of a Debian package (empty when it is not installed).
package_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

_KILN_APT_UPDATED=0

# Refreshes the apt package lists once per script run.
apt_update_once() {
    if [ "$_KILN_APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >&2 ||
            die "apt-get update failed (need root or passwordless sudo, and network access to the Debian mirrors)"
        _KILN_APT_UPDATED=1
    fi
}

# Installs the Debian packages that are not installed yet. Fails with a clear message when that is
# impossible (not Debian, not root and no passwordless sudo, no network).
ensure_packages() {
    command -v dpkg-query >/dev/null 2>&1 ||
        die "this needs a Debian (12, bookworm) system with dpkg/apt; missing packages: $*"
    local missing=()
    local pkg
    for pkg in "$@"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing missing Debian packages: ${missing[*]}"
    if ! as_root true 2>/dev/null; then
        die "missing Debian packages: ${missing[*]}. Install them with: sudo apt-get install ${missing[*]} (this script is not root and has no passwordless sudo)"
    fi
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q install -y \
        --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
    for pkg in "${missing[@]}"; do
        package_installed "$pkg" || die "package $pkg is still not installed after apt-get install"
    done
}

_KILN_CLEANUP=()

_kiln_cleanup() {
    local path pids
    # Background jobs (e.g. a kernel make) would go on writing into what is removed below.
    pids=$(jobs -p)
    # shellcheck disable=SC2086 # a list of pids
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    for path in "${_KILN_CLEANUP[@]}"; do
        rm -rf "$path"
    done
}

# Removes PATH when the script exits, however it exits.
cleanup_on_exit() {
    _KILN_CLEANUP+=("$1")
    trap _kiln_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Copies an input file into a private directory (removed at exit) and sets SNAPSHOT to the copy,
# so that a build uses exactly the content its cache key was computed from even if the file is
# edited meanwhile. Not for use in $(...): the copy would be removed when the subshell exits.
snapshot_input() {
    if [ -z "${_KILN_SNAPSHOT_DIR:-}" ]; then
        _KILN_SNAPSHOT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiln-inputs-XXXXXX")
        cleanup_on_exit "$_KILN_SNAPSHOT_DIR"
    fi
    SNAPSHOT="$_KILN_SNAPSHOT_DIR/${1##*/}"
    cp "$1" "$SNAPSHOT"
}

# Prints a short hash of the given files' base names and contents and of the given strings:
#   inputs_key FILE... [-- STRING...]
inputs_key() {
    {
        while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
            [ -f "$1" ] || die "input file $1 does not exist"
            printf 'file %s %s\n' "${1##*/}" "$(sha256sum <"$1" | cut -d' ' -f1)"
            shift
        done
        [ "$#" -gt 0 ] && shift
        while [ "$#" -gt 0 ]; do
            printf 'string %s\n' "$1"
            shift
        done
    } | sha256sum | cut -c1-16
}

# Builds an artefact unless the cache already has it, and prints its directory:
#   cached_artefact NAME KEY BUILD_FUNCTION
# BUILD_FUNCTION is called with two arguments: the output directory to fill and a scratch
# directory it may use freely (both are removed if the build fails or is killed).
cached_artefact() {
    local name=$1 key=$2 build=$3
    local final="$KILN_CACHE_DIR/$name-$key"
    mkdir -p "$KILN_CACHE_DIR/.tmp"
    if [ -d "$final" ]; then
        echo "$final"
        return 0
    fi
    # One builder per artefact at a time; a second caller waits and then finds it built.
    exec {lock_fd}>"$KILN_CACHE_DIR/.tmp/$name.lock"
    flock "$lock_fd"
    if [ -d "$final" ]; then
        exec {lock_fd}>&-
        echo "$final"
        return 0
    fi
    # Leftovers of killed builds of this artefact (nobody else holds the lock).
    rm -rf "$KILN_CACHE_DIR/.tmp/$name-"*
    _KILN_BUILD_TMP=$(mktemp -d "$KILN_CACHE_DIR/.tmp/$name-XXXXXX")
    cleanup_on_exit "$_KILN_BUILD_TMP"
    mkdir "$_KILN_BUILD_TMP/out" "$_KILN_BUILD_TMP/scratch"
    local started=$SECONDS
    log "building $name ($name-$key)"
    "$build" "$_KILN_BUILD_TMP/out" "$_KILN_BUILD_TMP/scratch"
    printf '%s\n' "$key" >"$_KILN_BUILD_TMP/out/KEY"
    mv -T "$_KILN_BUILD_TMP/out" "$final"
    rm -rf "$_KILN_BUILD_TMP"
    log "built $name in $((SECONDS - started)) s: $final"
    prune_old_artefacts "$name" "$final"
    exec {lock_fd}>&-
    echo "$final"
}

# Keeps the two most recent versions of an artefact (the new one and the previous one).
prune_old_artefacts() {
    local name=$1 keep=$2 old
    # shellcheck disable=SC2012 # names are ours: <name>-<hex key>
    ls -1dt "$KILN_CACHE_DIR/$name-"* 2>/dev/null | { grep -v -F -x "$keep" || true; } |
        tail -n +2 | while read -r old; do
            log "removing old artefact $old"
            rm -rf "$old"
        done
}

# Writes one newc cpio entry for a directory or a character device, for the few entries a
# non-root user cannot create on disk:  cpio_entry NAME MODE(octal) [MAJOR MINOR]
cpio_entry() {
    local name=$1 mode=$((8#$2)) major=${3:-0} minor=${4:-0}
    local namesize=$((${#name} + 1))
    local nlink=1
    [ $((mode & 8#170000)) -eq $((8#040000)) ] && nlink=2
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
        0 "$mode" 0 0 "$nlink" 0 0 0 0 "$major" "$minor" "$namesize" 0 "$name"
    # Header (110 bytes) plus name is padded to a multiple of 4; no data follows.
    local pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# Pads a file with zero bytes to a multiple of 4, so that another cpio archive can be appended to
# it (the kernel looks for an uncompressed archive only at 4-byte aligned offsets).
pad_to_4() {
    local size
    size=$(stat -c %s "$1")
    head -c $(((4 - size % 4) % 4)) /dev/zero >>"$1"
}

# Fills DIR with Debian's busybox-static in `busybox --install -s` layout.
busybox_tree() {
    local dir=$1 applet
    [ -x /bin/busybox ] || die "/bin/busybox is missing (package busybox-static)"
    ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is dynamically linked; install busybox-static"
    mkdir -p "$dir/bin" "$dir/sbin" "$dir/usr/bin" "$dir/usr/sbin"
    cp /bin/busybox "$dir/bin/busybox"
    for applet in $(/bin/busybox --list-full); do
        [ "$applet" = "bin/busybox" ] && continue
        mkdir -p "$dir/$(dirname "$applet")"
        ln -sf /bin/busybox "$dir/$applet"
    done
}

# Writes a gzip-compressed newc archive of DIR (owned by root) with /dev and /dev/console first.
make_initramfs() {
    local dir=$1 out=$2
    {
        cpio_entry dev 040755
        cpio_entry dev/console 020600 5 1
        (cd "$dir" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible)
    } | gzip -9 -n >"$out"
    pad_to_4 "$out"
}
