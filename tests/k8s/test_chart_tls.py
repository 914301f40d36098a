"""The chart with TLS on (deploy/helm/kvstore, tls.*), rendered by the real
helm: cert-manager's Certificate and Issuer (validated against cert-manager's
published CRD schemas, compiled by the npm package @kubernetes-models/cert-manager
that scripts/install_tools.py installs from a lock, and, since those schemas
let unknown fields through, field by field against the cert-manager.io/v1 API;
every other document strictly against the Kubernetes schemas), the names the node
certificate covers, the Secret mounted where the env points, probes and the
ServiceMonitor on the plain ops port (so tls.clientCertAuth is possible), the
helm test pod and NOTES using the CA (and a client certificate under
clientCertAuth), and nothing of it by default.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.chart import CHART, CHART_CI_VALUES, NAMESPACE, RELEASE, REPO, Render, run_helm
from tests.k8s.test_chart import (
    MONITORING_API,
    by_kind,
    env_of,
    helm_fails,
    node_container,
    one,
    services,
    statefulset,
    validate_doc,
)

Doc = dict[str, Any]
FULLNAME = f"{RELEASE}-kvstore"
HEADLESS = f"{FULLNAME}-headless"
TLS_VALUES = CHART_CI_VALUES / "tls-cert-manager-values.yaml"
SELF_SIGNED = ["tls.enabled=true", "tls.certManager.enabled=true", "tls.certManager.selfSigned=true"]
EXISTING = ["tls.enabled=true", "tls.existingSecret=made-elsewhere"]
SCENARIOS: dict[str, dict[str, Any]] = {
    "cluster-issuer": {"values_files": [TLS_VALUES], "api_versions": [MONITORING_API]},
    "self-signed": {"set_values": SELF_SIGNED, "api_versions": [MONITORING_API]},
    "existing-secret": {"set_values": EXISTING},
    "existing-secret+peer-off": {"set_values": [*EXISTING, "tls.peer=false"]},
    "self-signed+client-cert-auth+auth-off": {
        "set_values": [*SELF_SIGNED, "tls.clientCertAuth=true", "auth.enabled=false", "backup.enabled=true"],
        "api_versions": [MONITORING_API],
    },
}
CLIENT_CERT_AUTH = {"cluster-issuer", "self-signed+client-cert-auth+auth-off"}  # tls-cert-manager-values.yaml sets it
CERT_MANAGER_API = "cert-manager.io/v1"
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
# cert-manager.io/v1 fields (cert-manager's API reference): the ones a Certificate and an Issuer may carry.
CERTIFICATE_SPEC_FIELDS = {
    "secretName", "secretTemplate", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses",
    "duration", "renewBefore", "renewBeforePercentage", "privateKey", "usages", "issuerRef", "isCA", "subject",
    "keystores", "literalSubject", "encodeUsagesInRequest", "revisionHistoryLimit", "additionalOutputFormats",
    "nameConstraints", "otherNames", "signatureAlgorithm",
}  # fmt: skip
KEY_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
}  # fmt: skip
ISSUER_TYPES = {"acme", "ca", "vault", "selfSigned", "venafi"}


def validate_cert_manager(doc: Doc) -> None:
    """A Certificate or an Issuer, against the cert-manager.io/v1 fields and enums."""
    assert doc["apiVersion"] == CERT_MANAGER_API, doc["apiVersion"]
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, set(doc)
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}, set(doc["metadata"])
    assert doc["metadata"]["namespace"] == NAMESPACE
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        assert len(spec) == 1 and set(spec) <= ISSUER_TYPES, f"an Issuer has exactly one type: {set(spec)}"
        if "ca" in spec:
            assert set(spec["ca"]) <= {"secretName", "crlDistributionPoints", "ocspServers", "issuingCertificateURLs"}
            assert isinstance(spec["ca"]["secretName"], str)
        else:
            assert spec == {"selfSigned": {}}
        return
    assert doc["kind"] == "Certificate", doc["kind"]
    assert set(spec) <= CERTIFICATE_SPEC_FIELDS, set(spec) - CERTIFICATE_SPEC_FIELDS
    assert isinstance(spec["secretName"], str) and spec["secretName"]
    assert set(spec["issuerRef"]) <= {"name", "kind", "group"} and spec["issuerRef"]["name"]
    assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    assert spec["issuerRef"]["group"] == "cert-manager.io"
    for key in ("duration", "renewBefore"):
        if key in spec:
            assert GO_DURATION.match(spec[key]), f"{key}={spec[key]!r} is not a Go duration"
    assert len(spec.get("commonName", "")) <= 64, "commonName is at most 64 characters"
    assert all(isinstance(name, str) for name in spec.get("dnsNames", []))
    assert set(spec.get("usages", [])) <= KEY_USAGES, spec.get("usages")
    key = spec.get("privateKey", {})
    assert set(key) <= {"rotationPolicy", "encoding", "algorithm", "size"}
    assert key.get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    assert key.get("rotationPolicy", "Never") in ("Never", "Always")
    if "secretTemplate" in spec:
        assert set(spec["secretTemplate"]) <= {"labels", "annotations"}


def validate(doc: Doc) -> None:
    if doc["kind"] in ("Certificate", "Issuer"):
        validate_cert_manager(doc)
    else:
        validate_doc(doc)


CRD_VALIDATOR = Path(__file__).resolve().parent / "cert_manager" / "validate.mjs"
CRD_MODELS = REPO / ".tools" / "cert-manager-models"  # scripts/install_tools.py: npm ci of cert_manager/'s lock


def crd_schema_verdicts(docs: list[Doc]) -> tuple[int, str]:
    """(exit status, output) of cert-manager's published schemas judging docs (node validate.mjs)."""
    node = shutil.which("node")
    if node is None or not (CRD_MODELS / "node_modules").is_dir():
        pytest.fail(
            f"node or {CRD_MODELS} is missing: run `python scripts/install_tools.py` (make tools)", pytrace=False
        )
    proc = subprocess.run(
        [node, str(CRD_VALIDATOR), str(CRD_MODELS)],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def hours(duration: str) -> float:
    return float(duration.removesuffix("h"))


# -- rendering and validation ----------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_with_tls_is_valid(render: Render, scenario: str) -> None:
    docs = render(**SCENARIOS[scenario])
    for doc in docs:
        validate(doc)
    kinds = sorted(doc["kind"] for doc in docs if doc["kind"] in ("Certificate", "Issuer"))
    expected = {
        "cluster-issuer": ["Certificate"],
        "self-signed": ["Certificate", "Certificate", "Issuer", "Issuer"],
        "self-signed+client-cert-auth+auth-off": ["Certificate", "Certificate", "Issuer", "Issuer"],
    }.get(scenario, [])
    assert kinds == expected


def test_cert_manager_resources_pass_the_published_crd_schemas(render: Render) -> None:
    docs = [
        doc
        for scenario in ("cluster-issuer", "self-signed")
        for doc in render(**SCENARIOS[scenario])
        if doc["kind"] in ("Certificate", "Issuer")
    ]
    assert len(docs) == 5
    status, output = crd_schema_verdicts(docs)
    assert status == 0, output
    assert output.count("valid ") == 5, output


def test_the_published_crd_schemas_catch_mistakes(render: Render) -> None:
    """Guard on the guard: the compiled schemas refuse wrong types, a missing issuer name and bad enums."""
    cert = one(render(**SCENARIOS["cluster-issuer"]), "Certificate")
    broken = [
        {**cert, "spec": {**cert["spec"], "dnsNames": "one-name"}},
        {**cert, "spec": {**cert["spec"], "issuerRef": {"kind": "ClusterIssuer"}}},
        {**cert, "spec": {**cert["spec"], "privateKey": {"algorithm": "DSA"}}},
        {**cert, "spec": {**cert["spec"], "usages": ["server-auth"]}},
    ]
    status, output = crd_schema_verdicts(broken)
    assert status == 1 and output.count("INVALID") == 4, output


def test_cert_manager_field_check_catches_mistakes() -> None:
    """Guard on the guard: the hand-written cert-manager check refuses a typo and a bad enum."""
    good: dict[str, Any] = {
        "apiVersion": CERT_MANAGER_API,
        "kind": "Certificate",
        "metadata": {"name": "c", "namespace": NAMESPACE},
        "spec": {"secretName": "s", "issuerRef": {"name": "i", "kind": "Issuer", "group": "cert-manager.io"}},
    }
    validate_cert_manager(good)
    broken: dict[str, Any]
    for broken in (
        {"dnsName": ["x"]},
        {"issuerRef": {"name": "i", "kind": "Cluster", "group": "cert-manager.io"}},
        {"duration": "90d"},
        {"usages": ["server-auth"]},
    ):
        with pytest.raises(AssertionError):
            validate_cert_manager({**good, "spec": {**good["spec"], **broken}})


def test_tls_is_absent_by_default(render: Render) -> None:
    docs = render()
    assert not by_kind(docs, "Certificate") and not by_kind(docs, "Issuer")
    container = node_container(docs)
    assert not any(name.startswith("KVSTORE_TLS") or name == "KVSTORE_PEER_TLS" for name in env_of(container))
    assert all("scheme" not in container[probe]["httpGet"] for probe in ("livenessProbe", "readinessProbe"))
    assert not any(v["name"] == "tls" for v in statefulset(docs)["spec"]["template"]["spec"]["volumes"])
    assert env_of(one(docs, "Pod")["spec"]["containers"][0])["KVSTORE_URL"]["value"].startswith("http://")


# -- the certificates ---------------------------------------------------------------------


def test_node_certificate_covers_every_pod_the_client_service_and_localhost(render: Render) -> None:
    docs = render(values_files=[TLS_VALUES], set_values=["replicaCount=5"], api_versions=[MONITORING_API])
    cert = one(docs, "Certificate")
    names = set(cert["spec"]["dnsNames"])
    for i in range(5):
        pod = f"{FULLNAME}-{i}.{HEADLESS}"
        assert {f"{pod}.{NAMESPACE}.svc.cluster.local", f"{pod}.{NAMESPACE}.svc", pod} <= names
    assert f"*.{HEADLESS}.{NAMESPACE}.svc.cluster.local" in names, "pods added by scaling need a name too"
    _, client = services(docs)
    service = client["metadata"]["name"]
    assert {f"{service}.{NAMESPACE}.svc.cluster.local", f"{service}.{NAMESPACE}.svc", service, "localhost"} <= names
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"]), "the certificate also authenticates peers"
    assert cert["spec"]["issuerRef"] == {"name": "company-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert (cert["spec"]["duration"], cert["spec"]["renewBefore"]) == ("720h", "240h")
    volumes = statefulset(docs)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": cert["spec"]["secretName"], "defaultMode": 0o440}} in volumes


def test_self_signed_bootstrap_chains_issuer_ca_issuer_certificate(render: Render) -> None:
    docs = render(set_values=SELF_SIGNED)
    issuers = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "Issuer")}
    certs = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "Certificate")}
    ca_cert, node_cert = certs[f"{FULLNAME}-ca"], certs[f"{FULLNAME}-tls"]
    assert issuers[f"{FULLNAME}-selfsigned"]["spec"] == {"selfSigned": {}}
    assert ca_cert["spec"]["isCA"] is True
    assert ca_cert["spec"]["issuerRef"]["name"] == f"{FULLNAME}-selfsigned"
    assert issuers[f"{FULLNAME}-ca"]["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
    assert node_cert["spec"]["issuerRef"] == {"name": f"{FULLNAME}-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert hours(ca_cert["spec"]["duration"]) > hours(node_cert["spec"]["duration"])


def test_existing_secret_is_mounted_and_no_certificate_made(render: Render) -> None:
    docs = render(set_values=EXISTING)
    assert not by_kind(docs, "Certificate") and not by_kind(docs, "Issuer")
    volumes = statefulset(docs)["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "tls")["secret"]["secretName"] == "made-elsewhere"


# -- the pods -----------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_nodes_read_the_mounted_secret_and_are_probed_on_the_plain_ops_port(render: Render, scenario: str) -> None:
    """The kubelet's probes present no client certificate and no token: they go to the ops
    listener, plain HTTP, whatever the data port requires."""
    docs = render(**SCENARIOS[scenario])
    container = node_container(docs)
    env = env_of(container)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount == {"name": "tls", "mountPath": "/etc/kvstore/tls", "readOnly": True}
    assert {name: env[name]["value"] for name in ("KVSTORE_TLS_CERT", "KVSTORE_TLS_KEY", "KVSTORE_TLS_CA")} == {
        "KVSTORE_TLS_CERT": "/etc/kvstore/tls/tls.crt",
        "KVSTORE_TLS_KEY": "/etc/kvstore/tls/tls.key",
        "KVSTORE_TLS_CA": "/etc/kvstore/tls/ca.crt",
    }
    assert env["KVSTORE_PEER_TLS"]["value"] == ("false" if scenario.endswith("peer-off") else "true")
    if scenario in CLIENT_CERT_AUTH:
        assert env["KVSTORE_CLIENT_CERT_AUTH"]["value"] == "true"
    else:
        assert "KVSTORE_CLIENT_CERT_AUTH" not in env
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "ops", probe
        assert container[probe]["httpGet"].get("scheme", "HTTP") == "HTTP", probe
    assert env["KVSTORE_OPS_LISTEN"]["value"] == "0.0.0.0:8081"


def test_client_cert_auth_env_is_one_the_app_reads(render: Render) -> None:
    from app.config import NODE_OPTIONS

    env = env_of(node_container(render(**SCENARIOS["self-signed+client-cert-auth+auth-off"])))
    assert {"KVSTORE_CLIENT_CERT_AUTH", "KVSTORE_PEER_TLS", "KVSTORE_TLS_CA"} <= {o.env for o in NODE_OPTIONS}
    assert env["KVSTORE_CLIENT_CERT_AUTH"]["value"] == "true"


@pytest.mark.parametrize(("scenario", "client_cert"), [("cluster-issuer", True), ("self-signed", False)])
def test_helm_test_pod_verifies_with_the_ca_and_presents_a_certificate_under_client_cert_auth(
    render: Render, scenario: str, client_cert: bool
) -> None:
    docs = render(**SCENARIOS[scenario])
    pod = one(docs, "Pod")
    [container] = pod["spec"]["containers"]
    env = env_of(container)
    assert env["KVSTORE_URL"]["value"].startswith(f"https://{FULLNAME}.{NAMESPACE}.svc.cluster.local:")
    assert env["KVSTORE_CACERT"]["value"] == "/etc/kvstore/tls/ca.crt"
    if client_cert:  # the node certificate carries `client auth`, and the CA that the nodes check signed it
        assert env["KVSTORE_CERT"]["value"] == "/etc/kvstore/tls/tls.crt"
        assert env["KVSTORE_KEY"]["value"] == "/etc/kvstore/tls/tls.key"
    else:
        assert "KVSTORE_CERT" not in env and "KVSTORE_KEY" not in env
    assert env["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULLNAME}-auth", "key": "admin-token"}
    assert container["volumeMounts"] == [{"name": "tls", "mountPath": "/etc/kvstore/tls", "readOnly": True}]
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == f"{FULLNAME}-tls"


def test_service_monitor_scrapes_the_plain_ops_port_under_tls(render: Render) -> None:
    """/metrics on the ops listener is plain HTTP (etcd's --listen-metrics-urls): no CA, no
    client certificate, no token, even with tls.clientCertAuth on the data port."""
    docs = render(values_files=[TLS_VALUES], api_versions=[MONITORING_API])
    [endpoint] = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == ("ops", "http", "/metrics")
    assert "tlsConfig" not in endpoint
    headless, _ = services(docs)
    assert {"name": "ops", "port": 8081, "targetPort": "ops", "protocol": "TCP"} in headless["spec"]["ports"]


def test_backup_pod_presents_the_node_certificate_under_client_cert_auth(render: Render) -> None:
    docs = render(**SCENARIOS["self-signed+client-cert-auth+auth-off"])
    [job] = by_kind(docs, "CronJob")
    [container] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert (env["KVSTORE_CERT"]["value"], env["KVSTORE_KEY"]["value"]) == (
        "/etc/kvstore/tls/tls.crt",
        "/etc/kvstore/tls/tls.key",
    )
    # auth off: the backup authenticates to /admin/ with the cluster token, sent as the Bearer token
    assert env["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "token"}


def test_notes_use_the_ca(helm: Path) -> None:
    proc = run_helm(
        helm,
        ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *_sets(SELF_SIGNED)],
    )
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"get secret {FULLNAME}-tls -o jsonpath='{{.data.ca\\.crt}}' | base64 -d > kvstore-ca.crt" in notes
    bearer = '-H "Authorization: Bearer $KVSTORE_TOKEN"'
    assert f"curl -sS --cacert kvstore-ca.crt {bearer} https://localhost:8080/kv/hello" in notes
    assert "http://127.0.0.1" not in notes and "--cert" not in notes


def test_notes_with_client_cert_auth_name_the_client_certificate(helm: Path) -> None:
    sets = [*SELF_SIGNED, "tls.clientCertAuth=true"]
    proc = run_helm(helm, ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client", *_sets(sets)])
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "curl -sS --cacert kvstore-ca.crt --cert client.crt --key client.key -H" in notes
    client_cert = "--cacert kvstore-ca.crt --cert client.crt --key client.key"
    assert f"kvstore ring --url https://localhost:8080 {client_cert}" in notes


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["tls.enabled=true"], "tls.enabled needs certificates"),
        (["tls.enabled=true", "tls.certManager.enabled=true"], "needs an issuer"),
        ([*EXISTING, "tls.certManager.enabled=true", "tls.certManager.selfSigned=true"], "both set"),
        (["tls.existingSecret=x"], "tls.enabled is false"),
        (["tls.clientCertAuth=true"], "tls.clientCertAuth needs TLS"),
    ],
)
def test_impossible_tls_values_are_refused(helm: Path, set_values: list[str], complaint: str) -> None:
    assert complaint in helm_fails(helm, set_values=set_values)


@pytest.mark.parametrize(
    "set_values",
    [
        ["tls.certManager.issuerRef.kind=Issuers"],
        ["tls.certManager.duration=90d"],
        ["tls.certManager.renewbefore=1h"],
        ["tls.mountPath=relative"],
        ["tls.clientCertAuth=yes"],
    ],
)
def test_schema_rejects_bad_tls_values(helm: Path, set_values: list[str]) -> None:
    assert "values don't meet the specifications of the schema" in helm_fails(helm, set_values=set_values)
