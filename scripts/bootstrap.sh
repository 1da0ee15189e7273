# Shared by demo.sh and test.sh: make ./.venv with tsunagu installed (editable).
# Usage: . scripts/bootstrap.sh [EXTRA]   (EXTRA: pip extra, e.g. "test")
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "${BASH_SOURCE[0]}")/.."
apt_install() {
    # Install Debian packages only when something is missing, so repeated runs stay fast.
    local missing=()
    for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv python3-dev
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "tsunagu needs Python >= 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
extra="${1:-}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra:+[$extra]}"
