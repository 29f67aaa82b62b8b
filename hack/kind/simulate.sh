#!/usr/bin/env bash
# Run a scenario through the real controller on a kind cluster (for users with Docker).
#
#   KWOK_YAML=path/to/kwok.yaml KWOK_STAGES=path/to/stage-fast.yaml \
#     hack/kind/simulate.sh examples/scenarios/quickstart.yaml --time-scale 10 --out out/kind
#
# Needs: docker, kind, kubectl, and this repo's `wattplane` on PATH (or .venv/bin). KWOK_YAML and
# KWOK_STAGES are kwok v0.8.0's release manifests (kwok.yaml, stage-fast.yaml from the
# kubernetes-sigs/kwok release page): kwok inside kind plays the kubelets of the fake GPU nodes
# that `wattplane simulate --cluster` creates (annotation kwok.x-k8s.io/node=fake).
# The cluster is kept for the next run; KIND_DELETE=1 deletes it at the end.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
name="${KIND_CLUSTER:-wattplane}"
kubeconfig="${KUBECONFIG_OUT:-$HOME/.kube/wattplane-kind}"
wattplane="${WATTPLANE:-$(command -v wattplane || echo "$repo/.venv/bin/wattplane")}"

[ $# -ge 1 ] || { echo "usage: $0 SCENARIO.yaml [wattplane simulate options]" >&2; exit 2; }
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "$0: $tool not found on PATH" >&2; exit 2; }
done
for f in "${KWOK_YAML:-}" "${KWOK_STAGES:-}"; do
  [ -n "$f" ] && [ -f "$f" ] || {
    echo "$0: set KWOK_YAML and KWOK_STAGES to kwok v0.8.0's kwok.yaml and stage-fast.yaml" >&2; exit 2; }
done
[ -x "$wattplane" ] || { echo "$0: wattplane not found (make install, or set WATTPLANE)" >&2; exit 2; }

if ! kind get clusters 2>/dev/null | grep -qx "$name"; then
  kind create cluster --name "$name" --config "$here/kind-gpu-fleet.yaml" --kubeconfig "$kubeconfig"
else
  kind get kubeconfig --name "$name" > "$kubeconfig"
fi
export KUBECONFIG="$kubeconfig"
kubectl apply -f "$KWOK_YAML" -f "$KWOK_STAGES"
kubectl -n kube-system rollout status deployment/kwok-controller --timeout=120s

status=0
"$wattplane" simulate "$@" --cluster "$kubeconfig" || status=$?

if [ "${KIND_DELETE:-0}" = 1 ]; then
  kind delete cluster --name "$name"
fi
exit "$status"
