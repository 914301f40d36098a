#!/usr/bin/env bash
# Delete the kind cluster made by up.sh (and with it the release, its volumes and the loaded image).
set -euo pipefail
CLUSTER_NAME="${CLUSTER_NAME:-kvstore}"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  kind delete cluster --name "$CLUSTER_NAME"
else
  echo "no kind cluster named '$CLUSTER_NAME'"
fi
