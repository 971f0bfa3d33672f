#!/usr/bin/env bash
# The plugin suite on a second QGIS: Debian trixie's QGIS 3.40 LTR (Python 3.13, numpy 2), in a chroot that
# debootstrap builds from Debian's archive once and keeps outside the checkout.
#   scripts/qgis_chroot.sh [--build-only] [pytest args...]   (default args: tests/plugin -q -p no:cacheprovider)
# The checkout and the backend venv (.venv, with the Python it was made from) are bind-mounted at the same
# paths, so the tests start the host's `.venv/bin/earthdial` as they do outside. Needs root (debootstrap,
# chroot, mount). EARTHDIAL_CHROOT picks another place, DEBIAN_MIRROR another mirror and EARTHDIAL_CHROOT_SUITE
# another Debian release (sid: the newest QGIS Debian has; its own place unless EARTHDIAL_CHROOT says).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)
[ -d "$root/qgis_plugin" ] && [ "$root" != / ] || { echo "qgis_chroot.sh: run it from its place in a checkout" >&2; exit 2; }
suite=${EARTHDIAL_CHROOT_SUITE:-trixie}
chroot_dir=${EARTHDIAL_CHROOT:-/var/cache/earthdial/$suite}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the chroot holds (the stamp records it: a change here installs it into the cached chroot).
apt_pkgs=(qgis python3-qgis python3-zmq python3-pytest python3-qtpy python3-gdal python3-pip qgis-providers git)
pip_pkgs=("pytest-qgis==5.0.2")
recipe="$suite ${apt_pkgs[*]} ${pip_pkgs[*]}"

build_only=0
if [ "${1:-}" = "--build-only" ]; then build_only=1; shift; fi
[ "$#" -gt 0 ] || set -- tests/plugin -q -p no:cacheprovider
[ "$(id -u)" -eq 0 ] || { echo "qgis_chroot.sh: needs root (debootstrap, chroot, mount)" >&2; exit 2; }

# The chroot's build and its suite are heavy jobs on a shared machine: one heavy job at a time
# (EARTHDIAL_HEAVY_LOCK= for none); and one run per chroot, which owns its mounts while it holds the lock.
heavy_lock=${EARTHDIAL_HEAVY_LOCK-/tmp/earthdial-heavy.lock}
held_by_caller() {  # `flock LOCK scripts/test.sh ...` above us: taking the lock again would wait forever
  local pid=$PPID
  while [ "${pid:-1}" -gt 1 ]; do
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "flock $1 " && return 0
    pid=$(ps -o ppid= -p "$pid" | tr -d ' ')
  done
  return 1
}
if [ -n "$heavy_lock" ] && ! held_by_caller "$heavy_lock"; then
  exec 9>"$heavy_lock"
  flock 9
fi
mkdir -p "$(dirname "$chroot_dir")"
exec 8>"$chroot_dir.lock"
flock 8
# mounts left by a run that was killed
for stale in $(findmnt -rn -o TARGET | grep -E "^$chroot_dir(\.new)?/" | sort -r); do umount -l "$stale"; done

in_chroot() { chroot "$chroot_dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

# rm -rf of a chroot with the checkout still bind-mounted in it would delete the checkout: never.
remove_tree() {
  if findmnt -rn -o TARGET | grep -qE "^$1/"; then
    echo "qgis_chroot.sh: $1 still has mounts; not removing it" >&2
    exit 1
  fi
  rm -rf "$1"
}

# Install the recipe's packages into the chroot at $1 (a new one, or the cached one when the recipe changed).
provision() {
  local target=$1
  cp /etc/resolv.conf "$target/etc/resolv.conf"
  mount -t proc proc "$target/proc"
  trap "umount '$target/proc' 2>/dev/null || true" EXIT
  chroot_dir=$target in_chroot apt-get update -q
  chroot_dir=$target in_chroot env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${apt_pkgs[@]}"
  # pytest-qgis is not packaged by Debian: the host's pip fetches its wheel (with the host's registry settings)
  # and the chroot's pip installs that file, next to Debian's pytest.
  rm -rf "$target/var/tmp/wheels"
  mkdir -p "$target/var/tmp/wheels"
  "${PYTHON:-python3}" -m pip download -q --no-deps -d "$target/var/tmp/wheels" "${pip_pkgs[@]}"
  chroot_dir=$target in_chroot sh -c 'pip install -q --break-system-packages --no-index --no-deps /var/tmp/wheels/*.whl'
  rm -rf "$target/var/tmp/wheels"
  chroot_dir=$target in_chroot apt-get clean
  umount "$target/proc"
  trap - EXIT
  echo "$recipe" >"$target/.earthdial-recipe"
}

build() {
  command -v debootstrap >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap ||
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap; }
  }
  local started=$SECONDS tmp="$chroot_dir.new"
  remove_tree "$tmp"
  debootstrap --variant=minbase "$suite" "$tmp" "$mirror"
  provision "$tmp"
  remove_tree "$chroot_dir"
  mv "$tmp" "$chroot_dir"
  echo "qgis_chroot.sh: built $chroot_dir in $((SECONDS - started)) s"
}

