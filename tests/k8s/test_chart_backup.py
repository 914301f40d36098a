"""The chart's scheduled backup (backup.* values): absent by default; when on,
a CronJob and its claim that validate strictly, carry the nodes' cluster
token, run hardened, and are admitted by the NetworkPolicy; the values
schema refuses bad backup values; and the CronJob's own script, run with the
real `kvstore` against a real node, writes a backup and prunes old ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.chart import CHART_CI_VALUES, Render
from tests.k8s.test_chart import by_kind, helm_fails, one, statefulset, validate_doc
from tests.k8s.test_chart_auth import script_node, secret_data
from tests.k8s.test_chart_tls import TLS_VALUES, validate

BACKUP_VALUES = CHART_CI_VALUES / "backup-values.yaml"
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {"set_values": ["backup.enabled=true"]},
    "defaults+network-policy": {"set_values": ["backup.enabled=true", "networkPolicy.enabled=true"]},
    "existing-claim+network-policy": {"values_files": [BACKUP_VALUES]},
    "tls": {"values_files": [TLS_VALUES], "set_values": ["backup.enabled=true"]},
    "no-provisioner": {
        "set_values": ["backup.enabled=true", "backup.persistence.storageClass=-", "backup.compression=none"]
    },
}


def cronjob(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "CronJob")


def backup_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = cronjob(docs)["spec"]["jobTemplate"]["spec"]["template"]
    return spec


def test_no_backup_resources_by_default(render: Render) -> None:
    docs = render()
    assert not by_kind(docs, "CronJob")
    assert not by_kind(docs, "PersistentVolumeClaim")
    policy = one(render(set_values=["networkPolicy.enabled=true"]), "NetworkPolicy")
    assert "backup" not in str(policy["spec"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_backup_manifests_validate_strictly(render: Render, scenario: str) -> None:
    docs = render(**SCENARIOS[scenario])
    for doc in docs:
        validate(doc)  # strict Kubernetes schemas; cert-manager's kinds (tls scenario) by their own check
        assert doc["metadata"]["labels"]["app.kubernetes.io/component"]
    assert cronjob(docs)


def test_cronjob_runs_kvstore_backup_with_the_admin_token(render: Render) -> None:
    docs = render(values_files=[BACKUP_VALUES])
    job = cronjob(docs)
    assert job["spec"]["schedule"] == "30 2 * * *"
    assert job["spec"]["timeZone"] == "Europe/Berlin"
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = backup_pod(docs)["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    # Backups need `admin`: the chart's admin token, sent as the Bearer token (KVSTORE_TOKEN).
    assert env["KVSTORE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "kv-kvstore-auth", "key": "admin-token"}}
    assert one(docs, "Secret", "kv-kvstore-auth")["data"]["admin-token"]
    assert "KVSTORE_CLUSTER_TOKEN" not in env, "the cluster token is the nodes' own, not a client's"
    assert env["KVSTORE_URL"]["value"] == "http://kv-kvstore.store.svc.cluster.local:8080"
    assert env["BACKUP_KEEP"]["value"] == "3"
    assert env["BACKUP_ARGS"]["value"] == "--compression zstd --pace 0.5"
    assert "kvstore backup $BACKUP_ARGS" in container["args"][0]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    claim = next(v for v in pod["volumes"] if v["name"] == "backups")
    assert claim["persistentVolumeClaim"]["claimName"] == "kvstore-backups"
    assert not by_kind(docs, "PersistentVolumeClaim"), "an existing claim is used, not made"


def test_cronjob_verifies_the_nodes_with_the_release_ca_under_tls(render: Render) -> None:
    docs = render(values_files=[TLS_VALUES], set_values=["backup.enabled=true"])
    [container] = backup_pod(docs)["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["KVSTORE_URL"].startswith("https://")
    node_spec = statefulset(docs)["spec"]["template"]["spec"]
    tls_volume = next(v for v in node_spec["volumes"] if v["name"] == "tls")
    assert next(v for v in backup_pod(docs)["spec"]["volumes"] if v["name"] == "tls") == tls_volume
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True
    assert env["KVSTORE_CACERT"] == f"{mount['mountPath']}/ca.crt"


def test_chart_made_claim_outlives_the_release(render: Render) -> None:
    docs = render(
        set_values=["backup.enabled=true", "backup.persistence.size=20Gi", "backup.persistence.storageClass=fast"]
    )
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    volume = next(v for v in backup_pod(docs)["spec"]["volumes"] if v["name"] == "backups")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    env = {item["name"]: item for item in backup_pod(docs)["spec"]["containers"][0]["env"]}
    assert env["BACKUP_ARGS"]["value"] == "--compression zstd", "no --pace unless asked: the server's default"


def test_backup_pod_is_hardened_like_the_nodes(render: Render) -> None:
    docs = render(set_values=["backup.enabled=true"])
    pod = backup_pod(docs)["spec"]
    nodes = statefulset(docs)["spec"]["template"]["spec"]
    assert pod["securityContext"] == nodes["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    ctx = container["securityContext"]
    assert ctx == nodes["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert "memory" in container["resources"]["limits"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/backups", "/tmp"}, "the only writable paths"


def test_network_policy_admits_the_backup_pods(render: Render) -> None:
    docs = render(values_files=[BACKUP_VALUES])  # allowClientLabel false: only the explicit rule lets them in
    labels = backup_pod(docs)["metadata"]["labels"]
    rule = next(r for r in one(docs, "NetworkPolicy")["spec"]["ingress"] if r["ports"][0]["port"] == "http")
    admitted = [
        peer
        for peer in rule["from"]
        if set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert admitted, "no ingress rule selects the backup pods"
    node_selector = statefulset(docs)["spec"]["selector"]["matchLabels"]
    assert not node_selector.items() <= labels.items(), "backup pods must not look like nodes to the Services"


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["backup.enabled=true", "backup.keep=0"], "/backup/keep"),
        (["backup.enabled=true", "backup.compression=lz4"], "/backup/compression"),
        (["backup.enabled=true", "backup.schedule=daily"], "/backup/schedule"),
        (["backup.enabled=true", "backup.pace=2"], "/backup/pace"),
        (["backup.enabled=true", "backup.persistence.sizee=1Gi"], "sizee"),
        (["backup.retention=3"], "retention"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects_bad_backup_values(helm: Path, set_values: list[str], complaint: str) -> None:
    stderr = helm_fails(helm, set_values=set_values)
    assert "schema" in stderr and complaint in stderr, stderr


def test_the_cronjob_script_backs_up_and_prunes(render: Render, tmp_path: Path) -> None:
    """The rendered script itself, under /bin/sh, with the real `kvstore` CLI
    on PATH, against a real single node running with the chart's users file
    (--auth-file) and given the chart's admin token as the Secret reference says:
    a new verified file, and only the newest `keep` backup files left (other
    files untouched). Without the token the same script fails (401)."""
    docs = render(set_values=["backup.enabled=true", "backup.keep=2"])
    [container] = backup_pod(docs)["spec"]["containers"]
    env = {item["name"]: item.get("value", "") for item in container["env"]}
    ref = next(item for item in container["env"] if item["name"] == "KVSTORE_TOKEN")["valueFrom"]["secretKeyRef"]
    auth = secret_data(docs, ref["name"])
    users = tmp_path / "users.yaml"
    users.write_text(auth["users.yaml"])
    node = script_node(tmp_path, "--auth-file", str(users))
    backups = tmp_path / "backups"
    backups.mkdir()
    for stamp in ("20240101T000000Z", "20240102T000000Z", "20240103T000000Z"):
        (backups / f"kvstore-{stamp}.kvbak").write_bytes(b"old")
    (backups / "notes.txt").write_text("not a backup")
    node.start()
    try:
        node.wait_ready()
        script_env = {
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "KVSTORE_URL": node.url,
            "BACKUP_DIR": str(backups),
            "BACKUP_KEEP": env["BACKUP_KEEP"],
            "BACKUP_ARGS": env["BACKUP_ARGS"],
        }
        refused = subprocess.run(
            [*container["command"], *container["args"]],
            env=script_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        done = subprocess.run(
            [*container["command"], *container["args"]],
            env={**script_env, "KVSTORE_TOKEN": auth[ref["key"]]},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        node.stop()
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    assert done.returncode == 0, done.stderr
    left = sorted(path.name for path in backups.iterdir())
    assert len(left) == 3 and "notes.txt" in left and "kvstore-20240103T000000Z.kvbak" in left, left
    [new] = [name for name in left if name.startswith("kvstore-") and not name.startswith("kvstore-2024")]
    assert (backups / new).read_bytes().startswith(b"KVSTORE-BACKUP")
    assert "pruned kvstore-20240101T000000Z.kvbak" in done.stdout


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_restore_job_is_valid_kubernetes() -> None:
    """The README's restore-from-the-backup-volume Job, as an operator pastes it."""
    text = README.read_text()
    start = text.index("kubectl -n store apply -f - <<'EOF'\n") + len("kubectl -n store apply -f - <<'EOF'\n")
    job = yaml.safe_load(text[start : text.index("\nEOF\n", start)])
    job["metadata"]["namespace"] = "store"
    validate_doc(job)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert "kvstore restore" in container["args"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_readme_documents_every_backup_value() -> None:
    values = yaml.safe_load((CHART_CI_VALUES.parent / "values.yaml").read_text())["backup"]
    text = README.read_text()
    keys = [f"backup.{k}" for k in values if k != "persistence"]
    keys += [f"backup.persistence.{k}" for k in values["persistence"] if k != "accessModes"]
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, f"README's backup values table lacks {missing}"
