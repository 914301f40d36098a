"""The Helm chart (deploy/helm/kvstore), rendered by the real helm binary:
lint, schema validation of every rendered manifest against the Kubernetes JSON
schemas (strict), values.schema.json and validateValues refusals, and the
meaning of what is rendered: names, probes, RBAC, env, volumes, security.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app import __version__
from app.config import NODE_OPTIONS
from tests.k8s.chart import CHART, CHART_CI_VALUES, KUBE_VERSION, NAMESPACE, RELEASE, Render, run_helm, template_args

Doc = dict[str, Any]

# The one list of the env vars the chart sets on the node container; the chart must set exactly
# these, and the app must read every one of them (APP_ENV below).
CHART_ENV = frozenset(
    {
        "KVSTORE_NODE_ID",
        "KVSTORE_NAMESPACE",
        "KVSTORE_LISTEN",
        "KVSTORE_OPS_LISTEN",
        "KVSTORE_DATA_DIR",
        "KVSTORE_DRAIN_DEADLINE",
        "KVSTORE_MEMBERSHIP",
        "KVSTORE_STATEFULSET",
        "KVSTORE_HEADLESS_SERVICE",
        "KVSTORE_CLUSTER_DOMAIN",
        "KVSTORE_REPLICATION_FACTOR",
        "KVSTORE_CLUSTER_TOKEN",
        "KVSTORE_AUTH_FILE",
        "KVSTORE_FSYNC",
        "KVSTORE_LOG_LEVEL",
        "KVSTORE_MAP_SIZE",
    }
)
APP_ENV = frozenset(option.env for option in NODE_OPTIONS)

FULL = CHART_CI_VALUES / "full-values.yaml"
EXISTING_SECRET = CHART_CI_VALUES / "existing-secret-values.yaml"
NO_PROVISIONER = CHART_CI_VALUES / "no-provisioner-values.yaml"
CI_VALUES = sorted(CHART_CI_VALUES.glob("*.yaml"))
MONITORING_API = "monitoring.coreos.com/v1"

# name -> kwargs for render(); every scenario is linted, rendered and validated.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "default+monitoring-api": {"api_versions": [MONITORING_API]},
    "full": {"values_files": [FULL], "api_versions": [MONITORING_API]},
    "existing-secret": {"values_files": [EXISTING_SECRET]},
    "existing-secret+monitoring-api": {"values_files": [EXISTING_SECRET], "api_versions": [MONITORING_API]},
    "no-provisioner": {"values_files": [NO_PROVISIONER]},
    "network-policy-defaults": {"set_values": ["networkPolicy.enabled=true"]},
    "single-node": {"set_values": ["replicaCount=1", "replicationFactor=1"]},
    "alerts-and-dashboards": {
        "set_values": ["metrics.prometheusRule.enabled=true", "metrics.dashboards.enabled=true"],
        "api_versions": [MONITORING_API],
    },
    "alerts-without-monitoring-api": {"set_values": ["metrics.prometheusRule.enabled=true"]},
    "auth-off": {"set_values": ["auth.enabled=false"]},
}


# -- helpers -------------------------------------------------------------------


def by_kind(docs: Iterable[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    found = [doc for doc in by_kind(docs, kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def statefulset(docs: list[Doc]) -> Doc:
    return one(docs, "StatefulSet")


def node_container(docs: list[Doc]) -> Doc:
    containers = statefulset(docs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "kvstore")


def env_of(container: Doc) -> dict[str, Doc]:
    return {item["name"]: item for item in container.get("env", [])}


def services(docs: list[Doc]) -> tuple[Doc, Doc]:
    """(headless, client)"""
    svcs = by_kind(docs, "Service")
    headless = [s for s in svcs if s["spec"].get("clusterIP") == "None"]
    client = [s for s in svcs if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == 1 and len(client) == 1, [s["metadata"]["name"] for s in svcs]
    return headless[0], client[0]


def validate_service_monitor(doc: Doc) -> None:
    """ServiceMonitor is a CRD kubernetes-validate has no schema for: check its structure
    against the monitoring.coreos.com/v1 fields the chart uses."""
    assert doc["apiVersion"] == MONITORING_API
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, set(doc)
    assert isinstance(doc["metadata"]["name"], str) and doc["metadata"]["name"]
    assert all(isinstance(v, str) for v in doc["metadata"].get("labels", {}).values())
    spec = doc["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints", "targetLabels", "podTargetLabels"}, (
        set(spec)
    )
    assert set(spec["namespaceSelector"]) <= {"matchNames", "any"}
    assert all(isinstance(n, str) for n in spec["namespaceSelector"]["matchNames"])
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["endpoints"], "a ServiceMonitor needs at least one endpoint"
    duration = re.compile(
        r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    )
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {
            "port",
            "path",
            "interval",
            "scrapeTimeout",
            "scheme",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
            "tlsConfig",
        }, set(endpoint)
        assert isinstance(endpoint["port"], str)
        assert endpoint.get("scheme", "http") in ("http", "https")
        tls = endpoint.get("tlsConfig", {})
        assert set(tls) <= {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify"}, set(tls)
        for source in (tls[key] for key in ("ca", "cert") if key in tls):
            [(kind, ref)] = source.items()
            assert kind in ("secret", "configMap") and set(ref) == {"name", "key"}, source
        assert endpoint["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            assert duration.match(endpoint[key]), f"{key}={endpoint[key]!r} is not a Prometheus duration"


PROMETHEUS_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
RULE_GROUP_FIELDS = {"name", "interval", "rules", "partial_response_strategy", "limit", "query_offset", "labels"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def validate_prometheus_rule(doc: Doc) -> None:
    """PrometheusRule is a CRD kubernetes-validate has no schema for: check it against the
    monitoring.coreos.com/v1 PrometheusRule fields (spec.groups[].rules[]: record|alert, expr,
    for, keep_firing_for, labels, annotations); promtool checks the PromQL (test_alerts.py)."""
    assert doc["apiVersion"] == MONITORING_API
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, set(doc)
    assert isinstance(doc["metadata"]["name"], str) and doc["metadata"]["name"]
    assert all(isinstance(v, str) for v in doc["metadata"].get("labels", {}).values())
    assert set(doc["spec"]) == {"groups"}, set(doc["spec"])
    names = [group["name"] for group in doc["spec"]["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in doc["spec"]["groups"]:
        assert set(group) <= RULE_GROUP_FIELDS, set(group)
        assert isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_FIELDS, set(rule)
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert PROMETHEUS_DURATION.match(rule["for"]), rule["for"]
            for key in ("labels", "annotations"):
                pairs = rule.get(key, {}).items()
                assert all(LABEL_NAME.match(k) and isinstance(v, str) for k, v in pairs), rule.get(key)


def validate_doc(doc: Doc) -> None:
    if doc["kind"] == "ServiceMonitor":
        validate_service_monitor(doc)
        return
    if doc["kind"] == "PrometheusRule":
        validate_prometheus_rule(doc)
        return
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in getattr(exc, "absolute_path", []))
        pytest.fail(
            f"{doc['kind']} {doc['metadata'].get('name')}: at /{path}: {getattr(exc, 'message', exc)}", pytrace=False
        )


def helm_fails(helm: Path, **kwargs: Any) -> str:
    proc = run_helm(helm, template_args(**kwargs))
    assert proc.returncode != 0, f"helm template accepted {kwargs}"
    return proc.stderr


# -- lint and schema validation ------------------------------------------------


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "default")
def test_helm_lint_strict(helm: Path, values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    if values_file is not None:
        args += ["--values", str(values_file)]
    proc = run_helm(helm, args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_manifest_is_valid_kubernetes(render: Render, scenario: str) -> None:
    docs = render(**SCENARIOS[scenario])
    assert docs
    for doc in docs:
        validate_doc(doc)
        labels = doc["metadata"]["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
        ):
            assert key in labels, f"{doc['kind']} {doc['metadata']['name']} lacks label {key}"
        monitoring = scenario == "full" and doc["kind"] in ("ServiceMonitor", "PrometheusRule", "ConfigMap")
        # full-values.yaml puts the monitoring objects in namespace "monitoring"
        assert doc["metadata"]["namespace"] == ("monitoring" if monitoring else NAMESPACE)


def test_one_resource_per_template_named_by_kind(helm: Path) -> None:
    """Judged on what helm renders (each document names its template in a
    `# Source:` line), with every optional resource switched on."""
    expected = {  # template -> the kind it renders
        "statefulset.yaml": "StatefulSet",
        "service.yaml": "Service",
        "serviceaccount.yaml": "ServiceAccount",
        "role.yaml": "Role",
        "rolebinding.yaml": "RoleBinding",
        "poddisruptionbudget.yaml": "PodDisruptionBudget",
        "secret.yaml": "Secret",
        "secret-auth.yaml": "Secret",  # the users file and the admin token
        "servicemonitor.yaml": "ServiceMonitor",
        "networkpolicy.yaml": "NetworkPolicy",
        "prometheusrule.yaml": "PrometheusRule",
        "configmap-dashboards.yaml": "ConfigMap",
    }
    proc = run_helm(helm, template_args(**SCENARIOS["full"]))
    assert proc.returncode == 0, proc.stderr
    kinds_by_template: dict[str, list[str]] = {}
    for chunk in proc.stdout.split("\n---\n"):
        doc = yaml.safe_load(chunk)
        source = re.search(r"^# Source: kvstore/templates/(\S+)$", chunk, flags=re.M)
        if not doc:
            continue
        assert source, f"a rendered {doc['kind']} names no template"
        kinds_by_template.setdefault(source[1], []).append(doc["kind"])
    for template, kinds in kinds_by_template.items():
        assert len(kinds) == 1, f"{template} renders more than one resource: {kinds}"
    rendered = {template: kinds[0] for template, kinds in kinds_by_template.items()}
    for template, kind in expected.items():
        assert rendered.get(template) == kind, f"{template} should render the {kind}, rendered {rendered.get(template)}"


def test_kubernetes_validate_catches_a_typo() -> None:
    """Guard on the guard: strict mode must reject an unknown field, or the test above proves nothing."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"set_values": ["replicaCount=three"]}, "/replicaCount"),
        ({"set_values": ["replicaCount=0"]}, "/replicaCount"),
        ({"set_values": ["replicationFactor=0"]}, "/replicationFactor"),
        ({"set_values": ["containerPort=70000"]}, "/containerPort"),
        ({"set_values": ["fsync=sometimes"]}, "/fsync"),
        ({"set_values": ["storageEngine=sqlite"]}, "/storageEngine"),
        ({"set_values": ["logLevel=loud"]}, "/logLevel"),
        ({"set_values": ["podAntiAffinityPreset=maybe"]}, "/podAntiAffinityPreset"),
        ({"set_values": ["replicas=3"]}, "replicas"),  # a typo of replicaCount: unknown keys are refused
        ({"set_values": ["persistence.sizee=1Gi"]}, "sizee"),
        ({"set_values": ["updateStrategy.rollingUpdate.partition=-1"]}, "/updateStrategy/rollingUpdate/partition"),
        ({"set_values": ["updateStrategy.rollingUpdate.partition=two"]}, "/updateStrategy/rollingUpdate/partition"),
        ({"set_values": ["persistence.mountPath=data"]}, "/persistence/mountPath"),
        ({"set_values": ["service.type=ExternalName"]}, "/service/type"),
        ({"set_values": ["metrics.serviceMonitor.interval=often"]}, "/metrics/serviceMonitor/interval"),
        ({"set_json": ['networkPolicy.clients=[{"namespace":"web"}]']}, "namespace"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects_bad_values(helm: Path, kwargs: dict[str, Any], complaint: str) -> None:
    stderr = helm_fails(helm, **kwargs)
    assert "schema" in stderr and complaint in stderr, stderr


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["replicaCount=2"], "replicationFactor (3) exceeds replicaCount (2)"),
        (
            ["clusterToken.value=abc", "clusterToken.existingSecret=mine"],
            "clusterToken.value and clusterToken.existingSecret are both set",
        ),
        (["opsPort=8080"], "opsPort and containerPort are both 8080"),
        (["pdb.maxUnavailable=3"], "pdb.maxUnavailable (3)"),
        (["serviceAccount.create=false"], "rbac.create is true but serviceAccount.create is false"),
        (["terminationGracePeriodSeconds=10"], "terminationGracePeriodSeconds (10) leaves no time to drain"),
    ],
)
def test_validate_values_refuses_impossible_combinations(helm: Path, set_values: list[str], complaint: str) -> None:
    stderr = helm_fails(helm, set_values=set_values)
    assert complaint in stderr and "Fix:" in stderr, stderr


