"""cluster/kuberay, offline: every manifest validates against KubeRay's RayService / RayCluster CRD
schemas (tests/cluster/crds) or Kubernetes' own schemas, and the rules the API server and the
KubeRay operator enforce beyond them; the kustomizations build (as `kubectl kustomize` does, where
kubectl exists); serveConfigV2 is cluster/serve.yaml, parses as a Serve config, and its import path
builds the app; and the RayService fits that config (ports, Redis, GPUs, replica counts, image).
Hardening: no Secret in the manifests (each one they use is created by a command in
cluster/README.md), NetworkPolicies (who reaches which port, evaluated), the TLS gateway in front
of the serve Service, PodDisruptionBudgets, pull policies, the API key, and GCS FT's own Redis."""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from k8s_checks import (
    check_object,
    check_references,
    connection_allowed,
    kubectl_kustomize,
    label_selector_matches,
    kuberay_rules,
    quantity,
    render_kustomization,
    secret_key_refs,
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


def documented_secrets() -> dict[str, set[str]]:
    """The Secrets cluster/README.md tells the operator to create (`kubectl create secret ...`), with
    their keys: the manifests deploy none, so these are the only ones they may use."""
    secrets = {}
    text = (REPO / "cluster" / "README.md").read_text()
    for kind, name, rest in re.findall(r"kubectl create secret (generic|tls) ([-a-z0-9]+)([^\n]*)", text):
        keys = {"tls.crt", "tls.key"} if kind == "tls" else set(re.findall(r"--from-literal=([-._a-zA-Z0-9]+)=", rest))
        secrets[name] = secrets.get(name, set()) | keys
    return secrets


def problems_of(objs: list[dict], references: bool = True) -> list[str]:
    """Every object's problems; with `references`, also those between the objects (a set that
    is deployed together, with the Secrets the README has the operator create)."""
    problems = [p for o in objs for p in check_object(o)]
    problems += [p for o in objs if o["kind"] == "RayService" for p in kuberay_rules(o)]
    return problems + (check_references(objs, documented_secrets()) if references else [])


def _key(o: dict) -> tuple:
    return o["kind"], o["metadata"]["name"]


# -- the files ---------------------------------------------------------------------------------
def test_every_yaml_file_is_used_by_a_kustomization():
    assert [p.relative_to(KUBERAY) for p in KUSTOMIZATIONS] == [Path("."), Path("base"), Path("gcs-ft"), Path("tp2")]
    resources, patches = referenced_files()
    for path in KUBERAY.rglob("*.y*ml"):
        assert path.name == "kustomization.yaml" or path.resolve() in resources | patches, f"{path} is in no kustomization"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBERAY)))
def test_each_manifest_file_validates(path):
    objs = load_all(path)
    assert objs and all(o.get("apiVersion") and o.get("kind") for o in objs)
    problems = problems_of(objs, references=False)  # a Secret in another file: checked per kustomization
    assert not problems, "\n".join(problems)


BASE_OBJECTS = [("ConfigMap", "orthrus-gateway"), ("Deployment", "orthrus-gateway"),
                ("NetworkPolicy", "orthrus-gateway"), ("NetworkPolicy", "orthrus-ray"), ("NetworkPolicy", "orthrus-redis"),
                ("PodDisruptionBudget", "orthrus-gateway"), ("PodDisruptionBudget", "orthrus-gpu-workers"),
                ("PodDisruptionBudget", "orthrus-redis"), ("RayService", "orthrus"), ("Service", "orthrus-gateway"),
                ("Service", "orthrus-redis"), ("Service", "orthrus-redis-headless"), ("StatefulSet", "orthrus-redis")]
GCS_FT_OBJECTS = [("NetworkPolicy", "orthrus-gcs-redis"), ("PodDisruptionBudget", "orthrus-gcs-redis"),
                  ("Service", "orthrus-gcs-redis"), ("Service", "orthrus-gcs-redis-headless"),
                  ("StatefulSet", "orthrus-gcs-redis")]


