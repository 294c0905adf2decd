#!/usr/bin/env bash
# Make bench/.venv-peers: callward (editable, with its pinned dependencies) plus the
# peers in bench/requirements-peers.txt, so that `python -m bench.sandbox_peers` measures every
# way in one process. The peers never become callward dependencies.
#
# Also builds, offline, the image smolagents' DockerExecutor runs (a Jupyter kernel
# gateway) on callward's base image: callward-bench/jupyter-kernel:<hash>.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=bench/.venv-peers
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"${PIP[@]}" install --quiet -c constraints.txt -e . -r bench/requirements-peers.txt
"${PIP[@]}" check
echo "setup-peers: $VENV ready ($("${PIP[@]}" freeze \
    | grep -E '^(llm-sandbox|llm_sandbox|smolagents)==' | tr '\n' ' '))"

# The kernel gateway image for smolagents, on the base image the sandbox image uses.
.venv/bin/callward sandbox build-image >/dev/null 2>&1 || "$VENV/bin/callward" sandbox build-image >/dev/null
BASE=callward/base:bookworm
KERNEL_TAG=callward-bench/jupyter-kernel:$(cat bench/requirements-peers-kernel.txt \
    <(docker image inspect --format '{{.Id}}' "$BASE") | sha256sum | cut -c1-16)
if docker image inspect "$KERNEL_TAG" >/dev/null 2>&1; then
    echo "setup-peers: $KERNEL_TAG present"
    exit 0
fi
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT
"${PIP[@]}" install --quiet --target "$CONTEXT/site" --only-binary=:all: \
    --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -r bench/requirements-peers-kernel.txt 2>&1 | grep -v -e '^WARNING: Location' \
    -e "dependency resolver" -e "requires pyyaml" || true
test -d "$CONTEXT/site/kernel_gateway"
cat >"$CONTEXT/Dockerfile" <<DOCKERFILE
FROM $BASE
COPY site /opt/kernel-gateway
ENV PYTHONPATH=/opt/kernel-gateway HOME=/tmp JUPYTER_RUNTIME_DIR=/tmp/jupyter-runtime
EXPOSE 8888
CMD ["python3", "-m", "kernel_gateway", "--KernelGatewayApp.ip=0.0.0.0", "--KernelGatewayApp.port=8888"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build --quiet --network none -t "$KERNEL_TAG" "$CONTEXT" >/dev/null
echo "setup-peers: built $KERNEL_TAG"