if [ ! -f "$chroot_dir/.earthdial-recipe" ]; then
  build
elif [ "$(cat "$chroot_dir/.earthdial-recipe")" != "$recipe" ]; then
  provision "$chroot_dir"  # the cached chroot, brought up to the recipe
fi
[ "$build_only" = 1 ] && exit 0

# What the tests need from the host, at the same paths: the checkout, the backend venv (.venv may be a link
# to a venv elsewhere; the folder holding it too, for an editable install's path) and the Python it was made from.
mounts=("$root")
if [ -e .venv/bin/python ]; then
  venv=$(readlink -f .venv)
  mounts+=("$(dirname "$venv")")
  home=$(sed -n 's/^home *= *//p' "$venv/pyvenv.cfg")
  prefix=$(readlink -f "$(dirname "$(readlink -f "$home/python3")")/..")
  case $prefix in
    / | /usr) echo "qgis_chroot.sh: .venv is made from the system's Python ($prefix), which the chroot cannot" \
      "borrow; the backend tests will not find it (make .venv from a Python outside /usr, e.g. pyenv's)" >&2 ;;
    *) mounts+=("$prefix") ;;
  esac
fi
if [ -f .git ]; then  # a git worktree: its repository is elsewhere (test_build.py asks git)
  mounts+=("$(cd "$(git rev-parse --git-common-dir)" && pwd -P)")
fi
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
}
trap cleanup EXIT
bind() {  # bind <host path> [ro]
  local src target
  src=$(readlink -f "$1")
  case $src in / | /usr | /usr/* | /etc | /etc/* | /var | /var/cache | /var/cache/*) echo "qgis_chroot.sh: not mounting $src" >&2; exit 2 ;; esac
  target="$chroot_dir$src"
  mountpoint -q "$target" && return 0  # already there (a folder inside one mounted before)
  mkdir -p "$target"
  mnt --bind "$src" "$target"
  if [ "${2:-}" = ro ]; then mount -o remount,bind,ro "$target"; fi
}
mnt() { mount "$@"; mounted+=("${*: -1}"); }  # mnt <mount's arguments>, the target last
mnt -t proc proc "$chroot_dir/proc"
bind /dev
bind /dev/pts
mnt -t tmpfs tmpfs "$chroot_dir/dev/shm"
# A fresh /tmp, home and QGIS profile for this run: nothing is read from or written to a QGIS profile of the
# host's or of an earlier run. /tmp first: a checkout under /tmp (CI may clone there) is mounted on top of it.
mnt -t tmpfs tmpfs "$chroot_dir/tmp"
bind "${mounts[0]}"
for m in "${mounts[@]:1}"; do bind "$m" ro; done

home_in=/tmp/home
home_dir=$chroot_dir$home_in
# pytest-qgis keeps its profile in <rootdir>/.qgis-settings, which the suite on the host's QGIS uses: the
# chroot's QGIS gets a folder of its own there instead.
mkdir -p "$root/.qgis-settings" "$home_dir/qgis-settings"
mnt --bind "$home_dir/qgis-settings" "$chroot_dir$root/.qgis-settings"
in_chroot sh -c "$(printf 'cd %q && exec "$@"' "$root")" run \
  env HOME="$home_in" QGIS_CUSTOM_CONFIG_PATH="$home_in/qgis" XDG_RUNTIME_DIR="$home_in" \
  HF_HUB_OFFLINE=1 QT_QPA_PLATFORM=offscreen PYTHONPATH="$root/backend" \
  python3 -m pytest "$@"