@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERAY)) or "kuberay")
def test_kustomization_builds_valid_manifests(root):
    objs = render_kustomization(root)
    real = kubectl_kustomize(root)  # kubectl is on the project's machines; the check is skipped elsewhere
    if real is not None:
        assert sorted(real, key=_key) == sorted(objs, key=_key)
    kinds = sorted(_key(o) for o in objs)
    expected = BASE_OBJECTS + (GCS_FT_OBJECTS if root.name == "gcs-ft" else [])
    assert kinds == sorted(expected)
    problems = problems_of(objs)
    assert not problems, "\n".join(problems)
    # The RayService's cluster is a valid RayCluster too (KubeRay creates one from it).
    rs = rayservice(objs)
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": rs["metadata"]["name"]},
               "spec": rs["spec"]["rayClusterConfig"]}
    assert validate_crd(cluster) == []


def _named(objs: list[dict], kind: str, name: str) -> dict:
    (o,) = [x for x in objs if _key(x) == (kind, name)]
    return o


def _redis_args(statefulset: dict) -> list[str]:
    return statefulset["spec"]["template"]["spec"]["containers"][0]["args"]


def test_gcs_fault_tolerance_overlay_has_its_own_redis_and_namespace_per_cluster():
    base_objs, ft_objs = (render_kustomization(KUBERAY / d) for d in ("base", "gcs-ft"))
    base, ft = rayservice(base_objs), rayservice(ft_objs)
    assert "gcsFaultToleranceOptions" not in base["spec"]["rayClusterConfig"]
    gcs = ft["spec"]["rayClusterConfig"].pop("gcsFaultToleranceOptions")
    assert ft == base  # nothing else differs in the RayService
    # Its own Redis: the address names a Service that selects the GCS Redis, not the index's.
    host, port = gcs["redisAddress"].split(":")
    gcs_svc, index_svc = _named(ft_objs, "Service", host), _named(ft_objs, "Service", "orthrus-redis")
    assert int(port) == gcs_svc["spec"]["ports"][0]["port"]
    gcs_sts = _named(ft_objs, "StatefulSet", "orthrus-gcs-redis")
    index_sts = _named(ft_objs, "StatefulSet", "orthrus-redis")
    gcs_pod_labels = gcs_sts["spec"]["template"]["metadata"]["labels"]
    assert label_selector_matches({"matchLabels": gcs_svc["spec"]["selector"]}, gcs_pod_labels)
    assert not label_selector_matches({"matchLabels": index_svc["spec"]["selector"]}, gcs_pod_labels)
    assert not label_selector_matches({"matchLabels": gcs_svc["spec"]["selector"]},
                                      index_sts["spec"]["template"]["metadata"]["labels"])
    index_url = serve_config_v2(base)["applications"][0]["args"]["index"]["redis_url"]
    assert index_url.split("//")[1].split(":")[0] == index_svc["metadata"]["name"] != host
    # ... with its own password, and an eviction policy that never drops GCS state (keys without TTL).
    assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "orthrus-gcs-redis", "key": "password"}
    args = _redis_args(gcs_sts)
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    # The namespace is KubeRay's default (each RayCluster's UID): the old and the new cluster of an
    # upgrade keep apart, and the old one's cleanup deletes only its own keys.
    assert base["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    assert "externalStorageNamespace" not in gcs
    assert kuberay_rules(ft) == [] and kuberay_rules(rayservice(ft_objs)) == []


def test_only_the_index_is_in_the_base_redis():
    objs = render_kustomization(KUBERAY / "base")
    assert not [o for o in objs if "gcs" in o["metadata"]["name"]]
    args = _redis_args(_named(objs, "StatefulSet", "orthrus-redis"))
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"  # all index keys are cache


# -- serveConfigV2 -----------------------------------------------------------------------------
def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_serve_config", KUBERAY / "sync_serve_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_config_v2_is_cluster_serve_yaml():
    """base: cluster/serve.yaml; tp2: cluster/serve-tp2.yaml (its patch of serveConfigV2)."""
    sync = _sync_module()
    assert [(s.name, t.relative_to(KUBERAY)) for s, t in sync.COPIES] == \
        [("serve.yaml", Path("base/rayservice.yaml")), ("serve-tp2.yaml", Path("tp2/rayservice-tp2.yaml"))]
    for serve_config, target in sync.COPIES:
        current = target.read_text()
        assert sync.render(current, serve_config.read_text()) == current, \
            f"serveConfigV2 differs from {serve_config}: run python cluster/kuberay/sync_serve_config.py"
    for root, name in ((KUBERAY, "serve.yaml"), (KUBERAY / "tp2", "serve-tp2.yaml")):
        rs = rayservice(render_kustomization(root))
        assert serve_config_v2(rs) == yaml.safe_load((REPO / "cluster" / name).read_text())


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


@pytest.mark.parametrize("root", ["kuberay", "tp2"])
def test_rayservice_fits_the_serve_config(root):
    import ray

    from orthrus_serve.app import engine_options
    from orthrus_serve.config import ServeConfig

    objs = render_kustomization(KUBERAY if root == "kuberay" else KUBERAY / root)
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

    # GPU workers sized for the replicas: whole replicas (of replica_num_gpus GPUs, one per tensor-
    # parallel rank) per pod, CPUs for them (every bundle of a TP replica's placement group: its
    # ranks are one node's) and an ingress replica, and enough pods for the autoscaling range. The
    # head takes no replicas.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    limits = containers[group["groupName"]]["resources"]["limits"]
    cfg = ServeConfig.model_validate(args)
    opts = engine_options(cfg)
    bundles = opts.get("placement_group_bundles", [{"CPU": cfg.replica_num_cpus, "GPU": cfg.replica_num_gpus}])
    replica_gpus, replica_cpus = (sum(b.get(r, 0) for b in bundles) for r in ("GPU", "CPU"))
    assert replica_gpus == cfg.replica_num_gpus == cfg.tensor_parallel_size
    assert len(bundles) == 1 or opts["placement_group_strategy"] == "STRICT_PACK"
    gpus = int(quantity(limits["nvidia.com/gpu"]))
    assert gpus == quantity(containers[group["groupName"]]["resources"]["requests"]["nvidia.com/gpu"])
    assert gpus % replica_gpus == 0
    per_pod = gpus // int(replica_gpus)
    ingress = next(d for d in app["deployments"] if d["name"] == "OrthrusIngress")
    assert quantity(limits["cpu"]) >= per_pod * replica_cpus + ingress["ray_actor_options"]["num_cpus"]
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


# -- hardening -------------------------------------------------------------------------------------
ROOTS = {"base": KUBERAY / "base", "gcs-ft": KUBERAY / "gcs-ft"}


def _all_containers(objs: list[dict]) -> list[tuple[str, dict]]:
    from k8s_checks import pod_templates

    return [(f"{where} {c['name']}", c) for o in objs for where, t in pod_templates(o) for c in t["spec"]["containers"]]


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_no_secret_is_deployed_and_each_one_used_is_created_by_the_readme(root):
    objs = render_kustomization(ROOTS[root])
    assert not [o for o in objs if o["kind"] == "Secret"]  # no placeholder can reach a cluster
    used = {name for _, name, _ in secret_key_refs(objs)}
    documented = documented_secrets()
    assert used <= set(documented)
    expected = {"orthrus-redis", "orthrus-api-key", "orthrus-tls"} | ({"orthrus-gcs-redis"} if root == "gcs-ft" else set())
    assert used == expected
    assert set(documented) == {"orthrus-redis", "orthrus-api-key", "orthrus-tls", "orthrus-gcs-redis"}  # no stale ones


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_images_are_pinned_by_digest_or_always_pulled(root):
    for where, c in _all_containers(render_kustomization(ROOTS[root])):
        assert "@sha256:" in c["image"] or c.get("imagePullPolicy") == "Always", where


def test_api_key_comes_from_a_secret_into_every_ray_container():
    from orthrus_serve.config import ServeConfig

    rs = rayservice(render_kustomization(KUBERAY))
    env_name = ServeConfig.model_validate(serve_config_v2(rs)["applications"][0]["args"]).api_key_env
    assert env_name == "ORTHRUS_API_KEY"
    for name, c in _containers(rs).items():
        (env,) = [e for e in c["env"] if e["name"] == env_name]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "orthrus-api-key", "key": "api-key"}, name


