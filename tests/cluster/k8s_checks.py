"""Offline checks of Kubernetes manifests: KubeRay's CRD schemas (as the API server applies them),
Kubernetes' own schemas for built-in kinds (kubernetes-validate), the rules the API server and
KubeRay's operator enforce beyond a schema, and a small kustomize renderer.

Every check returns a list of problems (strings naming the object and field); empty means valid.
"""

import copy
import re
import shutil
import subprocess
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path

import yaml

CRDS = Path(__file__).parent / "crds"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# -- KubeRay CRDs ---------------------------------------------------------------------------
@cache
def crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of a KubeRay CRD, as a JSON schema that, like the API server with
    kubectl's strict field validation, rejects unknown fields."""
    name = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind]
    crd = yaml.load((CRDS / name).read_text(), Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _structural(version["schema"]["openAPIV3Schema"])


def _structural(s: dict) -> dict:
    s = dict(s)
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable"):
        t = s.get("type")
        if isinstance(t, str):
            s["type"] = [t, "null"]
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False  # the API server prunes (strict: rejects) unknown fields
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _structural(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_structural(x) for x in s[key]]
    return s


def validate_crd(obj: dict, kind: str | None = None) -> list[str]:
    """JSON-schema validation against the CRD, then its CEL rules (x-kubernetes-validations)."""
    import jsonschema

    kind = kind or obj["kind"]
    schema = crd_schema(kind)
    validator = jsonschema.Draft7Validator(schema)
    where = f"{kind} {obj.get('metadata', {}).get('name')}"
    problems = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
    problems += [f"{where}: {p}" for p in _cel(schema, obj, "")]
    return problems


_IN_LIST = re.compile(r"^self in \[(.*)\]$")


def _cel(schema: dict, value, path: str) -> list[str]:
    """The CRDs' CEL rules: transition rules (oldSelf) do not apply when an object is created;
    `self in [...]` is evaluated; any other rule is reported, so a new KubeRay CRD cannot add
    rules these tests silently skip."""
    problems = []
    for rule in schema.get("x-kubernetes-validations", []):
        expr = rule["rule"].strip()
        if "oldSelf" in expr:
            continue
        m = _IN_LIST.match(expr)
        if m is None:
            problems.append(f"{path}: unhandled CEL rule {expr!r}")
        elif value not in yaml.safe_load(f"[{m.group(1)}]"):
            problems.append(f"{path}: {rule.get('message', expr)}")
    if isinstance(value, dict):
        for k, v in value.items():
            sub = schema.get("properties", {}).get(k)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                problems += _cel(sub, v, f"{path}.{k}" if path else k)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            problems += _cel(schema["items"], v, f"{path}[{i}]")
    return problems


# -- Kubernetes' schemas for built-in kinds ----------------------------------------------------
def validate_builtin(obj: dict) -> list[str]:
    import kubernetes_validate

    try:  # the newest Kubernetes whose schemas the package ships
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        return [f"{obj['kind']} {obj['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {first}"]


def pod_template_object(name: str, template: dict) -> dict:
    """A pod template (a workload's, or one inside a RayService) as a v1 PodTemplate object."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


# -- rules beyond the schemas (Kubernetes' API validation) -------------------------------------
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?\d+))?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}


def quantity(q) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", 4) as a number; ValueError if malformed."""
    s = str(q)
    if not QUANTITY.match(s):
        raise ValueError(f"not a quantity: {q!r}")
    m = re.match(r"^\+?([\d.]+(?:[eE][+-]?\d+)?)([A-Za-z]*)$", s)
    try:
        return Decimal(m.group(1)) * Decimal(_SUFFIX[m.group(2)])
    except (InvalidOperation, KeyError) as e:
        raise ValueError(f"not a quantity: {q!r}") from e


def check_name(kind: str, name: str | None) -> list[str]:
    if not name:
        return [f"{kind}: metadata.name is missing"]
    pattern = DNS1035_LABEL if kind == "Service" else DNS1123_SUBDOMAIN
    if not pattern.match(name) or len(name) > (63 if kind == "Service" else 253):
        return [f"{kind} {name}: metadata.name is not a valid {'DNS-1035 label' if kind == 'Service' else 'name'}"]
    return []


def check_labels(where: str, labels: dict | None) -> list[str]:
    problems = []
    for key, value in (labels or {}).items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not DNS1123_SUBDOMAIN.match(prefix)) or not LABEL_NAME.match(name) or len(name) > 63:
            problems.append(f"{where}: label key {key!r} is invalid")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            problems.append(f"{where}: label value {value!r} of {key!r} is invalid")
    return problems