def test_the_rolling_update_partition_makes_a_canary(render: Render) -> None:
    """By default every pod is updated; a partition keeps the pods below it on the old template."""
    assert statefulset(render())["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"partition": 0},
    }
    canary = statefulset(render(set_values=["updateStrategy.rollingUpdate.partition=2"]))
    assert canary["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}


def test_replicas_may_be_scaled_down_to_the_replication_factor(render: Render) -> None:
    docs = render(set_values=["replicaCount=3", "replicationFactor=3"])
    assert statefulset(docs)["spec"]["replicas"] == 3


# -- meaning -------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "full"])
def test_statefulset_is_governed_by_the_headless_service(render: Render, scenario: str) -> None:
    docs = render(**SCENARIOS[scenario])
    sts = statefulset(docs)
    headless, client = services(docs)
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for svc in (headless, client):
        assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in client["spec"]["ports"]] == ["http"], "clients get the data port only"
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == ["http", "ops"], "ops: for the ServiceMonitor"
    assert client["spec"].get("publishNotReadyAddresses") is not True, "clients must reach ready pods only"
    env = env_of(node_container(docs))
    assert env["KVSTORE_HEADLESS_SERVICE"]["value"] == headless["metadata"]["name"]
    assert env["KVSTORE_STATEFULSET"]["value"] == sts["metadata"]["name"]


