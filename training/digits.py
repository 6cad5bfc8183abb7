"""Handwritten digits (8x8 pixels, 10 classes): a PyTorch MLP from ``models.store.build_mlp``.

small: one hidden layer of 64 -> store name ``digits``;
large: three hidden layers of 2,048 (8.5 M parameters) -> ``digits_large``. Sized so that the
model, not the HTTP front end, dominates a one-row call (2 ms for one row, 0.24 ms per row in a
batch of 64, one thread): the case where batching pays. The earlier 512-wide version took 86 us for
one row, less than the router's own ~180 us of CPU per request, so batching could not show there.

The served network takes raw pixel values (0..16) as float32 features. Training sees them divided
by 16; afterwards that scale is folded into the first Linear layer's weights, so no preprocessing
has to travel with the model.

    python -m training.digits [--size small|large] [--seed N]
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

from models.config import Framework
from models.store import build_mlp, data_sha256
from training.common import (
    TEST_SIZE,
    Size,
    TrainResult,
    classification_metrics,
    holdout_split,
    main,
    save,
    store_name,
)

__all__ = ["save", "train"]

PIXEL_MAX = 16.0
"""Largest pixel value in scikit-learn's digits; inputs are scaled by 1/PIXEL_MAX for training."""

PARAMS: dict[Size, dict[str, Any]] = {
    "small": {"hidden": [64], "epochs": 30, "batch_size": 64, "lr": 1e-2},
    "large": {"hidden": [2048, 2048, 2048], "epochs": 15, "batch_size": 64, "lr": 5e-4},
}


def _fit(
    net: torch.nn.Sequential,
    X: torch.Tensor,
    y: torch.Tensor,
    params: dict[str, Any],
    seed: int,
    desc: str,
    progress: bool,
) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=params["lr"])
    shuffle = torch.Generator().manual_seed(seed)
    net.train()
    with tqdm(range(params["epochs"]), desc=desc, unit="epoch", disable=not progress) as epochs:
        for _ in epochs:
            for batch in torch.randperm(len(X), generator=shuffle).split(params["batch_size"]):
                optimizer.zero_grad()
                loss = F.cross_entropy(net(X[batch]), y[batch])
                loss.backward()
                optimizer.step()
            epochs.set_postfix(loss=f"{loss.item():.4f}")
    net.eval()


@torch.no_grad()
def _fold_input_scale(net: torch.nn.Sequential, scale: float) -> None:
    # first(x * scale) == (W * scale) x + b, so the network can take unscaled inputs. With
    # scale = 1/16 (a power of two) the multiplication is exact in float32.
    net[0].weight.mul_(scale)


def train(size: Size = "small", seed: int = 0, progress: bool = True) -> TrainResult:
    """Train the digits MLP of ``size`` on a stratified 75 % split; metrics on the rest."""
    name = store_name("digits", size)
    data = load_digits()
    X = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    X_train, X_test, y_train, y_test = holdout_split(X, y, seed)

    params = PARAMS[size]
    arch = {"n_features": X.shape[1], "hidden": list(params["hidden"]), "n_classes": 10}
    torch.manual_seed(seed)
    net = build_mlp(arch["n_features"], arch["hidden"], arch["n_classes"])
    X_scaled = torch.from_numpy(X_train) / PIXEL_MAX
    _fit(net, X_scaled, torch.from_numpy(y_train), params, seed, f"{name} epochs", progress)
    _fold_input_scale(net, 1.0 / PIXEL_MAX)

    # Metrics come from the folded network on raw pixels: exactly what is saved and served.
    with torch.no_grad():
        proba = torch.softmax(net(torch.from_numpy(X_test)), dim=1).numpy()
    return TrainResult(
        name=name,
        framework=Framework.PYTORCH,
        model=net,
        feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
        class_names=[str(c) for c in range(10)],
        metrics=classification_metrics(y_test, proba),
        params={
            **params,
            "optimizer": "Adam",
            "input_scale_folded": 1.0 / PIXEL_MAX,
            "seed": seed,
            "test_size": TEST_SIZE,
        },
        data_hash=data_sha256(X_train, y_train),
        dtype="float32",
        arch=arch,
        size=size,
        X_test=X_test,
        y_test=y_test,
    )


if __name__ == "__main__":
    sys.exit(main(train, "Train the digits demo MLP and save it to the BentoML store."))
