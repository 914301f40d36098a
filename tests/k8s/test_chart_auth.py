"""Access control in the chart (deploy/helm/kvstore, auth.* and clusterToken.*), rendered
by the real helm: the users file and the admin token in the Secret <fullname>-auth (on by
default, off with auth.enabled=false, or a users file the user made), the nodes mounting
only the users file, edits of it never rolling the pods, the helm test pod and NOTES using
the token, the schema and validateValues refusals (with the renamed cluster-token values),
and the `lookup` path: rendered against the Kubernetes API double holding the release's
Secrets, as `helm upgrade` renders, the generated tokens are kept.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.processes import NodeProcess, free_port
from tests.k8s.chart import NAMESPACE, RELEASE, run_helm, template_args
from tests.k8s.kube_api import KubeAPI, kube_api
from tests.k8s.test_chart import (
    EXISTING_SECRET,
    FULL,
    Render,
    by_kind,
    env_of,
    helm_fails,
    node_container,
    one,
    statefulset,
    validate_doc,
)

Doc = dict[str, Any]
FULLNAME = f"{RELEASE}-kvstore"
AUTH_SECRET = f"{FULLNAME}-auth"
# What the chart renders with its defaults, as the API double's discovery must map it (helm
# maps every rendered kind through discovery before a server-side dry run).
CHART_KINDS = {
    "v1/secrets": "Secret",
    "v1/services": "Service",
    "v1/serviceaccounts": "ServiceAccount",
    "v1/pods": "Pod",
    "apps/v1/statefulsets": "StatefulSet",
    "policy/v1/poddisruptionbudgets": "PodDisruptionBudget",
    "rbac.authorization.k8s.io/v1/roles": "Role",
    "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
}


def secret_data(docs: list[Doc], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret", name)["data"].items()}


def script_node(tmp_path: Path, *args: str) -> NodeProcess:
    """A one-node kvstore (not started) for the chart's pod scripts to run against."""
    port = free_port()
    return NodeProcess(
        node_id="n1",
        host="127.0.0.1",
        port=port,
        peers={"n1": f"http://127.0.0.1:{port}"},
        log_dir=tmp_path,
        args=["--replication-factor", "1", "--cluster-token", "t0ken", *args],
    )


def users_file(docs: list[Doc], name: str = AUTH_SECRET, key: str = "users.yaml") -> Doc:
    loaded: Doc = yaml.safe_load(secret_data(docs, name)[key])
    return loaded


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def pod_template(docs: list[Doc]) -> Doc:
    template: Doc = statefulset(docs)["spec"]["template"]
    return template


# -- on by default ------------------------------------------------------------------------


def test_auth_is_on_by_default_with_a_generated_admin_token_and_its_hash(render: Render) -> None:
    docs = render()
    data = secret_data(docs, AUTH_SECRET)
    assert set(data) == {"admin-token", "users.yaml"}
    token = data["admin-token"]
    assert re.fullmatch(r"[A-Za-z0-9]{40}", token), "40 alphanumerics: about 238 bits"
    assert users_file(docs) == {
        "users": {"admin": {"token_sha256": sha256(token), "roles": ["admin"]}},
        "roles": {"admin": [{"prefix": "", "permissions": ["read", "write", "admin"]}]},
    }
    assert secret_data(render(), AUTH_SECRET)["admin-token"] != token, "offline, every render draws a new token"


def test_nodes_mount_only_the_users_file_and_point_the_env_at_it(render: Render) -> None:
    docs = render()
    container = node_container(docs)
    assert env_of(container)["KVSTORE_AUTH_FILE"]["value"] == "/etc/kvstore/auth/users.yaml"
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "auth"]
    # No subPath: the kubelet then updates the file in place when the Secret changes, and the node reloads it.
    assert mount == {"name": "auth", "mountPath": "/etc/kvstore/auth", "readOnly": True}
    [volume] = [v for v in pod_template(docs)["spec"]["volumes"] if v["name"] == "auth"]
    assert volume["secret"] == {
        "secretName": AUTH_SECRET,
        "defaultMode": 0o440,
        "items": [{"key": "users.yaml", "path": "users.yaml"}],  # the hashes only, never the admin token
    }
    assert not any(item["name"] == "KVSTORE_TOKEN" for item in container["env"]), "a node holds no user token"