@pytest.mark.parametrize(
    ("scenario", "port", "ops"), [("default", 8080, 8081), ("full", 9090, 9100), ("auth-off", 8080, 8081)]
)
def test_probes_hit_health_and_ready_on_the_ops_port(render: Render, scenario: str, port: int, ops: int) -> None:
    """The kubelet probes the plain-HTTP ops listener, never the data port: there a token
    (auth) or a client certificate (tls.clientCertAuth) may be required."""
    docs = render(**SCENARIOS[scenario])
    container = node_container(docs)
    assert container["ports"] == [
        {"name": "http", "containerPort": port, "protocol": "TCP"},
        {"name": "ops", "containerPort": ops, "protocol": "TCP"},
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "ops"}
    env = env_of(container)
    assert env["KVSTORE_LISTEN"]["value"] == f"0.0.0.0:{port}"
    assert env["KVSTORE_OPS_LISTEN"]["value"] == f"0.0.0.0:{ops}"
    headless, _ = services(docs)
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("http", port), ("ops", ops)]


def test_startup_probe_is_optional(render: Render) -> None:
    container = node_container(render(values_files=[EXISTING_SECRET]))
    assert "startupProbe" not in container
    assert {"livenessProbe", "readinessProbe"} <= set(container)


def test_role_grants_only_get_list_watch_on_three_resources(render: Render) -> None:
    docs = render()
    role = one(docs, "Role")
    granted = {
        (group, resource, frozenset(rule["verbs"]))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    read = frozenset({"get", "list", "watch"})
    assert granted == {("apps", "statefulsets", read), ("", "pods", read)}  # what app/membership/kubernetes.py reads
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"]), (
        "no resourceNames/nonResourceURLs"
    )
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    pod_spec = statefulset(docs)["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod_spec["serviceAccountName"], "namespace": NAMESPACE}
    ]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == pod_spec["serviceAccountName"]
    assert pod_spec["automountServiceAccountToken"] is True


