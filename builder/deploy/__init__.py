"""Beyond one server: run a rendered repository as several replicas.

- `k8s`: Kubernetes manifests + image recipes rendered from a repository, and the checks that they are wired right
  (`python -m builder deploy k8s`).
- `local`: N `serve` processes on this host behind HAProxy, each restarted when it exits
  (`python -m builder deploy local`); the failover test drives it.
"""

from pathlib import Path

DEPLOY_TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
