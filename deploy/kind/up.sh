#!/usr/bin/env bash
# Bring kvstore up on a local kind cluster and smoke-test it:
#   create the cluster (1 control plane + 3 workers) -> docker build the image ->
#   kind load it -> helm install the chart -> wait for the rollout ->
#   port-forward the client Service -> PUT/GET/DELETE a key with curl -> helm test.
#   With access control on (the chart's default, auth.enabled), curl sends the release's admin
#   token (read from the Secret the pods mount their users file from, key AUTH_TOKEN_KEY) as
#   `Authorization: Bearer`, and first checks that a request without it gets 401.
#   With tls.enabled in HELM_ARGS (cert-manager installed first: README, TLS in kind), curl
#   verifies the nodes with the release's CA over https://localhost; with tls.clientCertAuth it
#   presents the node certificate from the same Secret (a client certificate that CA signed).
# Needs: docker, kind, kubectl, helm (v3 or v4), curl. Idempotent: re-running upgrades in place.
# Settings (env): CLUSTER_NAME=kvstore IMAGE=kvstore:dev RELEASE=kvstore NAMESPACE=kvstore
#                 LOCAL_PORT=8080 HELM_ARGS="--set replicaCount=3 ..."
#                 AUTH_TOKEN_KEY=admin-token (the chart's auth.tokenKey)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-kvstore}"
IMAGE="${IMAGE:-kvstore:dev}"
RELEASE="${RELEASE:-kvstore}"
NAMESPACE="${NAMESPACE:-kvstore}"
LOCAL_PORT="${LOCAL_PORT:-8080}"
HELM_ARGS="${HELM_ARGS:-}"
ROLLOUT_TIMEOUT="${ROLLOUT_TIMEOUT:-5m}"
AUTH_TOKEN_KEY="${AUTH_TOKEN_KEY:-admin-token}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'up.sh: %s\n' "$*" >&2; exit 1; }

HELM="${HELM:-helm}"
if ! command -v "$HELM" >/dev/null 2>&1 && [ -x "$ROOT/.tools/bin/helm" ]; then
  HELM="$ROOT/.tools/bin/helm"  # from `python scripts/install_tools.py`
fi
for tool in docker kind kubectl "$HELM" curl; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not installed (see the Kubernetes section of README.md)"
done

say "kind cluster '$CLUSTER_NAME'"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  echo "exists; reusing it"
else
  kind create cluster --name "$CLUSTER_NAME" --config "$ROOT/deploy/kind/kind-config.yaml" --wait 120s
fi
KUBECTL=(kubectl --context "kind-$CLUSTER_NAME" --namespace "$NAMESPACE")

say "docker build -t $IMAGE"
docker build -t "$IMAGE" "$ROOT"

say "kind load docker-image $IMAGE"
kind load docker-image "$IMAGE" --name "$CLUSTER_NAME"

say "helm upgrade --install $RELEASE (namespace $NAMESPACE)"
# shellcheck disable=SC2086  # HELM_ARGS is a list of flags on purpose
"$HELM" upgrade --install "$RELEASE" "$ROOT/deploy/helm/kvstore" \
  --kube-context "kind-$CLUSTER_NAME" --namespace "$NAMESPACE" --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  $HELM_ARGS

STS="$("${KUBECTL[@]}" get statefulset -l "app.kubernetes.io/instance=$RELEASE" -o jsonpath='{.items[0].metadata.name}')"
[ -n "$STS" ] || die "no StatefulSet for release $RELEASE"
SVC="$STS"  # the client Service shares the StatefulSet's name; the headless one is $STS-headless

say "waiting for statefulset/$STS"
"${KUBECTL[@]}" rollout status "statefulset/$STS" --timeout "$ROLLOUT_TIMEOUT"
"${KUBECTL[@]}" get pods -l "app.kubernetes.io/instance=$RELEASE,app.kubernetes.io/component=node" -o wide

say "port-forward service/$SVC to 127.0.0.1:$LOCAL_PORT"
SVC_PORT="$("${KUBECTL[@]}" get service "$SVC" -o jsonpath='{.spec.ports[0].port}')"
"${KUBECTL[@]}" port-forward "service/$SVC" "$LOCAL_PORT:$SVC_PORT" >/dev/null 2>&1 &
PF_PID=$!
trap 'kill "$PF_PID" 2>/dev/null || true' EXIT
# With tls.enabled (HELM_ARGS="--set tls.enabled=true ..."), the pods mount a Secret named "tls":
# verify them with its ca.crt, by the name `localhost` the chart's certificate carries.
TLS_SECRET="$("${KUBECTL[@]}" get statefulset "$STS" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="tls")].secret.secretName}')"
CURL=(curl)
URL="http://127.0.0.1:$LOCAL_PORT"
TLS_DIR="$(mktemp -d)"
trap 'kill "$PF_PID" 2>/dev/null || true; rm -rf "$TLS_DIR"' EXIT
if [ -n "$TLS_SECRET" ]; then
  "${KUBECTL[@]}" get secret "$TLS_SECRET" -o jsonpath='{.data.ca\.crt}' | base64 -d > "$TLS_DIR/ca.crt"
  CURL=(curl --cacert "$TLS_DIR/ca.crt")
  URL="https://localhost:$LOCAL_PORT"
  # tls.clientCertAuth: the data port wants a client certificate the release's CA signed.
  if "${KUBECTL[@]}" get statefulset "$STS" -o jsonpath='{.spec.template.spec.containers[0].env[*].name}' \
      | tr ' ' '\n' | grep -qx KVSTORE_CLIENT_CERT_AUTH; then
    "${KUBECTL[@]}" get secret "$TLS_SECRET" -o jsonpath='{.data.tls\.crt}' | base64 -d > "$TLS_DIR/tls.crt"
    (umask 077; "${KUBECTL[@]}" get secret "$TLS_SECRET" -o jsonpath='{.data.tls\.key}' | base64 -d > "$TLS_DIR/tls.key")
    CURL+=(--cert "$TLS_DIR/tls.crt" --key "$TLS_DIR/tls.key")
  fi