def test_existing_service_account_is_bound_not_created(render: Render) -> None:
    docs = render(values_files=[EXISTING_SECRET])
    assert not by_kind(docs, "ServiceAccount")
    assert statefulset(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "kvstore-preexisting"
    assert one(docs, "RoleBinding")["subjects"][0]["name"] == "kvstore-preexisting"


@pytest.mark.parametrize(
    ("scenario", "path"), [("default", "/data"), ("full", "/var/lib/kvstore"), ("existing-secret", "/data")]
)
def test_data_volume_is_mounted_at_the_data_dir(render: Render, scenario: str, path: str) -> None:
    docs = render(**SCENARIOS[scenario])
    sts = statefulset(docs)
    container = node_container(docs)
    assert env_of(container)["KVSTORE_DATA_DIR"]["value"] == path
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[path] == "data"
    assert mounts["/tmp"] == "tmp"
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
    if scenario == "existing-secret":  # persistence.enabled=false
        assert claims == [] and "emptyDir" in volumes["data"]
    else:
        assert claims == ["data"] and "data" not in volumes


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, None),
        ({"values_files": [FULL]}, "fast-ssd"),
        ({"values_files": [NO_PROVISIONER]}, ""),
    ],
)
def test_storage_class_and_size(render: Render, kwargs: dict[str, Any], expected: str | None) -> None:
    claim = statefulset(render(**kwargs))["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"].get("storageClassName") == expected
    assert claim["spec"]["resources"]["requests"]["storage"] == (
        "20Gi" if kwargs.get("values_files") == [FULL] else "1Gi"
    )