def test_head_pod_is_excluded_from_the_serve_service():
    rs = rayservice(render_kustomization(KUBERAY))
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    assert rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_disruption_budgets():
    objs = render_kustomization(KUBERAY / "gcs-ft")
    pdbs = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    rs = rayservice(objs)
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert label_selector_matches(pdbs["orthrus-gpu-workers"]["selector"], worker)
    assert not label_selector_matches(pdbs["orthrus-gpu-workers"]["selector"], head)
    assert pdbs["orthrus-gpu-workers"]["maxUnavailable"] == 1
    for name in ("orthrus-redis", "orthrus-gcs-redis", "orthrus-gateway"):
        owner = [o for o in objs if o["kind"] in ("StatefulSet", "Deployment") and o["metadata"]["name"] == name]
        assert label_selector_matches(pdbs[name]["selector"], owner[0]["spec"]["template"]["metadata"]["labels"])
        assert pdbs[name]["minAvailable"] == 1


def _pod_labels(objs: list[dict]) -> dict[str, dict]:
    rs = rayservice(objs)["spec"]["rayClusterConfig"]
    labels = {"head": rs["headGroupSpec"]["template"]["metadata"]["labels"],
              "worker": rs["workerGroupSpecs"][0]["template"]["metadata"]["labels"]}
    for o in objs:
        if o["kind"] in ("StatefulSet", "Deployment"):
            labels[o["metadata"]["name"]] = o["spec"]["template"]["metadata"]["labels"]
    return labels


