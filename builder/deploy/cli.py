"""`python -m builder deploy k8s|local`: several replicas of a rendered repository."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from .k8s import (DEFAULT_BASE_IMAGE, KUBERNETES_VERSION, DeployConfig, DeployError, RepositoryFacts, check_schemas,
                  check_wiring, lint_dockerfiles, render_deployment, write_rendered)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT)
def deploy_group() -> None:
    """Run a rendered repository as several replicas: Kubernetes manifests, or local replicas behind HAProxy."""


@deploy_group.command("k8s", context_settings=CONTEXT)
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replicas", default=1, show_default=True, type=int, help="Pods (1..100); the autoscaler's minimum.")
@click.option("--max-replicas", type=int, help="The autoscaler's maximum [default: 2 x --replicas].")
@click.option("--name", default="gpt-triton", show_default=True, help="Name of every object (DNS label, <= 40).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--image", default="gpt-triton-server:0.1.0", show_default=True,
              help="Server image to build from the rendered Dockerfile and to run.")
@click.option("--models-image", default="gpt-triton-models:0.1.0", show_default=True,
              help="Image holding the model repository (rendered Dockerfile.models).")
@click.option("--base-image", help=f"Base of the server image [default: {DEFAULT_BASE_IMAGE}; the "
                                   "fastertransformer engine needs your FT-backend tritonserver image].")
@click.option("--cpu", default="4", show_default=True, help="CPU request per pod.")
@click.option("--memory", default="16Gi", show_default=True, help="Memory request and limit per pod.")
@click.option("--shm-size", default="1Gi", show_default=True, help="/dev/shm size (Python-backend tensors).")
@click.option("--model-volume-size", default="20Gi", show_default=True,
              help="Size limit of the pod-local volume the repository is copied into.")
@click.option("--gpu-resource", default="nvidia.com/gpu", show_default=True, help="Extended resource for GPUs.")
@click.option("--admin-secret", default="", help="Secret (key `token`) with the admin-API token [default: NAME-admin].")
@click.option("--queue-target-us", default=50_000, show_default=True, type=int,
              help="Autoscaler target: mean queue time per request of the core model, microseconds.")
@click.option("--startup-timeout", default=600, show_default=True, type=int,
              help="Seconds a pod may take to load its models (serve's timeout and the startup probe's budget).")
@click.option("--exit-timeout", default=30, show_default=True, type=int,
              help="Seconds in-flight requests get when a pod stops.")
@click.option("--kubernetes-version", default=KUBERNETES_VERSION, show_default=True,
              help="Kubernetes version whose schemas the manifests are validated against.")
@click.option("--out", default=Path("deploy"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite files already in --out.")
def k8s_command(repository: Path, replicas: int, max_replicas: int | None, name: str, namespace: str, image: str,
                models_image: str, base_image: str | None, cpu: str, memory: str, shm_size: str,
                model_volume_size: str, gpu_resource: str, admin_secret: str, queue_target_us: int,
                startup_timeout: int, exit_timeout: int, kubernetes_version: str, out: Path, force: bool) -> None:
    """Render Kubernetes manifests that run REPOSITORY on N replicas, check them, and write them to --out.

    Written: Dockerfile (server image: NGC tritonserver + `python -m builder serve`), Dockerfile.models (the
    repository, copied into each pod by an init container), manifests/ (Deployment, Service, PodDisruptionBudget,
    HorizontalPodAutoscaler) and prometheus-adapter-values.yaml (the autoscaler's metric). Before writing, the
    wiring is checked (ports, probes, volumes, model names, GPU counts), every manifest is validated against the
    Kubernetes schemas (offline), and the Dockerfiles are linted with hadolint when it is installed.

    \b
    Example:
      python -m builder deploy k8s model_repository --replicas 3 --image registry.example/gpt-triton:1 \\
          --models-image registry.example/gpt-1.3b:1 --out deploy
      docker build -f deploy/Dockerfile -t registry.example/gpt-triton:1 .
      docker build -f deploy/Dockerfile.models -t registry.example/gpt-1.3b:1 model_repository
      kubectl create secret generic gpt-triton-admin --from-literal=token="$(openssl rand -hex 16)"
      kubectl apply -f deploy/manifests/
    """
    try:
        config = DeployConfig(name=name, namespace=namespace, replicas=replicas, max_replicas=max_replicas,
                              image=image, models_image=models_image, base_image=base_image, cpu=cpu,
                              memory=memory, shm_size=shm_size, model_volume_size=model_volume_size,
                              gpu_resource=gpu_resource, admin_secret=admin_secret,
                              queue_target_us=queue_target_us, startup_timeout_s=startup_timeout,
                              exit_timeout_s=exit_timeout, kubernetes_version=kubernetes_version)
        facts = RepositoryFacts.read(repository)
        rendered = render_deployment(config, facts, out_hint=str(out))
    except DeployError as err:
        raise click.ClickException(str(err)) from err
    problems = check_wiring(rendered, facts, config) + check_schemas(rendered, config.kubernetes_version)
    lint = lint_dockerfiles(rendered)
    problems += lint or []
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo(f"{len(problems)} problem(s); nothing written", err=True)
        sys.exit(1)
    try:
        written = write_rendered(rendered, out, force=force)
    except DeployError as err:
        raise click.ClickException(str(err)) from err
    gpus = f"{facts.gpus} x {config.gpu_resource}" if facts.gpus else "no GPU (CPU repository)"
    click.echo(f"{facts.engine} engine, {facts.device}; per pod: {gpus}; {config.replicas}..{config.max_replicas} "
               f"replicas", err=True)
    click.echo(f"checked: wiring, Kubernetes {config.kubernetes_version} schemas (strict), "
               + ("hadolint" if lint is not None else "Dockerfiles NOT linted (hadolint not installed)"), err=True)
    for path in written:
        click.echo(str(path))


@deploy_group.command("local", context_settings=CONTEXT)
@click.argument("repository", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--replicas", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="HAProxy's HTTP port on 127.0.0.1 (the replicas take free loopback ports).")
@click.option("--startup-timeout", default=300.0, show_default=True, type=click.FloatRange(1))
def local_command(repository: Path, replicas: int, port: int, startup_timeout: float) -> None:
    """Serve REPOSITORY from N local `serve` processes behind HAProxy, on loopback, until Ctrl-C.

    HAProxy health-checks each replica on /v2/health/ready and re-sends a request whose replica died to another;
    a replica that exits (a dead Python stub makes serve exit 3) is started again. Needs the `haproxy` binary
    (Debian: apt-get install haproxy).
    """
    from .local import LocalReplicas, LocalReplicasError

    def stop_once(signum: int, frame: object) -> None:
        # A second signal must not interrupt the graceful stop half-way and orphan replicas.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    # SIGTERM (and SIGINT even where a shell started us with it ignored) stop everything gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_once)
    try:
        with LocalReplicas(repository, replicas=replicas, port=port, startup_timeout_s=startup_timeout) as cluster:
            click.echo(f"serving at http://{cluster.url} ({replicas} replicas; HAProxy stats: "
                       f"{cluster.stats_url}); Ctrl-C stops", err=True)
            cluster.supervise()
    except LocalReplicasError as err:
        raise click.ClickException(str(err)) from err
    except KeyboardInterrupt:
        click.echo("stopping", err=True)
