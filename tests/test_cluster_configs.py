"""The cluster configurations in cluster/: they must be accepted by the tools that read them, and
they must keep the promises cluster/README.md makes (head runs no trial, shared storage through
the KDSWEEP_* environment, no credential in a file, image tags equal to the installed Ray).

`ray up` files are checked by Ray's own code, exactly as `ray up` checks them before it talks to
a cloud: `ray.autoscaler._private.util.prepare_config` (merges the provider's defaults.yaml,
checks the docker section, fills min/max workers) and then `validate_config`, which validates
against the `ray-schema.json` shipped inside the installed ray package. Neither contacts a cloud
or imports a cloud SDK (asserted below). The schema does not look inside a provider's
`node_config` (instance types, images...), which only the cloud can judge.

KubeRay manifests: we found no PyPI package that ships KubeRay's CRD (OpenAPI) schemas, and a
test has neither kubectl nor a Kubernetes API server, so the fields that KubeRay's ray.io/v1 API
types (RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, RayJobSpec) require are checked explicitly
here, together with the field names each type accepts (a misspelled field is silently dropped by
Kubernetes, or rejected by strict validation) and the types KubeRay insists on (rayStartParams
values are strings).
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RAY_VERSION = ray.__version__
ENV_CONTRACT = ("KDSWEEP_STORAGE", "KDSWEEP_TEACHERS", "KDSWEEP_OPTUNA", "MLFLOW_TRACKING_URI")
CLOUD_SDKS = ("boto3", "botocore", "googleapiclient", "google.cloud", "google.auth", "kubernetes")


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_kube(path: Path) -> bool:
    return any(isinstance(d, dict) and "apiVersion" in d for d in _docs(path))


def _is_ray_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("apiVersion") == "ray.io/v1"


YAMLS = sorted(CLUSTER.glob("*.yaml"))
RAY_UP = [p for p in YAMLS if not _is_kube(p)]
KUBE = [p for p in YAMLS if any(_is_ray_doc(d) for d in _docs(p))]  # RayCluster, RayJob
NETWORK = [p for p in YAMLS if _is_kube(p) and p not in KUBE]  # NetworkPolicy objects


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_cluster_folder_has_every_config() -> None:
    """Guards the parametrised tests below against running on nothing."""
    assert {p.name for p in RAY_UP} >= {"aws.yaml", "gcp.yaml", "local.yaml"}
    kinds = {d["kind"] for p in KUBE for d in _docs(p)}
    assert kinds >= {"RayCluster", "RayJob"}
    assert (CLUSTER / "README.md").is_file()


# --- ray up -------------------------------------------------------------------------------------
def _prepared(path: Path) -> dict[str, Any]:
    (config,) = _docs(path)
    return prepare_config(copy.deepcopy(config))


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_config_passes_rays_own_validation(path: Path) -> None:
    schema = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert schema.is_file(), "the installed ray no longer ships ray-schema.json"
    before = set(sys.modules)
    prepared = _prepared(path)
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad file
    loaded = {m for m in set(sys.modules) - before if m.startswith(CLOUD_SDKS)}
    assert not loaded, f"validation imported cloud SDKs: {sorted(loaded)}"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _setup(prepared: dict[str, Any], role: str) -> str:
    """Every command run on a head or worker node before and at `ray start`, as one text."""
    keys = {
        "head": ("initialization_commands", "head_setup_commands", "head_start_ray_commands"),
        "worker": ("initialization_commands", "worker_setup_commands", "worker_start_ray_commands"),
    }[role]
    cmds = [c for k in keys for c in prepared.get(k, [])]
    head = prepared["head_node_type"]
    for name, node in prepared["available_node_types"].items():
        if (name == head) == (role == "head"):  # a node type's own commands
            cmds += node.get("initialization_commands", [])
    return "\n".join(cmds)


def _exports(text: str) -> dict[str, str]:
    """NAME=value pairs the setup commands write into the nodes' environment."""
    out = {}
    for m in re.finditer(r"""['"]?(?:export\s+)?([A-Z][A-Z0-9_]*)=([^'"\s;]+)""", text):
        out.setdefault(m.group(1), m.group(2))
    return out


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_head_runs_no_trial_and_keeps_the_dashboard_local(path: Path) -> None:
    prepared = _prepared(path)
    head = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--num-cpus=0" in head and "--num-gpus=0" in head, "the head must offer no CPU/GPU"
    assert "--dashboard-host" not in head, "the dashboard must stay on 127.0.0.1 (SSH tunnel)"
    head_type = prepared["available_node_types"][prepared["head_node_type"]]
    if head_type.get("resources"):  # cloud providers: what the autoscaler plans with
        assert head_type["resources"].get("CPU") == 0
        assert head_type["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_installs_kdsweep_and_points_at_shared_storage(path: Path) -> None:
    prepared = _prepared(path)
    assert prepared["file_mounts"].get("~/kdsweep") == ".", "the checkout is synced to every node"
    scheme = {"aws": "s3://", "gcp": "gs://", "local": "/"}[prepared["provider"]["type"]]
    for role in ("head", "worker"):
        text = _setup(prepared, role)
        assert re.search(r"pip install .*~/kdsweep.*psycopg2-binary", text), role
        env = _exports(text)
        missing = [k for k in ENV_CONTRACT if k not in env]
        assert not missing, f"{role} nodes lack {missing}"
        assert env["KDSWEEP_STORAGE"].startswith(scheme), env["KDSWEEP_STORAGE"]
        assert env["KDSWEEP_TEACHERS"].startswith(scheme), env["KDSWEEP_TEACHERS"]
        # a user name but never a password in the URL: libpq reads PGPASSWORD
        assert re.match(r"postgresql\+psycopg2://[^:/@]+@[^/]+/\w+", env["KDSWEEP_OPTUNA"])
        assert env["MLFLOW_TRACKING_URI"].startswith("http://")
        assert env["RAY_AUTH_MODE"] == "token", "every node must require Ray's token"
    assert "mlflow server" in _setup(prepared, "head")
    assert "mlflow server" not in _setup(prepared, "worker")


CLOUD = [p for p in RAY_UP if p.name != "local.yaml"]


@pytest.mark.parametrize("path", CLOUD, ids=_ids(CLOUD))
def test_ray_up_gpu_workers_are_spot_and_the_head_is_not(path: Path) -> None:
    prepared = _prepared(path)
    provider = prepared["provider"]["type"]
    head_name = prepared["head_node_type"]

    def spot(node_config: dict[str, Any]) -> bool:
        if provider == "aws":
            return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        sched = node_config.get("scheduling", {})
        return sched.get("provisioningModel") == "SPOT" or sched.get("preemptible") is True

    workers = {k: v for k, v in prepared["available_node_types"].items() if k != head_name}
    assert workers
    assert not spot(prepared["available_node_types"][head_name]["node_config"])
    for name, node in workers.items():
        assert spot(node["node_config"]), f"{name} should be spot/preemptible"
        assert node["resources"].get("GPU", 0) >= 1, f"{name} should be a GPU node type"
        assert node["max_workers"] > node["min_workers"] == 0, "GPU workers should autoscale"


# --- images and versions ------------------------------------------------------------------------
def _kube_containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    out = [("head", c) for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        name = g.get("groupName") or f"workerGroupSpecs[{i}]"
        out += [(name, c) for c in g["template"]["spec"]["containers"]]
    return out


def test_images_and_pins_match_the_installed_ray() -> None:
    """Ray refuses to mix versions in one cluster (and `ray up`/`ray job submit` with it)."""
    tag = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-py311(-gpu)?$")
    for path in RAY_UP:
        prepared = _prepared(path)
        docker = prepared.get("docker") or {}
        images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
        if images:
            assert all(tag.match(i) for i in images), (path.name, images)
            assert "-gpu" not in docker["head_image"], "the head runs no CUDA: CPU image"
        else:  # no containers: the setup pins Ray itself
            pins = re.findall(r"ray\[[a-z,]+\]==([\w.]+)", _setup(prepared, "head"))
            assert pins == [RAY_VERSION], (path.name, pins)
    for path in KUBE:
        for doc in _docs(path):
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["rayVersion"] == RAY_VERSION, path.name
            for group, c in _kube_containers(doc):
                assert tag.match(c["image"]), (path.name, group, c["image"])
                if group == "head":
                    assert "-gpu" not in c["image"]


# --- no credentials in files --------------------------------------------------------------------
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN(?!_PATH)|ACCESS_KEY|CREDENTIAL", re.I)


@pytest.mark.parametrize("path", YAMLS, ids=_ids(YAMLS))
def test_no_credentials_in_cluster_files(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"://[^/\s:@'\"]+:[^/\s@'\"]+@", text), "password inside a URL"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "AWS access key"
    for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)=(\S+)", text):
        if re.fullmatch(r"[.…),;\]'\"]*|[$%<].*", value):
            continue  # a placeholder in a comment (PGPASSWORD=...) or a variable reference
        assert not SECRET_NAME.search(name), f"{path.name} assigns {name}: use a secret"
    for doc in _docs(path):
        if _is_ray_doc(doc):
            for group, c in _kube_containers(doc):
                for e in c.get("env", []):
                    if SECRET_NAME.search(e["name"]):
                        assert "value" not in e, f"{group}: {e['name']} must come from a Secret"
                        assert "secretKeyRef" in e.get("valueFrom", {}), e


# --- KubeRay ------------------------------------------------------------------------------------
# Field names of KubeRay's ray.io/v1 types (KubeRay 1.5/1.6).
CLUSTER_SPEC = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions",
}  # fmt: skip
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template",
              "resources", "labels"}  # fmt: skip