def test_extra_users_and_roles_join_the_chart_made_file(render: Render) -> None:
    docs = render(values_files=[FULL])
    data = secret_data(docs, "store-auth")
    assert set(data) == {"root-token", "access.yaml"}
    assert data["root-token"] == "admin-token-from-values-0123456789"
    rules = yaml.safe_load(data["access.yaml"])
    assert rules["users"]["root"] == {"token_sha256": sha256(data["root-token"]), "roles": ["admin"]}
    assert rules["users"]["alice"]["roles"] == ["app-rw"]
    assert rules["users"]["reporting"] == {"cert_cn": "reporting", "roles": ["app-ro"]}
    assert rules["users"]["ops"]["cert_cn"] == "ops" and len(rules["users"]["ops"]["token_sha256"]) == 64
    assert set(rules["roles"]) == {"admin", "app-rw", "app-ro"}
    assert rules["roles"]["app-ro"] == [
        {"prefix": "app/", "permissions": ["read"]},
        {"prefix": "shared/", "permissions": ["read"]},
    ]
    container = node_container(docs)
    assert env_of(container)["KVSTORE_AUTH_FILE"]["value"] == "/etc/kvstore/access/access.yaml"


@pytest.mark.parametrize("scenario", ["default", "full"])
def test_the_node_accepts_the_chart_made_users_file_and_the_admin_token_opens_every_key(
    render: Render, scenario: str
) -> None:
    """The file the chart writes, read by the node's own parser (app.access, what
    --auth-file loads): the admin token authenticates the admin, with read, write and
    admin over every key; the extra users keep their roles."""
    from app.access import Permission, parse_rules

    docs = render(values_files=[FULL]) if scenario == "full" else render()
    secret = "store-auth" if scenario == "full" else AUTH_SECRET
    token_key, file_key = ("root-token", "access.yaml") if scenario == "full" else ("admin-token", "users.yaml")
    data = secret_data(docs, secret)
    rules = parse_rules(data[file_key])
    admin = rules.user_for_token(data[token_key].encode())
    assert admin is not None and admin.name == ("root" if scenario == "full" else "admin")
    for permission in Permission:
        assert admin.allows(permission, b"") and admin.allows(permission, b"any/key")
    assert rules.user_for_token(b"not-the-token") is None
    if scenario == "full":
        reporting = rules.user_for_certificate(("reporting",))
        assert reporting is not None and reporting.allows(Permission.READ, b"app/x")
        assert not reporting.allows(Permission.WRITE, b"app/x") and not reporting.allows(Permission.READ, b"app2/x")


@pytest.mark.parametrize(
    "changed",
    [
        ["auth.adminToken=another-admin-token-0123"],
        ["auth.users.bob.token_sha256=" + "ab" * 32, "auth.users.bob.roles={admin}"],
        ["auth.roles.ro[0].prefix=x/", "auth.roles.ro[0].permissions={read}"],
    ],
    ids=["admin-token", "a-user", "a-role"],
)
def test_users_file_changes_do_not_roll_the_pods(render: Render, changed: list[str]) -> None:
    """The node re-reads the mounted file within about a second of the kubelet updating it: a
    change of users must not restart every pod (the users file is not in a checksum)."""
    base = render(set_values=["auth.adminToken=first-admin-token-01234"])
    other = render(set_values=["auth.adminToken=first-admin-token-01234", *changed])
    assert users_file(base) != users_file(other), "the change must reach the users file"
    assert pod_template(base) == pod_template(other)
    cluster = render(set_values=["auth.adminToken=first-admin-token-01234", "clusterToken.value=rotated-token"])
    assert pod_template(base) != pod_template(cluster), "a new cluster token (env, read at start) rolls the pods"


