"""A tiny training project: logistic regression on a synthetic dataset, numpy only.

The data is made in code (two Gaussian blobs), so nothing is downloaded. Each
step logs loss and accuracy with ``labdeck.log()`` (the module labdeck ships
into every job; without labdeck the script still runs), and every 10 steps it
prints ``step=N loss=L acc=A`` (what labdeck's zero-code capture reads from
logs of scripts that do not import labdeck). The final model is saved as
``model.npz`` in the run directory when labdeck runs it (``$LABDECK_RUN_DIR``),
else in the current directory. Every 50 steps (and at the end) it also logs
evaluation media: the confusion matrix of the two classes, a generated image of
the model's probability over a slice of input space, and a histogram of the
weights (labdeck's Media view shows them; ``m`` on a run).

    python train.py --steps 300 --lr 0.1 --seed 0
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

try:  # shipped into every labdeck job; optional elsewhere
    import labdeck
except ImportError:
    labdeck = None


def make_data(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.normal(0, 1.5, size=(2, dim))
    y = rng.integers(0, 2, size=n)
    x = centers[y] + rng.normal(0, 1.0, size=(n, dim))
    return x.astype(np.float32), y.astype(np.float32)


def boundary_image(w: np.ndarray, b: float, size: int = 32) -> np.ndarray:
    """The model's probability over the plane of the first two inputs (the rest 0), as an RGB image:
    blue where it says class 0, orange where it says class 1."""
    g = np.linspace(-4, 4, size, dtype=np.float32)
    xx, yy = np.meshgrid(g, g[::-1])
    p = 1.0 / (1.0 + np.exp(-(xx * w[0] + yy * w[1] + b)))
    img = np.stack([p, 0.45 + 0.1 * p, 1.0 - p], axis=-1)
    return (img * 255).astype(np.uint8)


def log_media(step: int, x: np.ndarray, y: np.ndarray, p: np.ndarray, w: np.ndarray, b: float) -> None:
    if not (labdeck and hasattr(labdeck, "Confusion")):
        return
    labdeck.log({
        "eval/confusion": labdeck.Confusion(y.astype(int), (p > 0.5).astype(int), labels=["blob A", "blob B"]),
        "eval/boundary": labdeck.Image(boundary_image(w, b), caption=f"P(blob B) over inputs 0 and 1, step {step}"),
        "weights": labdeck.Histogram(w, bins=16),
    }, step=step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.01, help="seconds per step, so the run can be watched")
    args = ap.parse_args()
    if labdeck:  # first: a rerun's changed parameters ($LABDECK_PARAMS) are applied to args here
        labdeck.config(vars(args))

    rng = np.random.default_rng(args.seed)
    x, y = make_data(args.n, args.dim, rng)
    w = np.zeros(args.dim, dtype=np.float32)
    b = 0.0
    # (said in words: `key=value` numbers in the log would be read as metrics by labdeck's zero-code capture)
    print(f"training logistic regression on {args.n} points of {args.dim} dims, learning rate {args.lr}, "
          f"{args.steps} steps", flush=True)
    for step in range(1, args.steps + 1):
        z = x @ w + b
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(-np.mean(y * np.log(p + 1e-7) + (1 - y) * np.log(1 - p + 1e-7)))
        acc = float(np.mean((p > 0.5) == (y > 0.5)))
        grad = p - y
        w -= args.lr * (x.T @ grad) / len(y)
        b -= args.lr * float(grad.mean())
        if labdeck:
            labdeck.log({"loss": loss, "acc": acc}, step=step)
        if step % 50 == 0 or step == args.steps:
            log_media(step, x, y, p, w, b)
        if step % 10 == 0 or step == 1:
            print(f"step={step} loss={loss:.4f} acc={acc:.4f}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)
    out = os.path.join(os.environ.get("LABDECK_RUN_DIR", "."), "model.npz")
    np.savez(out, w=w, b=np.float32(b))
    print(f"done: final loss={loss:.4f} acc={acc:.4f}; saved {out}", flush=True)


if __name__ == "__main__":
    main()
