#!/usr/bin/env python3
"""Checks of the Helm chart in charts/weir. Run by scripts/check-chart.sh, which installs what
this needs (helm-python-sdk, kubernetes-validate, the cloudcoil CRD models) into .tmp/venv.

For the chart's default values and each charts/weir/ci/*-values.yaml it:
  - lints the chart with Helm's own linter (strict: warnings fail), for Kubernetes 1.30;
  - renders it with Helm's engine (helm-python-sdk binds the Helm v4 Go SDK) and parses every
    manifest;
  - validates every object against the Kubernetes 1.30 JSON schemas in strict mode (unknown
    fields fail) with kubernetes-validate, and the custom resources (ServiceMonitor,
    PrometheusRule, ScaledObject, TriggerAuthentication) against schemas generated from their
    CRDs (cloudcoil-models-*, pinned), made strict the same way;
  - checks every pod template against the "restricted" Pod Security Standard, plus a
    read-only root filesystem;
  - checks the chart's own contracts (grace period = drain timeout + margin from one value, the
    drain timeout env, probes, the TOML config, Secret-sourced credentials, the reference
    service's test hooks never set (`service.test_hooks`), selectors, names,
    the PrometheusRule equal to files/alerts.yaml, the worker Deployment's `weir --config ...
    worker` command and the `[temporal]` table it reads, the Grafana dashboard's ConfigMap:
    absent unless `dashboard.enabled`, else labelled for the sidecar and holding
    files/dashboard.json).
It also checks that every key in values.yaml is documented, and that contradictory values fail
the render. It writes each rendering to .tmp/chart-check/ and the PrometheusRule's groups to
.tmp/chart-check/prometheusrule-groups.yaml (for promtool). Exit status 1 on any failure.
"""

from __future__ import annotations

import glob
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "weir"
OUT = ROOT / ".tmp" / "chart-check"
KUBE_VERSION = "1.30.0"
RELEASE = "weir-ci"
NAMESPACE = "weir-ci"


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"  ok    {what}")

    def fail(self, what: str, why: str) -> None:
        self.failed += 1
        print(f"  FAIL  {what}: {why}")

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            self.fail(what, "; ".join(problems))
        else:
            self.ok(what)


# --- values.yaml documentation ----------------------------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/\"']+):(\s|$)")


def undocumented_values(path: Path) -> list[str]:
    """Keys of values.yaml without a comment line directly above them.

    A key whose ancestor has a `# --` comment is part of that documented default (e.g. the
    fields of a probe) and needs none of its own. List items are values, not keys.
    """
    problems = []
    lines = path.read_text().splitlines()
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented with "# --")
    for number, line in enumerate(lines, 1):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        previous = next((l for l in reversed(lines[: number - 1]) if l.strip()), "")
        commented = previous.strip().startswith("#") and (
            len(previous) - len(previous.lstrip()) == indent
        )
        # The doc comment may span several lines: find its first line.
        doc_start = None
        if commented:
            i = number - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                doc_start = lines[i].strip()
                i -= 1
        dash_documented = bool(commented and doc_start and doc_start.startswith("# --"))
        inherited = any(documented for _, _, documented in stack)
        if not commented and not inherited:
            dotted = ".".join([k for _, k, _ in stack] + [match["key"]])
            problems.append(f"line {number}: {dotted} has no comment")
        stack.append((indent, match["key"], dash_documented or inherited))
    return problems