def test_helm_test_script_gets_401_without_the_token_and_round_trips_with_it(render: Render, tmp_path: Path) -> None:
    """The `helm test` pod's script as rendered, under /bin/sh with the real `kvstore` CLI, against
    a real node running with the chart's users file: it passes with the admin token the Secret
    reference names, and fails when the node lets a request without a token through."""
    import subprocess
    import sys

    docs = render()
    [container] = one(docs, "Pod")["spec"]["containers"]
    env = env_of(container)
    ref = env["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"]
    data = secret_data(docs, ref["name"])
    users = tmp_path / "users.yaml"
    users.write_text(data["users.yaml"])

    def run_script(node_args: list[str]) -> subprocess.CompletedProcess[str]:
        node = script_node(tmp_path, *node_args)
        node.start()
        try:
            node.wait_ready()
            return subprocess.run(
                [*container["command"], *container["args"]],
                env={
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "KVSTORE_URL": node.url,
                    "KEY": env["KEY"]["value"],
                    "KVSTORE_TOKEN": data[ref["key"]],
                },
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            node.stop()

    passed = run_script(["--auth-file", str(users)])
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "without a token: refused (401)" in passed.stdout and "OK" in passed.stdout
    open_node = run_script([])  # no access control: the script must notice the anonymous read got through
    assert open_node.returncode != 0, open_node.stdout
    assert "expected a 401" in open_node.stderr or "succeeded" in open_node.stderr, open_node.stderr


# -- off, and a users file of one's own --------------------------------------------------------


def test_auth_off_renders_no_users_file_and_no_token_for_clients(render: Render) -> None:
    docs = render(set_values=["auth.enabled=false", "backup.enabled=true"])
    assert [s["metadata"]["name"] for s in by_kind(docs, "Secret")] == [FULLNAME], "only the cluster token"
    container = node_container(docs)
    assert "KVSTORE_AUTH_FILE" not in env_of(container)
    assert not any(m["name"] == "auth" for m in container["volumeMounts"])
    assert not any(v["name"] == "auth" for v in pod_template(docs)["spec"]["volumes"])
    test_container = one(docs, "Pod")["spec"]["containers"][0]
    assert "KVSTORE_TOKEN" not in env_of(test_container) and "401" not in test_container["args"][0]
    [job] = by_kind(docs, "CronJob")
    backup_env = env_of(job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0])
    # /admin/ takes the cluster token (as a Bearer token too) when access control is off.
    assert backup_env["KVSTORE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": FULLNAME, "key": "token"}}
    for doc in docs:
        validate_doc(doc)


