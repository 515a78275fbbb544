#!/usr/bin/env bash
# TrainPilot on a local kind cluster, from nothing to a finished experiment (docs/kind.md).
#
#   bash scripts/kind.sh            up, then experiment: leaves the cluster running
#   bash scripts/kind.sh up         cluster from kind-config.yaml, both images built and loaded, helm install
#   bash scripts/kind.sh experiment the quickstart (CPU trials): apply, watch to the end, print the ledger
#   bash scripts/kind.sh down       delete the cluster
#
# Needs docker (or podman, with KIND_EXPERIMENTAL_PROVIDER=podman), kind, kubectl and helm.
# Settings (environment): CLUSTER (trainpilot, as in kind-config.yaml), NAMESPACE (trainpilot),
# TIMEOUT_SECONDS (900, for the experiment), TRAINER_BASE=cuda to build the CUDA trainer image
# instead of the small CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-trainpilot}"
NAMESPACE="${NAMESPACE:-trainpilot}"
TIMEOUT_SECONDS="${TIMEOUT_SECONDS:-900}"
ENGINE="${KIND_EXPERIMENTAL_PROVIDER:-docker}"
VERSION="$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' helm/trainpilot/Chart.yaml)"
OPERATOR_IMAGE="trainpilot/operator:${VERSION}"
TRAINER_IMAGE="trainpilot/trainer:${VERSION}"  # what examples/quickstart.yaml runs
EXPERIMENT=quickstart

say() { printf '\n== %s\n' "$*"; }

need() {
    local missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "kind.sh: ${missing[*]} not found on PATH; install them first (docs/kind.md, 'What you need')" >&2
        exit 2
    fi
}

trainer_build_args() {
    # kind nodes have no GPUs: by default a CPU-only trainer image, about a tenth of the CUDA one.
    if [ "${TRAINER_BASE:-cpu}" != cuda ]; then
        echo --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
            --build-arg WITH_COMPILER=0
    fi
}

up() {
    need "$ENGINE" kind kubectl helm
    say "cluster ${CLUSTER} from kind-config.yaml"
    if kind get clusters | grep -qx "$CLUSTER"; then
        echo "cluster ${CLUSTER} exists; using it"
    else
        kind create cluster --config kind-config.yaml --name "$CLUSTER"
    fi
    say "images ${OPERATOR_IMAGE} and ${TRAINER_IMAGE}, built and loaded into the cluster's nodes"
    "$ENGINE" build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
    # shellcheck disable=SC2046 # the build args are words on purpose
    "$ENGINE" build -f trainer_image/Dockerfile -t "$TRAINER_IMAGE" $(trainer_build_args) .
    kind load docker-image "$OPERATOR_IMAGE" "$TRAINER_IMAGE" --name "$CLUSTER"
    say "helm install: CRDs, RBAC and the operator, watching namespace ${NAMESPACE}"
    helm upgrade --install trainpilot helm/trainpilot --namespace "$NAMESPACE" --create-namespace \
        --kube-context "kind-${CLUSTER}" --wait --timeout 5m
    kubectl --context "kind-${CLUSTER}" -n "$NAMESPACE" rollout status deployment/trainpilot --timeout 2m
}

experiment() {
    need kubectl
    local k=(kubectl --context "kind-${CLUSTER}" -n "$NAMESPACE")
    say "kubectl apply -f examples/quickstart.yaml (CPU trials: gpusPerNode 0)"
    "${k[@]}" apply -f examples/quickstart.yaml
    say "watching until it Succeeds or Fails (at most ${TIMEOUT_SECONDS} s)"
    "${k[@]}" get aexp "$EXPERIMENT" --watch &
    local watcher=$! phase="" deadline=$((SECONDS + TIMEOUT_SECONDS))
    while [ "$SECONDS" -lt "$deadline" ]; do
        phase="$("${k[@]}" get aexp "$EXPERIMENT" -o jsonpath='{.status.phase}')"
        case "$phase" in Succeeded | Failed) break ;; esac
        sleep 5
    done
    kill "$watcher" 2>/dev/null || true
    say "trials, their Jobs and pods"
    "${k[@]}" get jobs,pods -l "trainpilot.dev/experiment=${EXPERIMENT}" -o wide
    say "conditions and every decision as an Event"
    "${k[@]}" describe aexp "$EXPERIMENT"
    say "the ledger (ConfigMap ${EXPERIMENT}-ledger)"
    if command -v trainpilot >/dev/null; then
        # history logs in like kubectl: the current context, which kind create switched to.
        trainpilot history "$EXPERIMENT" --namespace "$NAMESPACE"
    else
        "${k[@]}" get configmap "${EXPERIMENT}-ledger" -o jsonpath='{.data.ledger\.jsonl}'
        echo "(pip install -e '.[operator]' for the same ledger as a table: trainpilot history ${EXPERIMENT} -n ${NAMESPACE})"
    fi
    case "$phase" in
        Succeeded) say "done. Tear down with: bash scripts/kind.sh down" ;;
        Failed) say "the experiment Failed: its conditions above say why"; exit 1 ;;
        *) say "still ${phase:-without a phase} after ${TIMEOUT_SECONDS} s: kubectl -n ${NAMESPACE} logs deployment/trainpilot"; exit 1 ;;
    esac
}

down() {
    need kind
    kind delete cluster --name "$CLUSTER"
}

case "${1:-all}" in
    up) up ;;
    experiment) experiment ;;
    down) down ;;
    all) up && experiment ;;
    *) echo "usage: bash scripts/kind.sh [up|experiment|down]" >&2; exit 2 ;;
esac
