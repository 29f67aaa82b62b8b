#!/usr/bin/env bash
# Build the local test cluster's binaries from Go modules at exact versions, once per machine.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes, wrapper module)
#   etcd                                                              (go.etcd.io/etcd/server/v3, wrapper main)
#   kwok, helm                                                        (plain `go install module@version`)
#
# Binaries are cached outside the repo in $WATTPLANE_CACHE/bin/<component>-<version>/ (default
# ~/.cache/wattplane) and reused on later runs. Set WATTPLANE_TESTCLUSTER_BIN to a directory that
# already holds these binaries (e.g. envtest assets plus kwok) to skip the build entirely.
# Prints the directory that holds all binaries (a symlink farm) on its last line.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${WATTPLANE_CACHE:-$HOME/.cache/wattplane}"
out="$cache/bin/all-k8s-$K8S_VERSION"
mkdir -p "$out"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOTOOLCHAIN=local
jobs="${WATTPLANE_BUILD_JOBS:-$(nproc)}"

log() { echo "[testcluster build] $*" >&2; }

build_k8s() {
  local dest="$cache/bin/kubernetes-$K8S_VERSION"
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0
  for c in "${cmds[@]}"; do [ -x "$dest/$c" ] || missing=1; done
  if [ "$missing" = 0 ]; then log "kubernetes $K8S_VERSION cached in $dest"; return; fi
  log "building kubernetes $K8S_VERSION (cold: 25-40 min on 2 cores) into $dest"
  mkdir -p "$dest"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local date; date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  local ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date -X $pkg.gitCommit=wattplane-build"
  done
  (cd "$here/gomod/kubernetes" && go mod download &&
    for c in "${cmds[@]}"; do
      log "  go build $c"
      go build -p "$jobs" -trimpath -ldflags "-s -w$ld" -o "$dest/$c.tmp" "k8s.io/kubernetes/cmd/$c"
      mv "$dest/$c.tmp" "$dest/$c"
    done)
}

build_etcd() {
  local dest="$cache/bin/etcd-$ETCD_VERSION"
  if [ -x "$dest/etcd" ]; then log "etcd $ETCD_VERSION cached"; return; fi
  log "building etcd $ETCD_VERSION"
  mkdir -p "$dest"
  (cd "$here/gomod/etcd" && go build -p "$jobs" -trimpath -ldflags "-s -w" -o "$dest/etcd.tmp" . &&
    mv "$dest/etcd.tmp" "$dest/etcd")
}

go_install() {  # name module version
  local dest="$cache/bin/$1-$3"
  if [ -x "$dest/$1" ]; then log "$1 $3 cached"; return; fi
  log "building $1 $3"
  mkdir -p "$dest"
  GOBIN="$dest" go install -p "$jobs" -trimpath -ldflags "-s -w" "$2@$3"
}

if [ -n "${WATTPLANE_TESTCLUSTER_BIN:-}" ]; then
  log "using prebuilt binaries from WATTPLANE_TESTCLUSTER_BIN=$WATTPLANE_TESTCLUSTER_BIN"
  echo "$WATTPLANE_TESTCLUSTER_BIN"
  exit 0
fi

command -v go >/dev/null || { log "Go is required to build the test cluster (go 1.26+)"; exit 1; }
start=$(date +%s)
build_etcd
go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
# kwok v0.8 ships no built-in stages: take the upstream Stage files (node initialise + lease
# heartbeat, the general pod lifecycle) from the same pinned module.
stages="$cache/bin/kwok-$KWOK_VERSION/stages"
if [ ! -f "$stages/pod-delete.yaml" ]; then
  kwok_dir="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$stages"
  cp "$kwok_dir"/kustomize/stage/node/fast/node-initialize.yaml \
     "$kwok_dir"/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
     "$kwok_dir"/kustomize/stage/pod/general/pod-*.yaml "$stages/"
  chmod 644 "$stages"/*.yaml
fi
go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_k8s
for f in "$cache/bin/kubernetes-$K8S_VERSION"/* "$cache/bin/etcd-$ETCD_VERSION/etcd" \
         "$cache/bin/kwok-$KWOK_VERSION/kwok" "$cache/bin/helm-$HELM_VERSION/helm"; do
  ln -sf "$f" "$out/$(basename "$f")"
done
ln -sfn "$stages" "$out/kwok-stages"
log "done in $(( $(date +%s) - start )) s"
echo "$out"