def test_existing_users_secret_is_mounted_and_gives_the_clients_their_token(render: Render) -> None:
    docs = render(values_files=[EXISTING_SECRET], set_values=["backup.enabled=true"])
    assert not by_kind(docs, "Secret")
    [job] = by_kind(docs, "CronJob")
    backup_env = env_of(job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0])
    assert backup_env["KVSTORE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "kvstore-users", "key": "ops-token"}}
    [volume] = [v for v in pod_template(docs)["spec"]["volumes"] if v["name"] == "auth"]
    assert volume["secret"]["secretName"] == "kvstore-users"


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["auth.enabled=maybe"], "/auth/enabled"),
        (["auth.users.bob.token_sha256=not-hex", "auth.users.bob.roles={admin}"], "/auth/users/bob/token_sha256"),
        (["auth.users.bob.roles={admin}"], "/auth/users/bob"),  # neither a token hash nor a certificate CN
        (["auth.users.bob.cert_cn=bob", "auth.users.bob.role=admin"], "role"),
        (["auth.roles.ro[0].prefix=x/", "auth.roles.ro[0].permissions={delete}"], "/auth/roles/ro/0/permissions/0"),
        (["auth.roles.ro[0].permissions={read}"], "prefix"),
        (["auth.adminToken=short"], "/auth/adminToken"),
        (["auth.usersFileKey=a/b"], "/auth/usersFileKey"),
        (["auth.existingSecret=Not_A_Name"], "/auth/existingSecret"),
        (["opsPort=0"], "/opsPort"),
        (["clusterToken.tokn=x"], "tokn"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects_bad_auth_values(helm: Path, set_values: list[str], complaint: str) -> None:
    stderr = helm_fails(helm, set_values=set_values)
    assert "schema" in stderr and complaint in stderr, stderr


@pytest.mark.parametrize(
    ("set_values", "complaint"),
    [
        (["auth.token=abc"], "auth.token is the cluster token's old name"),
        (["auth.secretKey=token"], "auth.secretKey is the cluster token's old key setting"),
        (["auth.existingSecret=mine", "auth.adminToken=admin-token-0123456789"], "auth.existingSecret is set together"),
        (["auth.users.admin.cert_cn=x", "auth.users.admin.roles={admin}"], "auth.users has a user admin"),
        (["auth.roles.admin[0].prefix=x/", "auth.roles.admin[0].permissions={read}"], "auth.roles defines `admin`"),
        (["auth.users.bob.cert_cn=bob", "auth.users.bob.roles={nope}"], "has the role nope, which auth.roles"),
        (["auth.enabled=false", "auth.existingSecret=mine"], "but auth.enabled is false"),
    ],
)
def test_validate_values_refuses_impossible_auth_values(helm: Path, set_values: list[str], complaint: str) -> None:
    stderr = helm_fails(helm, set_values=set_values)
    assert complaint in stderr and "Fix:" in stderr, stderr


def test_all_auth_refusals_are_reported_at_once(helm: Path) -> None:
    stderr = helm_fails(helm, set_values=["auth.token=abc", "auth.secretKey=k", "opsPort=8080"])
    assert "auth.token" in stderr and "auth.secretKey" in stderr and "opsPort" in stderr, stderr


# -- the lookup path: what `helm upgrade` renders against the cluster ------------------------------


def helm_ownership(doc: Doc) -> Doc:
    """The Secret as helm leaves it in the cluster after an install (its ownership marks)."""
    stored = {**doc, "metadata": {**doc["metadata"]}}
    stored["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), "app.kubernetes.io/managed-by": "Helm"}
    stored["metadata"]["annotations"] = {
        "meta.helm.sh/release-name": RELEASE,
        "meta.helm.sh/release-namespace": NAMESPACE,
    }
    return stored


def render_against(helm: Path, api: KubeAPI, tmp_path: Path, *, set_values: tuple[str, ...] = ()) -> list[Doc]:
    """`helm template --dry-run=server`: the chart rendered with lookup answered by the API
    double, as `helm upgrade` renders it (the release's objects are in the cluster)."""
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
    args = [
        *template_args(set_values=set_values),
        "--kubeconfig",
        str(kubeconfig),
        "--dry-run=server",
        "--disable-openapi-validation",  # the double serves no OpenAPI document
    ]
    env = {**os.environ, "KUBECACHEDIR": str(tmp_path / "kube-cache")}  # client-go's discovery cache
    proc = run_helm(helm, args, env=env)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_generated_tokens_survive_an_upgrade_through_lookup(helm: Path, render: Render, tmp_path: Path) -> None:
    installed = render()
    admin_token = secret_data(installed, AUTH_SECRET)["admin-token"]
    cluster_token = secret_data(installed, FULLNAME)["token"]
    with kube_api() as api:
        api.declare_kinds(CHART_KINDS)
        upgraded_from_nothing = render_against(helm, api, tmp_path)  # a first install: nothing to look up
        for secret in by_kind(installed, "Secret"):
            api.create_secret(helm_ownership(secret))
        upgraded = render_against(helm, api, tmp_path)
        again = render_against(helm, api, tmp_path)
        given = render_against(helm, api, tmp_path, set_values=("auth.adminToken=now-given-in-values-0123",))
        looked_up = [params for action, params in api.requests(plural="secrets") if action != "create"]
    assert looked_up, "helm never asked the API for the Secrets: the lookup path was not taken"
    assert secret_data(upgraded_from_nothing, AUTH_SECRET)["admin-token"] != admin_token
    for docs in (upgraded, again):
        assert secret_data(docs, AUTH_SECRET)["admin-token"] == admin_token
        assert secret_data(docs, AUTH_SECRET)["users.yaml"] == secret_data(installed, AUTH_SECRET)["users.yaml"]
        assert secret_data(docs, FULLNAME)["token"] == cluster_token
        assert pod_template(docs) == pod_template(installed), "an upgrade with the same values rolls no pod"
    assert secret_data(given, AUTH_SECRET)["admin-token"] == "now-given-in-values-0123", "values win over the store"
    assert users_file(given)["users"]["admin"]["token_sha256"] == sha256("now-given-in-values-0123")


def test_an_existing_secret_holding_a_cluster_token_is_refused_with_the_rename(
    helm: Path, render: Render, tmp_path: Path
) -> None:
    """An upgrader whose auth.existingSecret still names the Secret of the cluster token (its
    meaning before chart 0.2.0) is told, when the chart can look the Secret up, what moved."""
    old = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kvstore-token", "namespace": NAMESPACE},
        "data": {"token": base64.b64encode(b"a-cluster-token").decode()},
    }
    with kube_api() as api:
        api.declare_kinds(CHART_KINDS)
        api.create_secret(old)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)
        args = [*template_args(set_values=["auth.existingSecret=kvstore-token"]), "--kubeconfig", str(kubeconfig)]
        proc = run_helm(
            helm,
            [*args, "--dry-run=server", "--disable-openapi-validation"],
            env={**os.environ, "KUBECACHEDIR": str(tmp_path / "kube-cache")},
        )
    assert proc.returncode != 0
    assert "auth.existingSecret kvstore-token has no key users.yaml" in proc.stderr, proc.stderr
    assert "clusterToken.existingSecret" in proc.stderr and "Fix:" in proc.stderr, proc.stderr