fi
# Access control (auth.enabled, the default): the pods mount their users file from this Secret;
# the chart-made one also holds the admin token (an auth.existingSecret must hold one under
# AUTH_TOKEN_KEY too, or set KVSTORE_TOKEN yourself).
AUTH_SECRET="$("${KUBECTL[@]}" get statefulset "$STS" -o jsonpath='{.spec.template.spec.volumes[?(@.name=="auth")].secret.secretName}')"
ANON_CURL=("${CURL[@]}")
if [ -n "$AUTH_SECRET" ]; then
  if [ -z "${KVSTORE_TOKEN:-}" ]; then
    KVSTORE_TOKEN="$("${KUBECTL[@]}" get secret "$AUTH_SECRET" -o "jsonpath={.data.$AUTH_TOKEN_KEY}" | base64 -d)"
  fi
  [ -n "$KVSTORE_TOKEN" ] || die "no token: Secret $AUTH_SECRET has no key $AUTH_TOKEN_KEY (set AUTH_TOKEN_KEY or KVSTORE_TOKEN)"
  export KVSTORE_TOKEN
  CURL+=(-H "Authorization: Bearer $KVSTORE_TOKEN")
fi
for _ in $(seq 1 50); do
  if "${CURL[@]}" -fsS "$URL/health" >/dev/null 2>&1; then break; fi
  kill -0 "$PF_PID" 2>/dev/null || die "kubectl port-forward exited (is port $LOCAL_PORT free?)"
  sleep 0.2
done

say "smoke test against $URL"
KEY="smoke-$(date +%s)"
if [ -n "$AUTH_SECRET" ]; then
  status="$("${ANON_CURL[@]}" -sS -o /dev/null -w '%{http_code}' "$URL/kv/$KEY")"
  [ "$status" = 401 ] || die "access control is on, but GET without a token answered $status, not 401"
  echo "without a token: 401, as it should be"
fi
set +x  # the token is in CURL: do not trace it
echo "+ curl (with the admin token) PUT/GET/DELETE $URL/kv/$KEY, /put, /get, /delete, /ring"
"${CURL[@]}" -fsS -X PUT "$URL/kv/$KEY" --data-binary 'hello from up.sh'
got="$("${CURL[@]}" -fsS "$URL/kv/$KEY")"
[ "$got" = 'hello from up.sh' ] || die "GET /kv/$KEY returned '$got'"
"${CURL[@]}" -fsS -X PUT "$URL/put" -d "{\"key\":\"$KEY-json\",\"value\":\"v1\"}"
"${CURL[@]}" -fsS "$URL/get?key=$KEY-json"
"${CURL[@]}" -fsS -X DELETE "$URL/delete?key=$KEY-json"
"${CURL[@]}" -fsS -X DELETE "$URL/kv/$KEY"
status="$("${CURL[@]}" -sS -o /dev/null -w '%{http_code}' "$URL/kv/$KEY")"
[ "$status" = 404 ] || die "GET after DELETE answered $status, not 404"
"${CURL[@]}" -fsS "$URL/ring"
echo

say "helm test $RELEASE"
"$HELM" test "$RELEASE" --kube-context "kind-$CLUSTER_NAME" --namespace "$NAMESPACE" --logs

TOKEN_HINT=""
BEARER_HINT=""
if [ -n "$AUTH_SECRET" ]; then
  # shellcheck disable=SC2016  # printed for the user to run: $(...) and $KVSTORE_TOKEN stay literal
  TOKEN_HINT="$(printf '              export KVSTORE_TOKEN="$(kubectl --context %s -n %s get secret %s -o jsonpath='"'"'{.data.%s}'"'"' | base64 -d)"\n' \
    "kind-$CLUSTER_NAME" "$NAMESPACE" "$AUTH_SECRET" "$AUTH_TOKEN_KEY")
"
  # shellcheck disable=SC2016
  BEARER_HINT='-H "Authorization: Bearer $KVSTORE_TOKEN" '
fi
cat <<MSG

kvstore is up: StatefulSet $STS in namespace $NAMESPACE of kind cluster $CLUSTER_NAME; smoke test passed.

  Reach it:   kubectl --context kind-$CLUSTER_NAME -n $NAMESPACE port-forward service/$SVC $LOCAL_PORT:$SVC_PORT
$TOKEN_HINT              curl $BEARER_HINT-X PUT http://127.0.0.1:$LOCAL_PORT/kv/hello --data-binary world
  Scale:      kubectl --context kind-$CLUSTER_NAME -n $NAMESPACE scale statefulset/$STS --replicas=4
  Tear down:  $ROOT/deploy/kind/down.sh      (or: kind delete cluster --name $CLUSTER_NAME)
MSG