# --- Pod Security Standard "restricted" ---------------------------------------------------------

ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod_spec: dict, pod_annotations: dict) -> list[str]:
    """Violations of the Pod Security Standards, baseline and restricted (Kubernetes 1.30),
    written out check by check, plus the chart's own rule: a read-only root filesystem."""
    v: list[str] = []
    psc = pod_spec.get("securityContext") or {}
    containers = [
        (kind, c)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in pod_spec.get(kind) or []
    ]
    # Baseline.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            v.append(f"{field} is true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        v.append("pod windowsOptions.hostProcess is true")
    for volume in pod_spec.get("volumes") or []:
        types = set(volume) - {"name"}
        if "hostPath" in types:
            v.append(f"volume {volume['name']} is a hostPath")
        if not types <= ALLOWED_VOLUME_TYPES:
            v.append(f"volume {volume['name']} has a type outside the restricted list: {sorted(types)}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            v.append(f"unsafe sysctl {sysctl.get('name')}")
    for key, value in (pod_annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            v.append(f"AppArmor annotation {key}={value}")

    def selinux_ok(options: dict | None, where: str) -> None:
        options = options or {}
        if options.get("type", "") not in SELINUX_TYPES:
            v.append(f"{where} seLinuxOptions.type {options.get('type')}")
        if options.get("user") or options.get("role"):
            v.append(f"{where} seLinuxOptions sets user or role")

    def apparmor_ok(profile: dict | None, where: str) -> None:
        if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
            v.append(f"{where} appArmorProfile.type {profile.get('type')}")

    selinux_ok(psc.get("seLinuxOptions"), "pod")
    apparmor_ok(psc.get("appArmorProfile"), "pod")
    # Restricted, pod level.
    pod_non_root = psc.get("runAsNonRoot") is True
    if psc.get("runAsNonRoot") is False:
        v.append("pod runAsNonRoot is false")
    if psc.get("runAsUser") == 0:
        v.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        v.append(f"pod seccompProfile.type {pod_seccomp}")

    for kind, c in containers:
        where = f"{kind[:-1]} {c.get('name')}"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            v.append(f"{where} is privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            v.append(f"{where} windowsOptions.hostProcess is true")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                v.append(f"{where} uses hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            v.append(f"{where} procMount {sc.get('procMount')}")
        selinux_ok(sc.get("seLinuxOptions"), where)
        apparmor_ok(sc.get("appArmorProfile"), where)
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add") or [])
        if not added <= BASELINE_CAPABILITIES:
            v.append(f"{where} adds capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        # Restricted.
        if sc.get("allowPrivilegeEscalation") is not False:
            v.append(f"{where} allowPrivilegeEscalation is not false")
        if "ALL" not in (caps.get("drop") or []):
            v.append(f"{where} does not drop ALL capabilities")
        if not added <= {"NET_BIND_SERVICE"}:
            v.append(f"{where} adds capabilities other than NET_BIND_SERVICE: {sorted(added)}")
        if sc.get("runAsNonRoot") is False or not (pod_non_root or sc.get("runAsNonRoot") is True):
            v.append(f"{where} may run as root (runAsNonRoot not true in pod or container)")
        if sc.get("runAsUser") == 0:
            v.append(f"{where} runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            v.append(f"{where} seccompProfile is {seccomp!r}, not RuntimeDefault or Localhost")
        # The chart's own rule.
        if sc.get("readOnlyRootFilesystem") is not True:
            v.append(f"{where} root filesystem is not read-only")
    return v


# --- Custom resources ---------------------------------------------------------------------------


def close_objects(schema: Any) -> None:
    """Make a JSON schema strict like kubernetes-validate's strict mode: every object schema
    with listed properties and no additionalProperties rejects unknown fields."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            close_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            close_objects(value)


CRD_MODELS = {
    # (apiVersion, kind): (where the schema comes from, module, class)
    ("keda.sh/v1alpha1", "ScaledObject"): ("KEDA 2.16.1 CRD", "cloudcoil.models.keda.v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"): ("KEDA 2.16.1 CRD", "cloudcoil.models.keda.v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("Prometheus Operator 0.80.1 CRD", "cloudcoil.models.prometheus_operator.v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("Prometheus Operator 0.80.1 CRD", "cloudcoil.models.prometheus_operator.v1", "PrometheusRule"),
}
CRD_SCHEMA_FORMAT = 1  # bump when close_objects or CRD_MODELS change


def crd_schemas() -> dict[str, dict]:
    """Strict JSON schemas of the custom resources the chart renders, generated from models of
    the upstream CRDs (cloudcoil-models-keda 2.16.1.0 = KEDA v2.16.1, cloudcoil-models-
    prometheus-operator 0.80.1.0 = Prometheus Operator v0.80.1). Importing those models takes
    seconds, so the schemas are cached in .tmp/chart-check-cache, keyed by package versions."""
    import importlib
    import importlib.metadata

    versions = "-".join(
        importlib.metadata.version(name)
        for name in ("cloudcoil-models-keda", "cloudcoil-models-prometheus-operator", "pydantic")
    )
    cache = ROOT / ".tmp" / "chart-check-cache" / f"crd-schemas-{versions}-v{CRD_SCHEMA_FORMAT}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    schemas = {}
    for (api_version, kind), (source, module, name) in CRD_MODELS.items():
        model = getattr(importlib.import_module(module), name)
        schema = model.model_json_schema(by_alias=True, mode="validation")
        close_objects(schema)
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
        schemas[f"{api_version}|{kind}"] = {"source": source, "schema": schema}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(schemas))
    return schemas


def crd_validators() -> dict[tuple[str, str], tuple[str, Callable[[dict], list[str]]]]:
    validators = {}
    for key, entry in crd_schemas().items():
        api_version, kind = key.split("|")
        validator = jsonschema.Draft202012Validator(entry["schema"])

        def validate(obj: dict, validator: jsonschema.Draft202012Validator = validator) -> list[str]:
            return [
                f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
                for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
            ]

        validators[(api_version, kind)] = (entry["source"], validate)
    return validators


# --- Rendering ----------------------------------------------------------------------------------


def render(values: dict, release: str = RELEASE) -> tuple[dict[str, str], list[dict]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return manifests, objects


def merged_values(values: dict) -> dict:
    with helm.Chart.load(str(CHART)) as chart:
        return chart.merge_values(values)


def find(objects: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        o for o in objects
        if o["kind"] == kind
        and (component is None or o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)
    ]


def config_maps(objects: list[dict]) -> list[dict]:
    """The ConfigMaps holding weir.toml: every ConfigMap but the Grafana dashboard's."""
    return [o for o in find(objects, "ConfigMap") if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "dashboard"]


def dashboard_contracts(v: dict, objects: list[dict]) -> list[str]:
    """The Grafana dashboard's ConfigMap, on one rendering with merged values `v`: none unless
    `dashboard.enabled`; else one, with the sidecar's label, holding files/dashboard.json
    verbatim, whose data source is a `${datasource}` variable of type prometheus."""
    p: list[str] = []
    dashboards = find(objects, "ConfigMap", "dashboard")
    if not v["dashboard"]["enabled"]:
        return [f"{len(dashboards)} dashboard ConfigMaps with dashboard.enabled=false"] if dashboards else []
    if len(dashboards) != 1:
        return [f"{len(dashboards)} dashboard ConfigMaps with dashboard.enabled=true, expected 1"]
    cm = dashboards[0]
    name = cm["metadata"]["name"]
    labels = cm["metadata"].get("labels", {})
    key, value = v["dashboard"]["sidecarLabel"], v["dashboard"]["sidecarLabelValue"]
    if labels.get(key) != value:
        p.append(f"{name}: label {key}={labels.get(key)!r}, expected {value!r}")
    for k, val in (v["dashboard"]["labels"] or {}).items():
        if labels.get(k) != val:
            p.append(f"{name}: extra label {k}={labels.get(k)!r}, expected {val!r}")
    if (cm["metadata"].get("annotations") or {}) != (v["dashboard"]["annotations"] or {}):
        p.append(f"{name}: annotations {cm['metadata'].get('annotations')} != dashboard.annotations")
    data = cm.get("data") or {}
    if list(data) != ["weir-dashboard.json"]:
        return p + [f"{name}: data keys {list(data)}, expected [weir-dashboard.json]"]
    try:
        rendered = json.loads(data["weir-dashboard.json"])
    except json.JSONDecodeError as error:
        return p + [f"{name}: weir-dashboard.json is not JSON: {error}"]
    if rendered != json.loads((CHART / "files" / "dashboard.json").read_text()):
        p.append(f"{name}: weir-dashboard.json differs from files/dashboard.json")
    variables = {t.get("name"): t for t in rendered.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if (source.get("type"), source.get("query")) != ("datasource", "prometheus"):
        p.append(f"the datasource variable is {source}, expected type datasource, query prometheus")
    panels = rendered.get("panels") or []
    if not panels:
        p.append("the dashboard has no panels")
    for panel in panels:
        for where in [panel] + (panel.get("targets") or []):
            if where.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                p.append(f"panel {panel.get('title')!r}: datasource {where.get('datasource')}, not ${{datasource}}")
        if not panel.get("targets") or not all(t.get("expr") for t in panel["targets"]):
            p.append(f"panel {panel.get('title')!r} has a target without a query")
    return p


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def worker_contracts(v: dict, objects: list[dict], consumer: dict) -> list[str]:
    """The Temporal worker Deployment (`weir worker`) and the `[temporal]` table it and the
    consumers read, on one rendering with merged values `v`."""
    p: list[str] = []
    workers = find(objects, "Deployment", "worker")
    enabled = bool(v["worker"]["enabled"])
    if len(workers) != (1 if enabled else 0):
        p.append(f"{len(workers)} worker Deployments with worker.enabled={enabled}")
    configmaps = config_maps(objects)
    config = tomllib.loads(configmaps[0]["data"]["weir.toml"]) if len(configmaps) == 1 else {}
    temporal = config.get("temporal", {})

    # What the worker and the consumers read: the chart's temporal values, and who runs the
    # worker (the consumer pods when there is no worker Deployment).
    if v["temporal"]["address"]:
        expected = {
            "address": v["temporal"]["address"],
            "namespace": v["temporal"]["namespace"],
            "task_queue": v["temporal"]["taskQueue"],
            "worker_in_serve": not enabled,
        }
        got = {k: temporal.get(k) for k in expected}
        if got != expected:
            p.append(f"weir.toml [temporal] is {got}, expected {expected}")
    elif "address" in temporal:
        p.append(f"weir.toml sets temporal.address {temporal['address']!r} with no temporal.address value")

    for worker in workers:
        name = worker["metadata"]["name"]
        pod = worker["spec"]["template"]["spec"]
        containers = pod["containers"]
        if [c["name"] for c in containers] != ["worker"]:
            p.append(f"{name}: containers {[c['name'] for c in containers]}, expected [worker]")
            continue
        container = containers[0]
        # The same image as the consumers, running `weir --config <the ConfigMap> worker`.
        args = container.get("args")
        if args != ["--config", "/etc/weir/config/weir.toml", "worker"]:
            p.append(f"{name}: args {args}, expected --config /etc/weir/config/weir.toml worker")
        if container.get("command"):
            p.append(f"{name}: sets command {container['command']} (the image's entrypoint is weir)")
        consumer_image = next(c["image"] for c in consumer["spec"]["template"]["spec"]["containers"] if c["name"] == "weir")
        if container.get("image") != consumer_image:
            p.append(f"{name}: image {container.get('image')} differs from the consumer's {consumer_image}")
        mounted = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        volumes = {vol["name"]: vol for vol in pod.get("volumes") or []}
        config_volume = (volumes.get("config") or {}).get("configMap", {}).get("name")
        if mounted.get("config") != "/etc/weir/config" or not configmaps or config_volume != configmaps[0]["metadata"]["name"]:
            p.append(f"{name}: the ConfigMap is not mounted at /etc/weir/config (mounts {mounted}, config volume {config_volume})")
        # A config change rolls the workers too.
        annotations = worker["spec"]["template"]["metadata"].get("annotations") or {}
        consumer_annotations = consumer["spec"]["template"]["metadata"].get("annotations") or {}
        if annotations.get("checksum/config") != consumer_annotations.get("checksum/config"):
            p.append(f"{name}: checksum/config differs from the consumer's")
        if worker["spec"].get("replicas") != v["worker"]["replicaCount"]:
            p.append(f"{name}: replicas {worker['spec'].get('replicas')} != worker.replicaCount {v['worker']['replicaCount']}")
        # The activities write the task rows: the database URL comes from the Secret.
        ref = (env_of(container).get("WEIR_DATABASE__URL", {}).get("valueFrom") or {}).get("secretKeyRef")
        if ref != {"name": v["database"]["existingSecret"], "key": v["database"]["urlKey"]}:
            p.append(f"{name}: WEIR_DATABASE__URL is {ref}, expected secretKeyRef {v['database']['existingSecret']}/{v['database']['urlKey']}")
        if container.get("resources") != v["worker"]["resources"]:
            p.append(f"{name}: resources {container.get('resources')} != worker.resources")
    return p


def console_contracts(v: dict, objects: list[dict]) -> list[str]:
    """The console Deployment (`weir console`): tokens from the named Secret, listening beyond
    loopback inside its pod only, and a NetworkPolicy admitting only the listed peers."""
    p: list[str] = []
    consoles = find(objects, "Deployment", "console")
    enabled = bool(v["console"]["enabled"])
    if len(consoles) != (1 if enabled else 0):
        return [f"{len(consoles)} console Deployments with console.enabled={enabled}"]
    policies = find(objects, "NetworkPolicy", "console")
    for console in consoles:
        name = console["metadata"]["name"]
        container = console["spec"]["template"]["spec"]["containers"][0]
        if container.get("args", [])[-1:] != ["console"]:
            p.append(f"{name}: args {container.get('args')} do not end in console")
        env = env_of(container)
        for variable, key in (("WEIR_CONSOLE__VIEWER_TOKEN", "viewerTokenKey"), ("WEIR_CONSOLE__OPERATOR_TOKEN", "operatorTokenKey")):
            ref = (env.get(variable, {}).get("valueFrom") or {}).get("secretKeyRef")
            if ref != {"name": v["console"]["existingSecret"], "key": v["console"][key]}:
                p.append(f"{name}: {variable} is {env.get(variable)}, expected a secretKeyRef")
        if env.get("WEIR_CONSOLE__LISTEN", {}).get("value") != f"0.0.0.0:{v['console']['port']}":
            p.append(f"{name}: WEIR_CONSOLE__LISTEN is {env.get('WEIR_CONSOLE__LISTEN')}")
        labels = console["spec"]["template"]["metadata"]["labels"]
        if v["console"]["networkPolicy"]["enabled"]:
            if len(policies) != 1 or not matches(policies[0]["spec"]["podSelector"]["matchLabels"], labels):
                p.append(f"{name}: no NetworkPolicy selects the console pods")
            else:
                rules = policies[0]["spec"].get("ingress") or []
                peers = [peer for rule in rules for peer in rule.get("from") or []]
                if peers != (v["console"]["networkPolicy"]["from"] or []) or any(not r.get("from") for r in rules):
                    p.append(f"{name}: NetworkPolicy ingress {rules} admits more than networkPolicy.from")
        elif policies:
            p.append("a console NetworkPolicy with console.networkPolicy.enabled=false")
    return p


def chart_contracts(case: str, values: dict, objects: list[dict]) -> list[str]:
    """The chart's own promises, checked on one rendering."""
    p: list[str] = []
    v = merged_values(values)
    drain = int(v["shutdown"]["drainTimeoutSeconds"])
    margin = int(v["shutdown"]["graceMarginSeconds"])
    autoscaled = v["autoscaling"]["enabled"] or v["keda"]["enabled"]

    deployments = find(objects, "Deployment")
    consumers = find(objects, "Deployment", "consumer")
    if len(consumers) != 1:
        return [f"expected one consumer Deployment, found {len(consumers)}"]
    consumer = consumers[0]
    pod = consumer["spec"]["template"]["spec"]
    container = next((c for c in pod["containers"] if c["name"] == "weir"), None)
    if container is None:
        return ["the consumer Deployment has no container named weir"]

    # Graceful shutdown from one value.
    for d in deployments:
        grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")
        if grace != drain + margin:
            p.append(f"{d['metadata']['name']}: terminationGracePeriodSeconds {grace} != {drain} + {margin}")
        for c in d["spec"]["template"]["spec"]["containers"]:
            got = env_of(c).get("WEIR_CONSUMER__DRAIN_TIMEOUT", {}).get("value")
            if got != f"{drain}s":
                p.append(f"{d['metadata']['name']}/{c['name']}: WEIR_CONSUMER__DRAIN_TIMEOUT {got!r} != '{drain}s'")
            if grace is not None and grace <= drain:
                p.append(f"{d['metadata']['name']}: grace period {grace} not above the drain timeout {drain}")

    # The command and the probes.
    if container.get("args", [])[-1:] != ["serve"]:
        p.append(f"consumer args {container.get('args')} do not end in serve")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = (container.get(probe) or {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") != "admin":
            p.append(f"{probe} is {got}, expected {path} on port admin")
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    if ports.get("admin") != v["admin"]["port"]:
        p.append(f"admin containerPort {ports.get('admin')} != admin.port {v['admin']['port']}")
    env = env_of(container)
    if env.get("WEIR_ADMIN_ADDR", {}).get("value") != f"0.0.0.0:{v['admin']['port']}":
        p.append(f"WEIR_ADMIN_ADDR is {env.get('WEIR_ADMIN_ADDR')}")
    if v["http"]["enabled"] and ports.get("http") != v["http"]["port"]:
        p.append("http.enabled but no http container port")
    if ("replicas" in consumer["spec"]) == autoscaled:
        p.append(f"Deployment replicas present={'replicas' in consumer['spec']} with autoscaling={autoscaled}")

    # Kafka credentials come from the named Secret, never from values.
    for property_name, key in (v["kafka"]["secretProperties"] or {}).items():
        name = f"WEIR_KAFKA__PROPERTIES__{property_name.upper()}"
        if v["kafka"]["existingSecret"] and key:
            ref = (env.get(name, {}).get("valueFrom") or {}).get("secretKeyRef")
            if ref != {"name": v["kafka"]["existingSecret"], "key": key}:
                p.append(f"{name} is {env.get(name)}, expected secretKeyRef {v['kafka']['existingSecret']}/{key}")
        elif name in env:
            p.append(f"{name} set although kafka.existingSecret is empty")
    for e in container.get("env") or []:
        if "PASSWORD" in e["name"].upper() and "value" in e:
            p.append(f"{e['name']} carries a literal value")

    # The reference service's test hooks (anyone who can publish could panic or hang a pod)
    # stay off: no container of any workload sets them.
    for o in objects:
        pod_spec = (o.get("spec", {}).get("template") or o.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template") or {}).get("spec", {})
        for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
            if any(e["name"].upper() == "WEIR_SERVICE__TEST_HOOKS" for e in c.get("env") or []):
                p.append(f"{o['kind']}/{o['metadata']['name']}/{c['name']} sets WEIR_SERVICE__TEST_HOOKS")

    # The TOML configuration.
    configmaps = config_maps(objects)
    if len(configmaps) != 1 or "weir.toml" not in configmaps[0].get("data", {}):
        p.append("expected one ConfigMap with weir.toml")
    else:
        try:
            config = tomllib.loads(configmaps[0]["data"]["weir.toml"])
        except tomllib.TOMLDecodeError as error:
            p.append(f"weir.toml is not valid TOML: {error}")
        else:
            if config.get("kafka", {}).get("brokers") != v["kafka"]["brokers"]:
                p.append(f"weir.toml kafka.brokers {config.get('kafka', {}).get('brokers')!r}")
            if config.get("consumer", {}).get("group_id") != v["config"]["consumer"]["group_id"]:
                p.append("weir.toml consumer.group_id differs from config.consumer.group_id")
            if "test_hooks" in config.get("service", {}):
                p.append("weir.toml sets service.test_hooks (the test hooks are never on in a deployment)")
            if "drain_timeout" in config.get("consumer", {}):
                p.append("weir.toml sets consumer.drain_timeout (it comes from shutdown.drainTimeoutSeconds)")
            for key, value in (v["kafka"]["properties"] or {}).items():
                if config["kafka"].get("properties", {}).get(key) != value:
                    p.append(f"weir.toml kafka.properties.{key} missing or different")

            # Every setting of `config` is in weir.toml with the same value; whole numbers stay
            # integers (Helm reads YAML numbers as floats; Weir's counts are integers).
            def same(expected: Any, got: Any, path: str) -> None:
                if isinstance(expected, dict):
                    for k, e in expected.items():
                        same(e, got.get(k) if isinstance(got, dict) else None, f"{path}.{k}")
                elif isinstance(expected, int) and not isinstance(expected, bool):
                    if not (isinstance(got, int) and not isinstance(got, bool) and got == expected):
                        p.append(f"weir.toml {path} is {got!r}, expected the integer {expected}")
                elif got != expected:
                    p.append(f"weir.toml {path} is {got!r}, expected {expected!r}")

            same(v["config"], config, "config")
            mounted = any(m["name"] == "config" and m["mountPath"] == "/etc/weir/config" for m in container["volumeMounts"])
            if not mounted or container["args"][:2] != ["--config", "/etc/weir/config/weir.toml"]:
                p.append("the ConfigMap is not mounted at /etc/weir/config and passed with --config")

    p.extend(worker_contracts(v, objects, consumer))
    p.extend(console_contracts(v, objects))
    p.extend(dashboard_contracts(v, objects))

    # Selectors: each Service and PDB selects exactly its own component's pods.
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
    for d in deployments:
        own = d["spec"]["selector"]["matchLabels"]
        for other, labels in pods.items():
            if other != d["metadata"]["name"] and matches(own, labels):
                p.append(f"Deployment {d['metadata']['name']} selector also matches the pods of {other}")
        if not matches(own, pods[d["metadata"]["name"]]):
            p.append(f"Deployment {d['metadata']['name']} selector does not match its own pods")
    for s in find(objects, "Service"):
        selected = [n for n, labels in pods.items() if matches(s["spec"]["selector"], labels)]
        if len(selected) != 1:
            p.append(f"Service {s['metadata']['name']} selects {selected}")
    for pdb in find(objects, "PodDisruptionBudget"):
        selected = [n for n, labels in pods.items() if matches(pdb["spec"]["selector"]["matchLabels"], labels)]
        if selected != [consumer["metadata"]["name"]]:
            p.append(f"PodDisruptionBudget selects {selected}")
    for scaler in find(objects, "HorizontalPodAutoscaler") + find(objects, "ScaledObject"):
        if scaler["spec"]["scaleTargetRef"]["name"] != consumer["metadata"]["name"]:
            p.append(f"{scaler['kind']} targets {scaler['spec']['scaleTargetRef']['name']}")
    for monitor in find(objects, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        monitored = [s["metadata"]["name"] for s in find(objects, "Service") if matches(selector, s["metadata"]["labels"])]
        if len(monitored) != len(find(objects, "Service")):
            p.append(f"ServiceMonitor selects {monitored}, not every Service")
        if any(e.get("port") != "admin" for e in monitor["spec"]["endpoints"]):
            p.append("ServiceMonitor endpoint is not the admin port")

    # Names: DNS labels within 63 characters.
    for o in objects:
        name = o["metadata"].get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
            p.append(f"{o['kind']} name {name!r} is not a DNS label of at most 63 characters")

    # The shipped alerts are files/alerts.yaml, verbatim.
    rules = find(objects, "PrometheusRule")
    if rules:
        shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
        if rules[0]["spec"]["groups"] != shipped:
            p.append("the PrometheusRule's groups differ from files/alerts.yaml")
        (OUT / "prometheusrule-groups.yaml").write_text(yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, sort_keys=False))
    return p


# --- Main ---------------------------------------------------------------------------------------


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.yaml"):
        old.unlink()
    report = Report()
    from importlib.metadata import version

    print(f"helm-python-sdk {version('helm-python-sdk')} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate {version('kubernetes-validate')}, Kubernetes {KUBE_VERSION} schemas, strict")

    print("values.yaml")
    report.check("every key is documented", undocumented_values(CHART / "values.yaml"))

    cases = [("default", {})] + [
        (Path(f).name.removesuffix("-values.yaml"), yaml.safe_load(Path(f).read_text()) or {})
        for f in sorted(glob.glob(str(CHART / "ci" / "*-values.yaml")))
    ]
    validators = crd_validators()

    for case, values in cases:
        label = "default values" if case == "default" else f"ci/{case}-values.yaml"
        print(label)
        lint = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        lint_problems = [f"{m['path']}: {m['error']}" for m in lint["messages"] if m["severity"] >= 2]
        lint_problems += list(lint.get("errors") or [])
        notes = [f"{m['path']}: {m['error']}" for m in lint["messages"] if m["severity"] < 2]
        report.check("helm lint --strict" + (f" (info: {'; '.join(notes)})" if notes else ""), lint_problems)

        try:
            manifests, objects = render(values)
        except Exception as error:  # HelmRenderError, HelmValuesError, yaml.YAMLError
            report.fail("helm template", f"{type(error).__name__}: {error}")
            continue
        (OUT / f"{case}.yaml").write_text(
            "".join(f"---\n# Source: {path}\n{text}\n" for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt"))
        )
        kinds = sorted(f"{o['kind']}/{o['metadata'].get('name')}" for o in objects)
        report.ok(f"helm template: {len(objects)} objects ({', '.join(kinds)})")

        for o in objects:
            what = f"{o['kind']}/{o['metadata'].get('name')} ({o.get('apiVersion')})"
            try:
                version = kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
                report.ok(f"{what} valid against Kubernetes {version} (strict)")
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(x) for x in error.path)
                report.fail(f"{what} against Kubernetes {KUBE_VERSION} (strict)", f"{path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError:
                validator = validators.get((o.get("apiVersion"), o.get("kind")))
                if validator is None:
                    report.fail(what, "no Kubernetes schema and no CRD schema for this kind")
                else:
                    source, validate = validator
                    report.check(f"{what} valid against the {source} schema (strict)", validate(o))

        for o in objects:
            template = o.get("spec", {}).get("template", {}) if o["kind"] in ("Deployment", "Job") else None
            if template:
                report.check(
                    f"{o['kind']}/{o['metadata']['name']} meets the restricted Pod Security Standard, read-only root",
                    restricted_violations(template["spec"], template.get("metadata", {}).get("annotations", {})),
                )
        report.check("chart contracts (grace period, drain env, probes, TOML, secrets, test hooks off, selectors, names, alerts, worker, console, dashboard)",
                     chart_contracts(case, values, objects))
        if case == "default":
            kinds_present = {o["kind"] for o in objects}
            expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
            report.check(f"defaults render exactly {sorted(expected)}",
                         [] if kinds_present == expected else [f"got {sorted(kinds_present)}"])

    print("long release name (53 characters, Helm's maximum), every component on")
    everything = yaml.safe_load((CHART / "ci" / "all-hpa-values.yaml").read_text())
    try:
        _, objects = render(everything, release="r" * 53)
        too_long = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if len(o["metadata"]["name"]) > 63]
        report.check("every name within 63 characters", too_long)
    except Exception as error:
        report.fail("render with a 53-character release name", str(error))

    print("Temporal without a worker Deployment: the consumer pods run the worker")
    inline = {"temporal": {"address": "temporal-frontend.temporal:7233", "taskQueue": "inline-tasks"}}
    try:
        _, objects = render(inline)
        report.check("no worker Deployment, [temporal] worker_in_serve = true",
                     worker_contracts(merged_values(inline), objects, find(objects, "Deployment", "consumer")[0]))
    except Exception as error:
        report.fail("render with temporal.address and no worker", str(error))

    print("the Grafana dashboard: on with another sidecar label, off")
    for what, values in (
        ("dashboard.enabled with a custom sidecar label renders its ConfigMap",
         {"dashboard": {"enabled": True, "sidecarLabel": "grafana_dashboard_weir", "sidecarLabelValue": "yes"}}),
        ("dashboard.enabled=false renders no dashboard ConfigMap", {"dashboard": {"enabled": False}}),
    ):
        try:
            _, objects = render(values)
            report.check(what, dashboard_contracts(merged_values(values), objects))
        except Exception as error:
            report.fail(what, str(error))

    print("contradictory values fail the render")
    bad_cases = [
        ("autoscaling and keda together", {"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "mutually exclusive"),
        ("drain timeout set in config", {"config": {"consumer": {"drain_timeout": "5s"}}}, "shutdown.drainTimeoutSeconds"),
        ("brokers set in config", {"config": {"kafka": {"brokers": "x:9092"}}}, "kafka.brokers"),
        ("outbox relay without a database Secret", {"outboxRelay": {"enabled": True}}, "database.existingSecret"),
        ("grace margin below 5 s", {"shutdown": {"graceMarginSeconds": 1}}, "graceMarginSeconds"),
        ("worker without a Temporal address", {"worker": {"enabled": True}, "database": {"existingSecret": "db"}}, "temporal.address"),
        ("worker without a database Secret", {"worker": {"enabled": True}, "temporal": {"address": "t:7233"}}, "database.existingSecret"),
        ("Temporal address set in config", {"config": {"temporal": {"address": "t:7233"}}}, "temporal.address"),
        ("test hooks set in config", {"config": {"service": {"test_hooks": True}}}, "test hooks"),
        ("test hooks set in extraEnv", {"extraEnv": [{"name": "WEIR_SERVICE__TEST_HOOKS", "value": "true"}]}, "test hooks"),
        ("console without a token Secret", {"console": {"enabled": True}}, "console.existingSecret"),
    ]
    for what, values, message in bad_cases:
        try:
            render(values)
            report.fail(what, "rendered without error")
        except helm.HelmError as error:
            if message in str(error):
                report.ok(f"{what}: {str(error).split(': ', 1)[-1][:110]}")
            else:
                report.fail(what, f"failed with an unexpected message: {error}")

    print(f"chart: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