@pytest.mark.parametrize("scenario", ["default", "full", "existing-secret", "auth-off"])
def test_chart_sets_exactly_the_documented_env(render: Render, scenario: str) -> None:
    env = env_of(node_container(render(**SCENARIOS[scenario])))
    chart_env = {name for name in env if name.startswith("KVSTORE_")}
    if scenario == "full":
        chart_env -= {"KVSTORE_SYNC_DEADLINE"}  # the user's own, from extraEnv in full-values.yaml
        assert chart_env == CHART_ENV | {"KVSTORE_STORAGE"}, "storageEngine set: KVSTORE_STORAGE too"
        assert "KVSTORE_STORAGE" in APP_ENV
        return
    if scenario == "existing-secret":
        assert chart_env == CHART_ENV - {"KVSTORE_MAP_SIZE"}, "no volume, no mapSize: the app's default"
        return
    if scenario == "auth-off":
        assert chart_env == CHART_ENV - {"KVSTORE_AUTH_FILE"}
        return
    assert chart_env == CHART_ENV


def test_every_env_the_chart_sets_is_read_by_the_app(render: Render) -> None:
    """Depends on app.config.NODE_OPTIONS defining an Option for every name in CHART_ENV."""
    env = env_of(node_container(render()))
    rendered = {name for name in env if name.startswith("KVSTORE_")}
    assert rendered == CHART_ENV
    missing = sorted(rendered - APP_ENV)
    assert not missing, f"the chart sets env the app does not read (add Options to app.config.NODE_OPTIONS): {missing}"


