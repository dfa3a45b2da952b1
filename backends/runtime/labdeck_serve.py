#!/usr/bin/env python3
"""Serve a run's model with litserve: shipped into the run directory by `labdeck serve`.

    python labdeck_serve.py --port 8000 --model model.npz            # built-in loaders by file type
    python labdeck_serve.py --port 8000 --api serve:MyAPI            # the user's own litserve.LitAPI

Built-in loaders:
* ``.npz`` with arrays ``w`` and ``b`` (the example project's logistic regression): POST
  ``{"x": [[...], ...]}`` (or one vector) → ``{"prob": [...], "label": [...]}``;
* ``.pkl`` / ``.pickle`` / ``.joblib``: an object with ``predict`` (scikit-learn style): POST
  ``{"x": [[...], ...]}`` → ``{"prediction": [...]}`` (and ``proba`` when it has ``predict_proba``);
* ``.pt`` / ``.pth`` when torch is installed: a scripted/traced module or a whole pickled module.

A body that does not fit gets a 400 with what was expected; the server stays up. It binds
127.0.0.1 only (labdeck forwards it through SSH). ``LIT_SERVER_API_KEY`` in the environment
turns on key auth: litserve's own X-API-Key check guards ``/predict`` only, so :class:`RequireKey`
asks for the same key on every other path too (``/docs``, ``/redoc``, ``/openapi.json``, ``/health``,
``/info``): the schema of a private model is not public either.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

import litserve as ls
from fastapi import HTTPException


def _matrix(request, dims=None):
    import numpy as np

    if not isinstance(request, dict) or "x" not in request:
        raise HTTPException(400, 'expected a JSON object {"x": [[number, ...], ...]}')
    try:
        x = np.asarray(request["x"], dtype=np.float64)
    except (TypeError, ValueError):
        raise HTTPException(400, '"x" must be numbers: a vector or a list of vectors') from None
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (dims is not None and x.shape[1] != dims):
        raise HTTPException(400, f'"x" must have shape (n, {dims if dims is not None else "d"}), got {list(x.shape)}')
    return x


class RequireKey:
    """ASGI middleware: every HTTP request needs ``X-API-Key`` (compared in constant time) when a key is set."""

    def __init__(self, app, key: str = "") -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        import hmac

        if scope["type"] == "http" and self.key:
            given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"detail":"missing or wrong X-API-Key"}'})
                return
        await self.app(scope, receive, send)


class NpzLogistic(ls.LitAPI):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def setup(self, device):
        import numpy as np

        data = np.load(self.path)
        self.w, self.b = data["w"].astype("float64"), float(data["b"])

    def decode_request(self, request):
        return _matrix(request, self.w.shape[0])

    def predict(self, x):
        import numpy as np

        return 1.0 / (1.0 + np.exp(-(x @ self.w + self.b)))

    def encode_response(self, p):
        return {"prob": [float(v) for v in p], "label": [int(v > 0.5) for v in p]}


class PickleModel(ls.LitAPI):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def setup(self, device):
        if self.path.endswith(".joblib"):
            import joblib

            self.model = joblib.load(self.path)
        else:
            with open(self.path, "rb") as f:
                self.model = pickle.load(f)
        if not hasattr(self.model, "predict"):
            raise SystemExit(f"{self.path}: the object has no predict() method")

    def decode_request(self, request):
        return _matrix(request)

    def predict(self, x):
        out = {"prediction": self.model.predict(x).tolist()}
        if hasattr(self.model, "predict_proba"):
            out["proba"] = self.model.predict_proba(x).tolist()
        return out

    def encode_response(self, out):
        return out


class TorchModel(ls.LitAPI):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def setup(self, device):
        import torch

        try:
            self.model = torch.jit.load(self.path, map_location=device)
        except Exception:
            self.model = torch.load(self.path, map_location=device, weights_only=False)
        self.model.eval()
        self.device = device

    def decode_request(self, request):
        import torch

        return torch.as_tensor(_matrix(request), dtype=torch.float32, device=self.device)

    def predict(self, x):
        import torch

        with torch.no_grad():
            return self.model(x)

    def encode_response(self, y):
        return {"output": y.detach().cpu().tolist()}


def build(model: str | None, api: str | None):
    if api:
        module, _, cls = api.partition(":")
        sys.path.insert(0, os.getcwd())
        return getattr(importlib.import_module(module), cls or "API")()
    if model.endswith(".npz"):
        return NpzLogistic(model)
    if model.endswith((".pkl", ".pickle", ".joblib")):
        return PickleModel(model)
    if model.endswith((".pt", ".pth")):
        return TorchModel(model)
    raise SystemExit(f"labdeck serve: no built-in loader for {model}; write a litserve.LitAPI and pass --api module:Class")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model")
    ap.add_argument("--api")
    ap.add_argument("--host", default="127.0.0.1", help="127.0.0.1 under labdeck (it forwards); 0.0.0.0 in a container")
    args = ap.parse_args()
    if not (args.model or args.api):
        raise SystemExit("labdeck serve: give --model PATH or --api module:Class")
    key = os.environ.get("LIT_SERVER_API_KEY", "")
    server = ls.LitServer(build(args.model, args.api), accelerator="auto", workers_per_device=1,
                          middlewares=[(RequireKey, {"key": key})] if key else None)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)


if __name__ == "__main__":
    main()