def check_pod_spec(where: str, spec: dict, claim_templates: tuple[str, ...] = ()) -> list[str]:
    """The API server's pod rules that a schema cannot express, plus this project's: every
    container has probes and resource requests and limits."""
    problems = []
    volumes = {v["name"] for v in spec.get("volumes", [])} | set(claim_templates)
    containers = spec.get("containers", [])
    names = [c["name"] for c in containers]
    if len(set(names)) != len(names):
        problems.append(f"{where}: duplicate container names {names}")
    for c in containers:
        w = f"{where} container {c['name']}"
        if not DNS1123_LABEL.match(c["name"]):
            problems.append(f"{w}: name is not a DNS-1123 label")
        if not c.get("image"):
            problems.append(f"{w}: no image")
        port_names = [p["name"] for p in c.get("ports", []) if "name" in p]
        for n in port_names:
            if not IANA_SVC_NAME.match(n) or len(n) > 15 or "--" in n or not re.search("[a-z]", n):
                problems.append(f"{w}: port name {n!r} is not an IANA_SVC_NAME (15 characters at most)")
        if len(set(port_names)) != len(port_names):
            problems.append(f"{w}: duplicate port names {port_names}")
        numbers = [p["containerPort"] for p in c.get("ports", [])]
        if len(set(numbers)) != len(numbers) or not all(0 < n < 65536 for n in numbers):
            problems.append(f"{w}: container ports {numbers} must be distinct, in 1..65535")
        env_names = [e["name"] for e in c.get("env", [])]
        if len(set(env_names)) != len(env_names) or not all(ENV_NAME.match(n) for n in env_names):
            problems.append(f"{w}: env names {env_names} must be distinct and valid")
        for e in c.get("env", []):
            if "value" in e and "valueFrom" in e:
                problems.append(f"{w}: env {e['name']} has both value and valueFrom")
        res = c.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for kind in ("cpu", "memory"):
            if kind not in requests or kind not in limits:
                problems.append(f"{w}: resources must set requests and limits for {kind}")
        for section, values in (("requests", requests), ("limits", limits)):
            for k, v in values.items():
                try:
                    quantity(v)
                except ValueError as e:
                    problems.append(f"{w}: resources.{section}.{k}: {e}")
        for k, v in requests.items():
            if k in limits:
                try:
                    if quantity(v) > quantity(limits[k]):
                        problems.append(f"{w}: resources.requests.{k} ({v}) exceeds the limit ({limits[k]})")
                    if "/" in k and quantity(v) != quantity(limits[k]):  # extended resources, e.g. GPUs
                        problems.append(f"{w}: resources.requests.{k} must equal its limit (no overcommit)")
                except ValueError:
                    pass
        for probe_name in ("readinessProbe", "livenessProbe"):
            probe = c.get(probe_name)
            if probe is None:
                problems.append(f"{w}: no {probe_name}")
                continue
            handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in probe]
            if len(handlers) != 1:
                problems.append(f"{w}: {probe_name} needs exactly one handler, has {handlers}")
            for h in ("httpGet", "tcpSocket", "grpc"):
                port = probe.get(h, {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    problems.append(f"{w}: {probe_name} port {port!r} is no named container port")
                if isinstance(port, int) and not 0 < port < 65536:
                    problems.append(f"{w}: {probe_name} port {port} out of range")
            if probe_name == "livenessProbe" and probe.get("successThreshold", 1) != 1:
                problems.append(f"{w}: livenessProbe.successThreshold must be 1")
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        if len(set(mounts)) != len(mounts):
            problems.append(f"{w}: duplicate mount paths {mounts}")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{w}: volumeMount {m['name']!r} names no volume")
    return problems


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a workload or a RayService / RayCluster."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind} {name}", obj["spec"]["template"])]
    if kind in ("RayService", "RayCluster"):
        spec = obj["spec"]["rayClusterConfig"] if kind == "RayService" else obj["spec"]
        out = [(f"{kind} {name} head", spec["headGroupSpec"]["template"])]
        out += [(f"{kind} {name} worker group {g.get('groupName')}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
        return out
    return []


def secret_key_refs(objs: list[dict]) -> list[tuple[str, str, str | None]]:
    """(where, Secret name, key or None for a whole-Secret volume) of every Secret reference: env
    secretKeyRefs, secret volumes, and a RayService's GCS fault tolerance Redis password."""
    refs = []
    for o in objs:
        for where, t in pod_templates(o):
            for c in t["spec"].get("containers", []):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        refs.append((f"{where}: env {e['name']}", ref.get("name"), ref.get("key")))
            for v in t["spec"].get("volumes", []):
                if "secret" in v and not v["secret"].get("optional"):
                    refs.append((f"{where}: volume {v['name']}", v["secret"].get("secretName"), None))
        if o["kind"] == "RayService":
            gcs = o["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions") or {}
            ref = (gcs.get("redisPassword") or {}).get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((f"RayService {o['metadata']['name']}: gcsFaultToleranceOptions.redisPassword",
                             ref.get("name"), ref.get("key")))
    return refs


def label_selector_matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def check_references(objs: list[dict], external_secrets: dict[str, set[str]] | None = None) -> list[str]:
    """Across one set of manifests: Secrets referenced exist with the key (in the manifests or in
    `external_secrets`, name -> keys, those created by hand), ConfigMap volumes name a ConfigMap,
    Services select some pod template and their named target ports exist there, PodDisruptionBudgets
    and NetworkPolicies select some pod template, StatefulSets' selectors and serviceNames."""
    problems = []
    secrets = {o["metadata"]["name"]: set(o.get("data", {})) | set(o.get("stringData", {}))
               for o in objs if o["kind"] == "Secret"} | (external_secrets or {})
    templates = [t for o in objs for t in pod_templates(o)]
    for where, name, key in secret_key_refs(objs):
        if name not in secrets or (key is not None and key not in secrets[name]):
            problems.append(f"{where} needs Secret {name}" + (f" key {key}" if key else ""))
    config_maps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
    for where, t in templates:
        for v in t["spec"].get("volumes", []):
            if "configMap" in v and v["configMap"].get("name") not in config_maps:
                problems.append(f"{where}: volume {v['name']} names no ConfigMap")
    for o in objs:
        if o["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = o["spec"]["selector"] if o["kind"] == "PodDisruptionBudget" else o["spec"]["podSelector"]
            if not any(label_selector_matches(sel, t.get("metadata", {}).get("labels", {})) for _, t in templates):
                problems.append(f"{o['kind']} {o['metadata']['name']}: selector {sel} matches no pod template")
    for o in objs:
        if o["kind"] == "Service":
            sel = o["spec"].get("selector") or {}
            chosen = [(w, t) for w, t in templates if sel and sel.items() <= t.get("metadata", {}).get("labels", {}).items()]
            if not chosen:
                problems.append(f"Service {o['metadata']['name']}: selector {sel} matches no pod template")
            names = [p.get("name") for p in o["spec"]["ports"]]
            if len(o["spec"]["ports"]) > 1 and (None in names or len(set(names)) != len(names)):
                problems.append(f"Service {o['metadata']['name']}: several ports need distinct names")
            for p in o["spec"]["ports"]:
                tp = p.get("targetPort")
                for w, t in chosen:
                    named = {q["name"] for c in t["spec"]["containers"] for q in c.get("ports", []) if "name" in q}
                    if isinstance(tp, str) and tp not in named:
                        problems.append(f"Service {o['metadata']['name']}: targetPort {tp!r} not in {w}")
        if o["kind"] == "StatefulSet":
            spec = o["spec"]
            labels = spec["template"].get("metadata", {}).get("labels", {})
            if not spec["selector"].get("matchLabels", {}).items() <= labels.items():
                problems.append(f"StatefulSet {o['metadata']['name']}: selector does not match the template labels")
            governing = [s for s in objs if s["kind"] == "Service" and s["metadata"]["name"] == spec.get("serviceName")]
            if not governing or governing[0]["spec"].get("clusterIP") != "None":
                problems.append(f"StatefulSet {o['metadata']['name']}: serviceName must name a headless Service")
    return problems


def check_object(obj: dict) -> list[str]:
    """Schema (CRD or built-in) and the per-object rules above."""
    kind, meta = obj["kind"], obj["metadata"]
    problems = check_name(kind, meta.get("name")) + check_labels(f"{kind} {meta.get('name')}", meta.get("labels"))
    if obj["apiVersion"].startswith("ray.io/"):
        problems += validate_crd(obj)
        for where, t in pod_templates(obj):
            problems += validate_builtin(pod_template_object("x", t))
    else:
        problems += validate_builtin(obj)
    claims = tuple(c["metadata"]["name"] for c in obj.get("spec", {}).get("volumeClaimTemplates", []))
    for where, t in pod_templates(obj):
        problems += check_labels(where, t.get("metadata", {}).get("labels"))
        problems += check_pod_spec(where, t["spec"], claims)
    return problems


# -- KubeRay's operator rules (ray-operator/controllers/ray/utils/validation.go) ----------------
def kuberay_rules(rs: dict) -> list[str]:
    """What KubeRay's operator rejects or silently drops for a RayService, beyond the CRD schema."""
    name = rs["metadata"]["name"]
    spec = rs["spec"]["rayClusterConfig"]
    w = f"RayService {name}"
    problems = []
    if len(name) > 47 or not DNS1035_LABEL.match(name):  # the RayCluster's name adds a suffix
        problems.append(f"{w}: name must be a DNS-1035 label of at most 47 characters")
    head = spec["headGroupSpec"]
    groups = [("head", head)] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    for group, g in groups:
        if not g["template"]["spec"].get("containers"):
            problems.append(f"{w}: group {group} has no container")
        params = g.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and g.get("resources"):
            problems.append(f"{w}: group {group} sets resources in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{w}: group {group}: rayStartParams['labels'] is not supported")
    for g in spec.get("workerGroupSpecs", []):
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 2**31), g.get("replicas", g.get("minReplicas", 0))
        if not (0 <= lo <= n <= hi):
            problems.append(f"{w}: worker group {g.get('groupName')}: need 0 <= minReplicas <= replicas <= maxReplicas")
        if not spec.get("enableInTreeAutoscaling") and ("minReplicas" not in g or "maxReplicas" not in g):
            problems.append(f"{w}: worker group {g['groupName']}: minReplicas and maxReplicas are required")
    head_c = head["template"]["spec"]["containers"][0]
    head_env = {e["name"] for e in head_c.get("env", [])}
    if spec.get("gcsFaultToleranceOptions"):
        if "REDIS_PASSWORD" in head_env or "RAY_REDIS_ADDRESS" in head_env:
            problems.append(f"{w}: REDIS_PASSWORD / RAY_REDIS_ADDRESS env in the head conflicts with gcsFaultToleranceOptions")
        if head.get("rayStartParams", {}).get("redis-password"):
            problems.append(f"{w}: redis-password in rayStartParams conflicts with gcsFaultToleranceOptions")
        if "ray.io/ft-enabled" in rs["metadata"].get("annotations", {}):
            problems.append(f"{w}: the ray.io/ft-enabled annotation conflicts with gcsFaultToleranceOptions")
    elif "RAY_REDIS_ADDRESS" in head_env:
        problems.append(f"{w}: RAY_REDIS_ADDRESS enables GCS FT implicitly; use gcsFaultToleranceOptions")
    # A pinned namespace is shared by the old and the new cluster of a NewCluster upgrade: the new head
    # reads the old Serve state, and the old cluster's Redis cleanup deletes the live state.
    upgrade = (rs["spec"].get("upgradeStrategy") or {}).get("type", "NewCluster")
    if (spec.get("gcsFaultToleranceOptions") or {}).get("externalStorageNamespace") and upgrade == "NewCluster":
        problems.append(f"{w}: externalStorageNamespace is pinned while upgradeStrategy is NewCluster: the "
                        "old and new clusters share (and the old one's cleanup deletes) the GCS state")
    auth = spec.get("authOptions", {})
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in str(spec.get("rayVersion", "0")).split(".")[:3])
        if version < (2, 52, 0):
            problems.append(f"{w}: authOptions.mode token needs rayVersion >= 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        problems.append(f"{w}: Kubernetes token auth is not supported for RayService")
    if spec.get("autoscalerOptions", {}).get("version") == "v2":
        for group, g in groups:
            if g["template"]["spec"].get("restartPolicy", "Never") != "Never":
                problems.append(f"{w}: group {group}: autoscaler v2 needs restartPolicy Never or unset")
    # The serve Service: KubeRay keeps only ports named `serve` / `serve-*` that the head container has.
    serving = {p["name"]: p["containerPort"] for p in head_c.get("ports", [])
               if p.get("name") == "serve" or p.get("name", "").startswith("serve-")}
    if not serving:
        problems.append(f"{w}: the head container has no port named 'serve': KubeRay creates no serve Service")
    for p in (rs["spec"].get("serveService") or {}).get("spec", {}).get("ports", []):
        if p.get("name") not in serving:
            problems.append(f"{w}: serveService port {p.get('name')!r} is dropped: no head container port of that name")
        elif p.get("targetPort", p["port"]) != serving[p["name"]]:
            problems.append(f"{w}: serveService port {p['name']} targets {p.get('targetPort')}, "
                            f"the head serves it on {serving[p['name']]}")
    return problems


# -- NetworkPolicy ---------------------------------------------------------------------------
def connection_allowed(policies: list[dict], src: dict, dst_labels: dict, port: int) -> bool:
    """Whether NetworkPolicies (ingress, one namespace) admit a TCP connection from a pod to a port
    of a pod with `dst_labels`. `src`: {"labels": ..., "same_namespace": bool, "namespace_labels":
    ...}. A pod that no policy selects takes everything; otherwise some rule must match."""
    selecting = [p for p in policies if label_selector_matches(p["spec"]["podSelector"], dst_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    return any(_rule_admits(rule, src, port) for p in selecting for rule in p["spec"].get("ingress", []))


def _rule_admits(rule: dict, src: dict, port: int) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports):
        return False
    peers = rule.get("from")
    if not peers:
        return True
    for peer in peers:
        if "ipBlock" in peer:
            continue  # pod traffic is judged by labels here
        ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
        ns_ok = (src["same_namespace"] if ns_sel is None
                 else label_selector_matches(ns_sel, src.get("namespace_labels", {})))
        if ns_ok and (pod_sel is None or label_selector_matches(pod_sel, src["labels"])):
            return True
    return False


# -- kustomize -------------------------------------------------------------------------------
def render_kustomization(root: Path) -> list[dict]:
    """`kustomize build` for what this repository uses: `resources` (files and directories) and
    `patches` with a path: a strategic merge (on maps, a deep merge) or a JSON 6902 list of `replace` ops."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = (root / res).resolve()
        if path.is_dir():
            objs += render_kustomization(path)
        else:
            objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        body = yaml.safe_load((root / patch["path"]).read_text())
        target = patch.get("target") or {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [o for o in objs if o["kind"] == target.get("kind", o["kind"])
                and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])]
        if len(hits) != 1:
            raise ValueError(f"patch {patch['path']} matches {len(hits)} objects")
        if isinstance(body, list):
            _json6902(hits[0], body)
        else:
            _merge(hits[0], {k: v for k, v in body.items() if k not in ("apiVersion", "kind")})
    return objs


def _json6902(obj: dict, ops: list[dict]) -> None:
    """`replace` ops only (the path must exist, as kustomize requires)."""
    for op in ops:
        if op["op"] != "replace":
            raise ValueError(f"unsupported JSON 6902 op {op['op']!r}")
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = obj
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key = int(last) if isinstance(node, list) else last
        if isinstance(node, dict) and key not in node:
            raise KeyError(f"{op['path']}: nothing to replace")
        node[key] = copy.deepcopy(op["value"])


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def kubectl_kustomize(root: Path) -> list[dict] | None:
    """The real kustomize (built into kubectl), where kubectl is installed; None otherwise."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(root)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {root}: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]