def test_env_values_come_from_the_right_places(render: Render) -> None:
    docs = render(values_files=[FULL], api_versions=[MONITORING_API])
    env = env_of(node_container(docs))
    assert env["KVSTORE_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KVSTORE_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["KVSTORE_MEMBERSHIP"]["value"] == "kubernetes"
    assert env["KVSTORE_CLUSTER_DOMAIN"]["value"] == "k8s.example"
    assert env["KVSTORE_REPLICATION_FACTOR"]["value"] == "3"
    assert env["KVSTORE_FSYNC"]["value"] == "always"
    assert env["KVSTORE_STORAGE"]["value"] == "rocksdb"
    assert env["KVSTORE_LOG_LEVEL"]["value"] == "debug"
    assert env["KVSTORE_CLUSTER_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "store", "key": "cluster-token"}}
    assert one(docs, "Secret", "store")["data"]["cluster-token"]
    assert env["KVSTORE_AUTH_FILE"]["value"] == "/etc/kvstore/access/access.yaml"
    assert all(isinstance(item.get("value", ""), str) for item in env.values()), "env values must be strings"
    defaults = env_of(node_container(render()))
    assert "KVSTORE_STORAGE" not in defaults  # the node picks the engine a volume holds, else lmdb
    assert {
        name: defaults[name].get("value")
        for name in ("KVSTORE_CLUSTER_DOMAIN", "KVSTORE_REPLICATION_FACTOR", "KVSTORE_FSYNC", "KVSTORE_LOG_LEVEL")
    } == {
        "KVSTORE_CLUSTER_DOMAIN": "cluster.local",
        "KVSTORE_REPLICATION_FACTOR": "3",
        "KVSTORE_FSYNC": "batch",
        "KVSTORE_LOG_LEVEL": "info",
    }


def _token(docs: list[Doc], key: str = "token") -> str:
    return base64.b64decode(one(docs, "Secret", f"{RELEASE}-kvstore")["data"][key]).decode()


def test_given_token_is_stored_and_stable(render: Render) -> None:
    first = render(set_values=["clusterToken.value=correct-horse-battery"])
    second = render(set_values=["clusterToken.value=correct-horse-battery"])
    assert _token(first) == _token(second) == "correct-horse-battery"
    annotations = [
        statefulset(d)["spec"]["template"]["metadata"]["annotations"]["checksum/cluster-token"] for d in (first, second)
    ]
    assert annotations[0] == annotations[1], "the same values must not roll the pods"
    other = render(set_values=["clusterToken.value=another-token"])
    assert statefulset(other)["spec"]["template"]["metadata"]["annotations"]["checksum/cluster-token"] != annotations[0]


def test_generated_token_is_random_and_long(render: Render) -> None:
    tokens = {_token(render()) for _ in range(2)}
    assert len(tokens) == 2, "offline (no lookup) every render draws a new token"
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", t) for t in tokens)
    # The checksum hashes the values, not the drawn token: an upgrade that keeps the token keeps the pods.
    checksums = {
        statefulset(render())["spec"]["template"]["metadata"]["annotations"]["checksum/cluster-token"] for _ in range(2)
    }
    assert len(checksums) == 1


def test_existing_secrets_are_referenced_not_created(render: Render) -> None:
    docs = render(values_files=[EXISTING_SECRET])
    assert not by_kind(docs, "Secret"), "both the cluster token and the users file come from the user's Secrets"
    env = env_of(node_container(docs))
    assert env["KVSTORE_CLUSTER_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "kvstore-token", "key": "shared-token"}
    }
    assert env["KVSTORE_AUTH_FILE"]["value"] == "/etc/kvstore/auth/users.json"
    volumes = {v["name"]: v for v in statefulset(docs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "kvstore-users"
    assert volumes["auth"]["secret"]["items"] == [{"key": "users.json", "path": "users.json"}]
    test_env = env_of(one(docs, "Pod")["spec"]["containers"][0])
    assert test_env["KVSTORE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "kvstore-users", "key": "ops-token"}}


def test_pdb_allows_one_pod_down(render: Render) -> None:
    docs = render()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == statefulset(docs)["spec"]["selector"]["matchLabels"]
    assert not by_kind(render(values_files=[EXISTING_SECRET]), "PodDisruptionBudget")


@pytest.mark.parametrize("scenario", ["default", "full"])
def test_security_context_is_hardened(render: Render, scenario: str) -> None:
    docs = render(**SCENARIOS[scenario])
    pods = [statefulset(docs)["spec"]["template"]["spec"], one(docs, "Pod")["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx.get("privileged", False) is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert "limits" in container["resources"] and "memory" in container["resources"]["limits"]


def test_graceful_scale_down_settings(render: Render) -> None:
    pod = statefulset(render())["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 60
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == ["sleep", "5"]
    assert int(sleep[1]) < pod["terminationGracePeriodSeconds"]
    no_hook = statefulset(render(values_files=[EXISTING_SECRET]))["spec"]["template"]["spec"]["containers"][0]
    assert "lifecycle" not in no_hook


@pytest.mark.parametrize(
    ("set_values", "grace", "deadline"),
    [
        ([], 60, 50),  # 60 - 5 (preStop) - 5 (margin)
        (
            ["terminationGracePeriodSeconds=30", "lifecycle.preStopSleepSeconds=10", "lifecycle.drainMarginSeconds=3"],
            30,
            17,
        ),
        (["lifecycle.preStopSleepSeconds=0"], 60, 55),
    ],
)
def test_drain_deadline_fits_inside_the_grace_period(
    render: Render, set_values: list[str], grace: int, deadline: int
) -> None:
    """The kubelet SIGKILLs a pod terminationGracePeriodSeconds after it starts stopping, preStop
    sleep included: the node's drain (KVSTORE_DRAIN_DEADLINE) must end before that, with a margin."""
    docs = render(set_values=set_values)
    container = node_container(docs)
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    drain = int(env_of(container)["KVSTORE_DRAIN_DEADLINE"]["value"])
    assert statefulset(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
    assert drain == deadline
    assert int(sleep[1]) + drain < grace


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({}, "preferredDuringSchedulingIgnoredDuringExecution"),
        ({"set_values": ["podAntiAffinityPreset=hard"]}, "requiredDuringSchedulingIgnoredDuringExecution"),
        ({"set_values": ["podAntiAffinityPreset=none"]}, None),
        ({"values_files": [NO_PROVISIONER]}, "nodeAffinity"),
    ],
)
def test_pod_anti_affinity(render: Render, kwargs: dict[str, Any], kind: str | None) -> None:
    docs = render(**kwargs)
    pod = statefulset(docs)["spec"]["template"]["spec"]
    selector = statefulset(docs)["spec"]["selector"]["matchLabels"]
    if kind is None:
        assert "affinity" not in pod
        return
    if kind == "nodeAffinity":
        assert set(pod["affinity"]) == {"nodeAffinity"}
        return
    terms = pod["affinity"]["podAntiAffinity"][kind]
    term = terms[0]["podAffinityTerm"] if kind.startswith("preferred") else terms[0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == selector


def test_prometheus_scrape_annotations(render: Render) -> None:
    annotations = statefulset(render())["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8081", "the ops port: /metrics without credentials"
    assert annotations["prometheus.io/path"] == "/metrics"
    off = statefulset(render(values_files=[FULL]))["spec"]["template"]["metadata"]["annotations"]
    assert not any(key.startswith("prometheus.io/") for key in off)


@pytest.mark.parametrize(("enabled", "api", "expected"), [(False, True, 0), (True, False, 0), (True, True, 1)])
def test_service_monitor_needs_the_flag_and_the_api(render: Render, enabled: bool, api: bool, expected: int) -> None:
    docs = render(
        set_values=[f"metrics.serviceMonitor.enabled={str(enabled).lower()}"],
        api_versions=[MONITORING_API] if api else [],
    )
    monitors = by_kind(docs, "ServiceMonitor")
    assert len(monitors) == expected
    if monitors:
        headless, _ = services(docs)
        selector = monitors[0]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= headless["metadata"]["labels"].items(), (
            "the ServiceMonitor must select the headless Service"
        )
        _, client = services(docs)
        assert not selector.items() <= client["metadata"]["labels"].items(), (
            "each pod scraped once, not via both Services"
        )
        assert monitors[0]["spec"]["endpoints"][0]["port"] == "ops"
        assert monitors[0]["spec"]["endpoints"][0]["scheme"] == "http"
        assert "tlsConfig" not in monitors[0]["spec"]["endpoints"][0]
        assert monitors[0]["spec"]["endpoints"][0]["path"] == "/metrics"
        assert monitors[0]["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_network_policy_admits_only_peers_clients_and_prometheus(render: Render) -> None:
    assert not by_kind(render(), "NetworkPolicy")
    docs = render(values_files=[FULL], api_versions=[MONITORING_API])
    policy = one(docs, "NetworkPolicy")
    selector = statefulset(docs)["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule, ops_rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ops_rule["ports"] == [{"port": "ops", "protocol": "TCP"}]
    assert ops_rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ], "only Prometheus reaches the ops port"
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": selector}} in peers
    assert {"podSelector": {"matchLabels": {"store-client": "true"}}} in peers
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}},
        "podSelector": {"matchLabels": {"app": "frontend"}},
    } in peers
    assert {
        "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["batch", "api"]}]}
    } in peers
    assert len(peers) == 4, "the data port: peers, labelled clients and the two listed; not Prometheus"
    assert not any("ipBlock" in peer for peer in peers)
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["labels"]["store-client"] == "true", "the helm test pod must get through"


def test_helm_test_pod_writes_and_reads_through_the_client_service(render: Render) -> None:
    docs = render()
    pod = one(docs, "Pod")
    sts = statefulset(docs)
    _, client = services(docs)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert not sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), (
        "the test pod must not be selected by the Services or the PDB"
    )
    [container] = pod["spec"]["containers"]
    assert container["image"] == node_container(docs)["image"]
    url = env_of(container)["KVSTORE_URL"]["value"]
    assert (
        url == f"http://{client['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{client['spec']['ports'][0]['port']}"
    )
    script = container["args"][0]
    assert "kvstore put" in script and "kvstore get" in script
    assert env_of(container)["KVSTORE_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": f"{RELEASE}-kvstore-auth", "key": "admin-token"}
    }
    assert "KVSTORE_TOKEN= kvstore get" in script and "*401*" in script, "it checks that no token means 401"


def test_image_defaults_to_app_version(render: Render) -> None:
    assert node_container(render())["image"] == f"kvstore:{__version__}"
    assert node_container(render(values_files=[FULL]))["image"] == "registry.example.com/kvstore:1.2.3"


def _notes(helm: Path, *sets: str) -> str:
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    proc = run_helm(helm, [*args, *(arg for value in sets for arg in ("--set", value))])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_print_port_forward_and_curl_with_the_admin_token(helm: Path) -> None:
    notes = _notes(helm)
    assert f"kubectl --namespace {NAMESPACE} port-forward service/{RELEASE}-kvstore 8080:8080" in notes
    read_token = (
        f'export KVSTORE_TOKEN="$(kubectl --namespace {NAMESPACE} get secret {RELEASE}-kvstore-auth'
        " -o jsonpath='{.data.admin-token}' | base64 -d)\""
    )
    assert read_token in notes
    bearer = '-H "Authorization: Bearer $KVSTORE_TOKEN"'
    assert f"curl -sS {bearer} -X PUT http://127.0.0.1:8080/kv/hello --data-binary world" in notes
    assert f"curl -sS {bearer} http://127.0.0.1:8080/kv/hello" in notes
    assert "kvstore ring --url http://127.0.0.1:8080" in notes and "KVSTORE_TOKEN" in notes
    assert f"kubectl --namespace {NAMESPACE} scale statefulset/{RELEASE}-kvstore" in notes
    assert "ops port 8081" in notes


def test_notes_without_auth_warn_and_need_no_token(helm: Path) -> None:
    notes = _notes(helm, "auth.enabled=false")
    assert "curl -sS -X PUT http://127.0.0.1:8080/kv/hello --data-binary world" in notes
    assert "Bearer" not in notes and "KVSTORE_TOKEN" not in notes
    assert "WARNING: auth.enabled=false: anyone who reaches port 8080 can read, write and delete every key" in notes
