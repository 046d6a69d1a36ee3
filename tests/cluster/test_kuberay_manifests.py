"""cluster/kuberay, offline: every manifest validates against KubeRay's RayService / RayCluster CRD
schemas (tests/cluster/crds) or Kubernetes' own schemas, and the rules the API server and the
KubeRay operator enforce beyond them; the kustomizations build (as `kubectl kustomize` does, where
kubectl exists); serveConfigV2 is cluster/serve.yaml, parses as a Serve config, and its import path
builds the app; and the RayService fits that config (ports, Redis, GPUs, replica counts, image)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from k8s_checks import (
    check_object,
    check_references,
    kubectl_kustomize,
    kuberay_rules,
    quantity,
    render_kustomization,
    validate_crd,
)

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
KUSTOMIZATIONS = sorted(p.parent for p in KUBERAY.rglob("kustomization.yaml"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def referenced_files() -> tuple[set[Path], set[Path]]:
    """(resource files, patch files) that some kustomization names."""
    resources, patches = set(), set()
    for root in KUSTOMIZATIONS:
        k = yaml.safe_load((root / "kustomization.yaml").read_text())
        resources |= {(root / r).resolve() for r in k.get("resources", []) if (root / r).is_file()}
        patches |= {(root / p["path"]).resolve() for p in k.get("patches", [])}
    return resources, patches


def manifest_files() -> list[Path]:
    resources, _ = referenced_files()
    return sorted(resources)


def rayservice(objs: list[dict]) -> dict:
    (rs,) = [o for o in objs if o["kind"] == "RayService"]
    return rs


def serve_config_v2(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def problems_of(objs: list[dict], references: bool = True) -> list[str]:
    """Every object's problems; with `references`, also those between the objects (a set that
    is deployed together)."""
    problems = [p for o in objs for p in check_object(o)]
    problems += [p for o in objs if o["kind"] == "RayService" for p in kuberay_rules(o)]
    return problems + (check_references(objs) if references else [])


def _key(o: dict) -> tuple:
    return o["kind"], o["metadata"]["name"]


# -- the files ---------------------------------------------------------------------------------
def test_every_yaml_file_is_used_by_a_kustomization():
    assert [p.relative_to(KUBERAY) for p in KUSTOMIZATIONS] == [Path("."), Path("base"), Path("gcs-ft")]
    resources, patches = referenced_files()
    for path in KUBERAY.rglob("*.y*ml"):
        assert path.name == "kustomization.yaml" or path.resolve() in resources | patches, f"{path} is in no kustomization"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERAY)))
def test_each_manifest_file_validates(path):
    objs = load_all(path)
    assert objs and all(o.get("apiVersion") and o.get("kind") for o in objs)
    problems = problems_of(objs, references=False)  # a Secret in another file: checked per kustomization
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERAY)) or "kuberay")
def test_kustomization_builds_valid_manifests(root):
    objs = render_kustomization(root)
    real = kubectl_kustomize(root)  # kubectl is on the project's machines; the check is skipped elsewhere
    if real is not None:
        assert sorted(real, key=_key) == sorted(objs, key=_key)
    kinds = sorted(_key(o) for o in objs)
    assert kinds == [("RayService", "orthrus"), ("Secret", "orthrus-redis"), ("Service", "orthrus-redis"),
                     ("Service", "orthrus-redis-headless"), ("StatefulSet", "orthrus-redis")]
    problems = problems_of(objs)
    assert not problems, "\n".join(problems)
    # The RayService's cluster is a valid RayCluster too (KubeRay creates one from it).
    rs = rayservice(objs)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": rs["metadata"]["name"]},
               "spec": rs["spec"]["rayClusterConfig"]}
    assert validate_crd(cluster) == []


def test_gcs_fault_tolerance_overlay_uses_the_same_redis():
    base, ft = (rayservice(render_kustomization(KUBERAY / d)) for d in ("base", "gcs-ft"))
    assert "gcsFaultToleranceOptions" not in base["spec"]["rayClusterConfig"]
    gcs = ft["spec"]["rayClusterConfig"].pop("gcsFaultToleranceOptions")
    assert ft == base  # nothing else differs
    assert gcs["redisAddress"] == "orthrus-redis:6379"
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "orthrus-redis", "key": "password"}
    index_url = serve_config_v2(base)["applications"][0]["args"]["index"]["redis_url"]
    assert index_url == "redis://orthrus-redis:6379/1"  # same server, another database than the GCS's (0)


# -- serveConfigV2 -----------------------------------------------------------------------------
def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", KUBERAY / "sync_serve_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_config_v2_is_cluster_serve_yaml():
    sync = _sync_module()
    current = sync.RAYSERVICE.read_text()
    assert sync.render(current, sync.SERVE_CONFIG.read_text()) == current, \
        "serveConfigV2 differs from cluster/serve.yaml: run python cluster/kuberay/sync_serve_config.py"
    rs = rayservice(load_all(sync.RAYSERVICE))
    assert serve_config_v2(rs) == yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())


def test_serve_config_v2_parses_and_its_import_path_builds_the_app():
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from orthrus_serve.app import GRPC_SERVICERS
    from orthrus_serve.config import ServeConfig

    cfg = ServeDeploySchema.model_validate(serve_config_v2(rayservice(render_kustomization(KUBERAY))))
    assert cfg.grpc_options.grpc_servicer_functions == GRPC_SERVICERS
    (app,) = cfg.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)
    assert ServeConfig.model_validate(app.args).app_name == app.name


# -- the RayService fits its Serve config ---------------------------------------------------------
def _containers(rs: dict) -> dict[str, dict]:
    spec = rs["spec"]["rayClusterConfig"]
    out = {"head": spec["headGroupSpec"]["template"]["spec"]["containers"][0]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]["spec"]["containers"][0]
    return out


def test_rayservice_fits_the_serve_config():
    import ray

    objs = render_kustomization(KUBERAY)
    rs = rayservice(objs)
    serve = serve_config_v2(rs)
    (app,) = serve["applications"]
    args = app["args"]
    spec = rs["spec"]["rayClusterConfig"]
    containers = _containers(rs)

    # Ports: the proxies listen where the containers and the serve Service expect them.
    ports = {"serve": serve["http_options"]["port"], "serve-grpc": serve["grpc_options"]["port"]}
    for name, c in containers.items():
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert {k: named.get(k) for k in ports} == ports, name  # proxies on every node (EveryNode)
    svc = {p["name"]: p["targetPort"] for p in rs["spec"]["serveService"]["spec"]["ports"]}
    assert svc == ports
    assert serve["proxy_location"] == "EveryNode" and serve["http_options"]["host"] == "0.0.0.0"
    for name, c in containers.items():  # readiness: the head's raylet + GCS, a worker's Serve proxy
        probe = c["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == (("/api/healthz", 52365) if name == "head" else ("/-/healthz", ports["serve"]))

    # Redis: the index URL names the Redis Service; every Ray container gets the password from the Secret.
    (redis_svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "orthrus-redis"]
    assert args["index"]["redis_url"] == f"redis://orthrus-redis:{redis_svc['spec']['ports'][0]['port']}/1"
    env_name = args["index"]["redis_password_env"]
    for name, c in containers.items():
        (env,) = [e for e in c["env"] if e["name"] == env_name]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "orthrus-redis", "key": "password"}, name

    # GPU workers sized for the replicas: whole replicas (of replica_num_gpus GPUs, the tensor-
    # parallel size) per pod, CPUs for them and an ingress replica, and enough pods for the
    # autoscaling range. The head takes no replicas.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    limits = containers[group["groupName"]]["resources"]["limits"]
    gpus, tp = int(quantity(limits["nvidia.com/gpu"])), args["replica_num_gpus"]
    assert tp >= 1 and gpus % tp == 0
    per_pod = gpus // tp
    ingress = next(d for d in app["deployments"] if d["name"] == "OrthrusIngress")
    assert quantity(limits["cpu"]) >= per_pod * args["replica_num_cpus"] + ingress["ray_actor_options"]["num_cpus"]
    auto = args["autoscaling"]
    assert group["maxReplicas"] * per_pod >= auto["max_replicas"]
    assert group["minReplicas"] * per_pod >= auto["min_replicas"]
    assert spec["enableInTreeAutoscaling"] is True  # Serve asks for replicas; the autoscaler adds pods

    # One image, the Dockerfile's, on the Ray version the project pins.
    version = _pyproject_version()
    assert {c["image"] for c in containers.values()} == {f"orthrus-serve:{version}"}
    assert spec["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}-" in (REPO / "Dockerfile").read_text()


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# -- the checks catch real mistakes --------------------------------------------------------------
def _head(objs):
    return rayservice(objs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


MISTAKES = {
    "unknown RayService field": (lambda o: rayservice(o)["spec"].update(serveConfig="x"), "'serveConfig' was unexpected"),
    "worker group without a name": (lambda o: rayservice(o)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
                                    .pop("groupName"), "groupName"),
    "serve port KubeRay would drop": (lambda o: rayservice(o)["spec"]["serveService"]["spec"]["ports"][1]
                                      .update(name="grpc"), "dropped"),
    "REDIS_PASSWORD env with GCS FT": (lambda o: (rayservice(o)["spec"]["rayClusterConfig"].update(
        gcsFaultToleranceOptions={"redisAddress": "orthrus-redis:6379"}),
        _head(o)["env"].append({"name": "REDIS_PASSWORD", "value": "x"})), "REDIS_PASSWORD"),
    "malformed quantity": (lambda o: _head(o)["resources"]["limits"].update(cpu="two"), "quantity"),
    "request above limit": (lambda o: _head(o)["resources"]["requests"].update(memory="9Gi"), "exceeds"),
    "no liveness probe": (lambda o: _head(o).pop("livenessProbe"), "livenessProbe"),
    "missing Secret key": (lambda o: _head(o)["env"][0]["valueFrom"]["secretKeyRef"].update(key="pw"), "Secret"),
    "port name too long": (lambda o: _head(o)["ports"][0].update(name="gcs-server-port-x"), "IANA"),
    "mount of no volume": (lambda o: _head(o)["volumeMounts"][0].update(name="logs"), "names no volume"),
    "Service selecting nothing": (lambda o: next(x for x in o if x["kind"] == "Service")["spec"]["selector"]
                                  .update(app="nope"), "matches no pod"),
    "too long RayService name": (lambda o: rayservice(o)["metadata"].update(name="o" * 48), "47"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_checks_catch(mistake):
    objs = copy.deepcopy(render_kustomization(KUBERAY))
    mutate, expected = MISTAKES[mistake]
    mutate(objs)
    problems = problems_of(objs)
    assert any(expected in p for p in problems), problems