WORKER_GROUP = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "suspend",
    "numOfHosts", "rayStartParams", "template", "scaleStrategy", "resources", "labels",
}  # fmt: skip
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}  # fmt: skip
JOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _unknown(obj: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(obj) - known)
    assert not extra, f"{where}: unknown field(s) {extra}; allowed: {sorted(known)}"


def _check_pod_template(template: Any, where: str) -> None:
    assert isinstance(template, dict) and isinstance(template.get("spec"), dict), where
    containers = template["spec"].get("containers")
    assert isinstance(containers, list) and containers, f"{where}: template.spec.containers"
    for c in containers:
        assert isinstance(c.get("name"), str) and c["name"], f"{where}: container name"
        assert isinstance(c.get("image"), str) and c["image"], f"{where}: container image"


def _check_start_params(params: Any, where: str) -> None:
    # map[string]string in KubeRay: `num-cpus: 0` (an int) is rejected by the API server
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    bad = {k: v for k, v in params.items() if not isinstance(v, str)}
    assert not bad, f"{where}: rayStartParams values must be strings (quote them): {bad}"


def _check_cluster_spec(spec: Any, where: str) -> None:
    assert isinstance(spec, dict), where
    _unknown(spec, CLUSTER_SPEC, where)
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec is required"
    _unknown(head, HEAD_GROUP, f"{where}.headGroupSpec")
    assert "rayStartParams" in head, f"{where}.headGroupSpec: rayStartParams is required"
    _check_start_params(head["rayStartParams"], f"{where}.headGroupSpec")
    _check_pod_template(head.get("template"), f"{where}.headGroupSpec.template")
    if "autoscalerOptions" in spec:
        _unknown(spec["autoscalerOptions"], AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    if "authOptions" in spec:
        assert spec["authOptions"].get("mode") in ("token", "disabled"), spec["authOptions"]
    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs"
    names = []
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        assert isinstance(g, dict), w
        _unknown(g, WORKER_GROUP, w)
        assert isinstance(g.get("groupName"), str) and g["groupName"], f"{w}: groupName"
        names.append(g["groupName"])
        counts = {k: g.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        assert all(isinstance(v, int) for v in counts.values()), f"{w}: {counts}"
        assert 0 <= counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"], w
        assert "rayStartParams" in g, f"{w}: rayStartParams is required"
        _check_start_params(g["rayStartParams"], w)
        _check_pod_template(g.get("template"), f"{w}.template")
    assert len(set(names)) == len(names), f"{where}: groupName repeated: {names}"


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kuberay_manifest_has_the_fields_kuberay_requires(path: Path) -> None:
    for doc in _docs(path):
        assert doc.get("apiVersion") == "ray.io/v1", path.name
        assert doc.get("kind") in ("RayCluster", "RayJob"), doc.get("kind")
        assert DNS_LABEL.match(doc.get("metadata", {}).get("name", "")), doc.get("metadata")
        spec = doc.get("spec")
        assert isinstance(spec, dict), f"{path.name}: spec"
        if doc["kind"] == "RayCluster":
            _check_cluster_spec(spec, f"{path.name}: spec")
            continue
        _unknown(spec, JOB_SPEC, f"{path.name}: spec")
        assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()
        _check_cluster_spec(spec.get("rayClusterSpec"), f"{path.name}: spec.rayClusterSpec")
        assert spec.get("submissionMode", "K8sJobMode") in (
            "K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")  # fmt: skip
        # the cluster goes away when the sweep ends, after a TTL to read its logs
        assert spec.get("shutdownAfterJobFinishes") is True
        ttl = spec.get("ttlSecondsAfterFinished")
        assert isinstance(ttl, int) and ttl >= 0
        for k in ("backoffLimit", "activeDeadlineSeconds"):
            assert isinstance(spec.get(k, 0), int) and spec.get(k, 0) >= 0, k
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kuberay_installs_kdsweep_and_points_at_shared_storage(path: Path) -> None:
    for doc in _docs(path):
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", "no trial on the head"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", "no external address"
        assert not head.get("enableIngress"), "no ingress to the dashboard"
        assert spec.get("authOptions", {}).get("mode") == "token"
        # our command replaces KubeRay's: it must still end in KubeRay's generated `ray start`
        assert doc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        for group, c in _kube_containers(doc):
            cmd = " ".join(c.get("command", []) + c.get("args", []))
            assert re.search(r"pip install .*KDSWEEP_PIP_SPEC.*psycopg2-binary", cmd), group
            assert cmd.rstrip().endswith("$KUBERAY_GEN_RAY_START_CMD"), group
            env = {e["name"]: e for e in c.get("env", [])}
            missing = [k for k in ENV_CONTRACT if k not in env]
            assert not missing, f"{path.name} {group}: env lacks {missing}"
            assert env["KDSWEEP_STORAGE"]["value"].startswith(("s3://", "gs://", "/"))
            assert re.match(
                r"postgresql\+psycopg2://[^:/@]+@[^/]+/\w+", env["KDSWEEP_OPTUNA"]["value"]
            )
            if group != "head":
                limits = c.get("resources", {}).get("limits", {})
                assert str(limits.get("nvidia.com/gpu", "0")) != "0", f"{group}: GPU limit"
        head_env = {e["name"] for _, c in _kube_containers(doc)[:1] for e in c["env"]}
        assert "PGPASSWORD" in head_env, "the driver (on the head) needs the Optuna password"


# --- issue 19, item 6: locked-down pods, network policy, pinned code, password on the head ------
LOCKED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
PINNED = r"(?:[0-9a-f]{40}|COMMIT_SHA)"  # a commit, or the placeholder cluster/README.md explains


def _ray_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kuberay_containers_run_locked_down(path: Path) -> None:
    """Every Ray container and the autoscaler sidecar: non-root (with a numeric user, which
    runAsNonRoot needs for an image whose USER is a name), no privilege escalation, no
    capabilities, the runtime's seccomp profile."""
    for doc in _docs(path):
        checked = [(g, c.get("securityContext") or {}) for g, c in _kube_containers(doc)]
        checked.append(("autoscaler", _ray_spec(doc)["autoscalerOptions"].get("securityContext")))
        for group, sc in checked:
            assert isinstance(sc, dict), f"{path.name} {group}: no securityContext"
            got = {k: sc.get(k) for k in LOCKED}
            assert got == LOCKED, f"{path.name} {group}: {got}"
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, group


@pytest.mark.parametrize("path", KUBE, ids=_ids(KUBE))
def test_kuberay_installs_kdsweep_at_a_commit(path: Path) -> None:
    for doc in _docs(path):
        for group, c in _kube_containers(doc):
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            assert re.fullmatch(rf"kdsweep @ git\+https://\S+@{PINNED}", env["KDSWEEP_PIP_SPEC"]), (
                path.name,
                group,
                env["KDSWEEP_PIP_SPEC"],
            )
        if doc["kind"] == "RayJob":
            wd = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"]
            assert re.search(rf"/archive/{PINNED}\.zip$", wd), wd
    assert "COMMIT_SHA" in (CLUSTER / "README.md").read_text()


def _policies() -> list[dict[str, Any]]:
    return [d for p in NETWORK for d in _docs(p) if d.get("kind") == "NetworkPolicy"]


def test_network_policies_keep_the_dashboard_and_mlflow_inside() -> None:
    """The head (dashboard 8265, GCS, client) and MLflow accept connections only from pods
    selected by label (this namespace; the operator for the dashboard), never from anywhere."""
    policies = _policies()
    assert policies, "cluster/ has no NetworkPolicy"
    by_target = {}
    for pol in policies:
        spec = pol["spec"]
        assert spec.get("policyTypes") == ["Ingress"], pol["metadata"]
        target = spec["podSelector"].get("matchLabels", {})
        assert target, f"{pol['metadata']['name']}: selects every pod"
        for rule in spec.get("ingress", []):
            assert rule.get("from"), f"{pol['metadata']['name']}: a rule open to every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                assert "podSelector" in peer, f"{pol['metadata']['name']}: a whole namespace"
        by_target[tuple(sorted(target.items()))] = spec
    head = by_target[(("ray.io/node-type", "head"),)]
    assert head["ingress"], "the head must be reachable by its own cluster"
    mlflow = [s for t, s in by_target.items() if ("app", "mlflow") in t]
    assert mlflow, "no policy for the MLflow server"
    (rule,) = mlflow[0]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5000]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}]


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_database_password_reaches_the_head_only(path: Path) -> None:
    """`file_mounts` and `setup_commands` reach every node: neither carries the password; the
    head's own setup loads it."""
    prepared = _prepared(path)
    everywhere = "\n".join(prepared.get("setup_commands", []) + list(prepared["file_mounts"]))
    everywhere += "\n" + _setup(prepared, "worker")
    assert not re.search(r"postgres\.env|PGPASSWORD|secretsmanager", everywhere, re.I), path.name
    head = "\n".join(prepared.get("head_setup_commands", []))
    assert "~/.kdsweep/postgres.env" in head and "set -a" in head, path.name
    assert "kdsweep-secrets/postgres.env" not in path.read_text(), "synced to every worker"
