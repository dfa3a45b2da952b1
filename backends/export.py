"""Hand-off to production: a Dockerfile and Kubernetes manifests for the same model server.

``export_k8s(ws, run, out_dir)`` writes, for a run whose model labdeck can serve:

* ``Dockerfile``: python:3.11-slim, the run's Python packages that matter for serving (litserve,
  numpy, and torch / scikit-learn / joblib when the run had them, pinned to the run's versions),
  the model file and ``labdeck_serve.py`` (the same server ``labdeck serve`` runs);
* ``deployment.yaml``: a Deployment with readiness and liveness probes on ``/health``, the API
  key from a Secret (never in the manifest), resource requests, and a GPU limit when the run
  used GPUs;
* ``service.yaml``: a ClusterIP Service in front of it;
* ``README.md``: how to build, push, create the secret and apply.

The manifests are plain YAML written by a small emitter (no YAML library needed at run time).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import LabdeckError
from .ids import describe
from .models import Run
from .ownership import safe_rel
from .serving import SERVE_SCRIPT, pick_model
from .text import plain_line

SERVE_PACKAGES = ("litserve", "numpy", "torch", "scikit-learn", "joblib", "fastapi", "uvicorn")


def _yaml(value: Any, indent: int = 0) -> str:
    """A small YAML emitter for dicts, lists and scalars (strings JSON-quoted, so always safe)."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:\n{_yaml(v, indent + 1)}")
            else:
                lines.append(f"{pad}{k}: {_yaml(v, 0)}")
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]"
        lines = []
        for item in value:
            text = _yaml(item, indent + 1)
            if isinstance(item, (dict, list)) and item:
                first, _, rest = text.lstrip().partition("\n")
                lines.append(f"{pad}- {first}" + (f"\n{rest}" if rest else ""))
            else:
                lines.append(f"{pad}- {text.strip()}")
        return "\n".join(lines)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


def _k8s_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50]
    return name or "model"


# What a pin in requirements.txt may be: name==version, nothing else (a recorded "package" is text a
# run's record holds — a teammate's, perhaps: "--extra-index-url …" or a newline must not get in).
_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # a model file name as COPY and CMD see it


def _pins(run: Run) -> list[str]:
    packages = (run.environment or {}).get("packages", []) if isinstance(run.environment, dict) else []
    pkgs = {p.split("==")[0].lower(): p for p in (packages if isinstance(packages, list) else [])
            if isinstance(p, str) and _PIN.fullmatch(p)}
    out = []
    for name in SERVE_PACKAGES:
        if name in pkgs:
            out.append(pkgs[name])
        elif name in ("litserve", "numpy"):
            out.append(name)
    return out


def export_k8s(run: Run, out_dir: str | os.PathLike, model_bytes: bytes | None, *, model: str | None = None,
               api: str | None = None, port: int = 8000, image: str | None = None) -> list[Path]:
    """Write Dockerfile, deployment.yaml, service.yaml, README.md (and the model file) into ``out_dir``."""
    model, api = pick_model(run, model, api)
    if model:
        model = safe_rel(model, "--model")  # a name from a record: never a path out of the export directory
    if api:
        raise LabdeckError("Exporting a custom LitAPI needs its code in the image.",
                           "Copy your serve module next to labdeck_serve.py and set --api in the Dockerfile's CMD.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _k8s_name(run.name or f"run-{run.id[-8:]}")
    image = image or f"registry.example.com/models/{name}:{run.id[-8:].lower()}"
    model_file = Path(model).name
    if not _FILE_NAME.fullmatch(model_file):  # it goes into the Dockerfile's COPY and CMD lines
        raise LabdeckError(f"The model file name {describe(model_file)} cannot go into a Dockerfile as it is.",
                           "Give --model a file whose name is letters, digits, '.', '_' and '-' only.")
    gpus = bool((run.instance_info or {}).get("gpus"))
    written = []

    def write(rel: str, data: str | bytes) -> None:
        p = out / rel
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.replace(tmp, p)
        written.append(p)

    if model_bytes is not None:
        write(model_file, model_bytes)
    write("labdeck_serve.py", SERVE_SCRIPT)
    write("requirements.txt", "\n".join(_pins(run)) + "\n")
    write("Dockerfile", f"""# The model server of run {run.id} ({plain_line(run.display_name)}), exported by labdeck.
FROM python:3.11-slim
WORKDIR /srv
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY labdeck_serve.py {model_file} ./
EXPOSE {port}
# LIT_SERVER_API_KEY comes from the environment (a Kubernetes Secret); without it the server has no key
CMD ["python", "labdeck_serve.py", "--port", "{port}", "--model", "/srv/{model_file}", "--host", "0.0.0.0"]
""")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "labdeck", "labdeck/run": run.id.lower()}
    resources: dict[str, Any] = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = 1
    # /health wants the key when one is set: probe from inside the container, with it
    check = ("import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:%d/health', "
             "headers={'X-API-Key': os.environ.get('LIT_SERVER_API_KEY', '')}), timeout=3)" % port)
    readiness = {"exec": {"command": ["python", "-c", check]}, "initialDelaySeconds": 5, "periodSeconds": 10}
    liveness = {"exec": {"command": ["python", "-c", check]}, "initialDelaySeconds": 30, "periodSeconds": 10}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "model", "image": image, "imagePullPolicy": "IfNotPresent",
                    "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                    "env": [{"name": "LIT_SERVER_API_KEY",
                             "valueFrom": {"secretKeyRef": {"name": f"{name}-api-key", "key": "api-key"}}}],
                    "readinessProbe": readiness,
                    "livenessProbe": liveness,
                    "resources": resources,
                }]},
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "selector": {"app.kubernetes.io/name": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }
    write("deployment.yaml", f"# run {run.id} ({run.display_name}) by {run.user}\n" + _yaml(deployment) + "\n")
    write("service.yaml", _yaml(service) + "\n")
    write("README.md", f"""# {name}: model server for run {run.display_name} ({run.id})

```bash
docker build -t {image} . && docker push {image}
kubectl create secret generic {name}-api-key --from-literal=api-key="$(openssl rand -base64 24)"
kubectl apply -f deployment.yaml -f service.yaml
```

The server is the one `labdeck serve` runs (litserve); POST `{{"x": [[...]]}}` to `/predict` with the
header `X-API-Key`. Packages are pinned to the versions the run used where labdeck recorded them.
""")
    return written