# (source, destination, port, allowed). Sources: pods of the deployment, a stranger pod in the
# namespace, the KubeRay operator and a pod in another namespace.
REACH = [
    ("orthrus-gateway", "worker", 8000, True), ("orthrus-gateway", "worker", 9000, True),
    ("orthrus-gateway", "head", 8265, False), ("orthrus-gateway", "head", 6379, False),
    ("orthrus-gateway", "orthrus-redis", 6379, False),
    ("stranger", "worker", 8000, False), ("stranger", "worker", 9000, False), ("stranger", "head", 8000, False),
    ("stranger", "head", 8265, False), ("stranger", "head", 6379, False), ("stranger", "orthrus-redis", 6379, False),
    ("elsewhere", "worker", 9000, False), ("elsewhere", "head", 8265, False), ("elsewhere", "head", 8080, True),
    ("stranger", "orthrus-gateway", 8443, True), ("elsewhere", "orthrus-gateway", 9443, True),
    ("stranger", "orthrus-gateway", 8081, False),
    ("kuberay-operator", "head", 8265, True), ("kuberay-operator", "head", 6379, False),
    ("kuberay-operator", "worker", 8000, False),
    ("worker", "head", 6379, True), ("worker", "head", 8265, True), ("head", "worker", 10002, True),
    ("worker", "worker", 12345, True),
    ("worker", "orthrus-redis", 6379, True), ("head", "orthrus-redis", 6379, True),
    ("head", "orthrus-gcs-redis", 6379, True), ("worker", "orthrus-gcs-redis", 6379, False),
    ("orthrus-gateway", "orthrus-gcs-redis", 6379, False), ("stranger", "orthrus-gcs-redis", 6379, False),
]


@pytest.mark.parametrize("src, dst, port, allowed", REACH, ids=[f"{s}->{d}:{p}" for s, d, p, _ in REACH])
def test_network_policies_admit_exactly_the_intended_connections(src, dst, port, allowed):
    objs = render_kustomization(KUBERAY / "gcs-ft")
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    labels = _pod_labels(objs)
    source = {"stranger": {"labels": {"app": "something-else"}, "same_namespace": True},
              "elsewhere": {"labels": {"app": "something-else"}, "same_namespace": False, "namespace_labels": {}},
              "kuberay-operator": {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "same_namespace": False,
                                   "namespace_labels": {"kubernetes.io/metadata.name": "kuberay-system"}}
              }.get(src) or {"labels": labels[src], "same_namespace": True}
    assert connection_allowed(policies, source, labels[dst], port) is allowed


