#!/usr/bin/env bash
# Installs what `make run` / `make test` need and is missing: Debian packages, then the project venv
# (.venv) with the test-time Python packages. Idempotent and quiet when everything is present.
set -euo pipefail
cd "$(dirname "$0")/../.."

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git curl
  libabsl-dev libfmt-dev libspdlog-dev nlohmann-json3-dev libcli11-dev libpcre2-dev
  libopenblas-dev libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler prometheus-cpp-dev libcpp-httplib-dev
  libssl-dev openssl prometheus libucx-dev ucx-utils docker-compose
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY_REQUIREMENTS=tools/scripts/requirements.txt
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "install-deps: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(sha256sum "$PY_REQUIREMENTS" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "install-deps: installing Python packages into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r "$PY_REQUIREMENTS"
  echo "$want" > "$stamp"
fi