def test_network_policies_fence_every_pod_of_the_deployment():
    objs = render_kustomization(KUBERAY / "gcs-ft")
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for name, labels in _pod_labels(objs).items():
        assert any(label_selector_matches(p["spec"]["podSelector"], labels) for p in policies), name


def test_gateway_terminates_tls_and_forwards_to_the_serve_service():
    objs = render_kustomization(KUBERAY)
    conf = _named(objs, "ConfigMap", "orthrus-gateway")["data"]["nginx.conf"]
    rs = rayservice(objs)
    svc = rs["spec"]["serveService"]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    name = svc["metadata"]["name"]
    servers = re.findall(r"server \{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}", conf)
    by_port = {int(re.search(r"listen (\d+)", b).group(1)): b for b in servers}
    https, grpcs = by_port[8443], by_port[9443]
    assert "listen 8443 ssl;" in https and f"proxy_pass http://{name}:{ports['serve']};" in https
    assert "listen 9443 ssl;" in grpcs and f"grpc_pass grpc://{name}:{ports['serve-grpc']};" in grpcs
    assert "http2 on;" in grpcs and "proxy_buffering off;" in https
    assert "ssl" not in by_port[8081]  # the probe port
    # The certificate and key files are the TLS Secret's keys, mounted where nginx reads them.
    deploy = _named(objs, "Deployment", "orthrus-gateway")["spec"]["template"]["spec"]
    (c,) = deploy["containers"]
    (tls_volume,) = [v for v in deploy["volumes"] if "secret" in v]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == tls_volume["name"]]
    assert tls_volume["secret"]["secretName"] == "orthrus-tls"
    assert re.search(rf"ssl_certificate {mount['mountPath']}/tls.crt;", conf)
    assert re.search(rf"ssl_certificate_key {mount['mountPath']}/tls.key;", conf)
    # The gateway's Service exposes only the TLS ports, on the pods the NetworkPolicy lets in.
    gw = _named(objs, "Service", "orthrus-gateway")
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {named[p["targetPort"]] for p in gw["spec"]["ports"]} == {8443, 9443}
    # The serve Service's ports carry no TLS: it is reachable only through the gateway.
    assert [p.get("appProtocol") for p in svc["spec"]["ports"]] == ["http", "kubernetes.io/h2c"]


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
    "pinned GCS namespace with NewCluster": (lambda o: rayservice(o)["spec"]["rayClusterConfig"].update(
        gcsFaultToleranceOptions={"redisAddress": "orthrus-redis:6379", "externalStorageNamespace": "orthrus"}),
        "externalStorageNamespace"),
    "Secret the README does not create": (lambda o: _head(o)["env"][1]["valueFrom"]["secretKeyRef"]
                                          .update(name="orthrus-key"), "needs Secret orthrus-key"),
    "TLS Secret volume of another name": (lambda o: _named(o, "Deployment", "orthrus-gateway")["spec"]["template"]
                                          ["spec"]["volumes"][1]["secret"].update(secretName="tls"), "needs Secret tls"),
    "PDB selecting nothing": (lambda o: _named(o, "PodDisruptionBudget", "orthrus-gpu-workers")["spec"]["selector"]
                              ["matchLabels"].update({"app.kubernetes.io/component": "gpu"}), "matches no pod"),
    "ConfigMap volume naming none": (lambda o: _named(o, "Deployment", "orthrus-gateway")["spec"]["template"]["spec"]
                                     ["volumes"][0]["configMap"].update(name="nginx"), "names no ConfigMap"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_checks_catch(mistake):
    objs = copy.deepcopy(render_kustomization(KUBERAY))
    mutate, expected = MISTAKES[mistake]
    mutate(objs)
    problems = problems_of(objs)
    assert any(expected in p for p in problems), problems
