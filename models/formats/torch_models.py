"""PyTorch: ``bentoml.torchscript``, ``bentoml.pytorch`` and servery's MLP format."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from models.config import Framework, ModelEntry
from models.formats.common import (
    FILES,
    Batch,
    Format,
    Loaded,
    Outputs,
    class_names,
    declared_inputs,
    postprocessed,
)
from models.signature import DEFAULT_INPUT, OUTPUT_LABEL, OUTPUT_PROBA, Signature, Task, TensorSpec
from models.store import StoreError

if TYPE_CHECKING:
    import bentoml


def load_torch(
    bento_model: bentoml.Model,
    fmt: Format,
    meta: Mapping[str, Any],
    entry: ModelEntry | None,
    threads: int,
) -> Loaded:
    import torch

    torch.set_num_threads(threads)
    if fmt is Format.SERVERY:
        from models.store import load_object

        net = load_object(bento_model, Framework.PYTORCH)
        arch = meta["arch"]
        inputs = (TensorSpec(DEFAULT_INPUT, np.dtype("float32"), (int(arch["n_features"]),)),)
        sig = Signature(inputs, (), Task.CLASSIFICATION, False, class_names(entry, meta))

        def classify(batch: Batch) -> Outputs:
            with torch.inference_mode():
                proba = torch.softmax(net(_tensor(torch, batch)), dim=1).numpy()
            return {OUTPUT_LABEL: proba.argmax(axis=1), OUTPUT_PROBA: proba}

        return Loaded(fmt, Framework.PYTORCH, sig, classify, tuple(meta.get("feature_names", ())))

    path = bento_model.path_of(FILES[fmt])
    if fmt is Format.TORCHSCRIPT:
        net = torch.jit.load(path, map_location="cpu")
    else:
        # A whole pickled module (bentoml.pytorch): unpickling runs its code, as joblib does for
        # scikit-learn; the store is trusted like the code that serves it.
        net = torch.load(path, map_location="cpu", weights_only=False)
    net.eval()
    inputs = declared_inputs(entry, meta)
    if not inputs:
        raise StoreError(
            f"a {fmt.value} model does not record its input shape: declare it in the model "
            "config, e.g. inputs: [{datatype: FP32, shape: [1, 28, 28]}] (shape per row), or "
            "save it with metadata={'inputs': [...]}"
        )
    names = [t.name for t in inputs]

    def run(batch: Batch) -> Outputs:
        with torch.inference_mode():
            if isinstance(batch, dict):
                out = net(*(_tensor(torch, batch[n]) for n in names))
            else:
                out = net(_tensor(torch, batch))
        if isinstance(out, dict):
            return {str(k): v.numpy() for k, v in out.items()}
        if isinstance(out, list | tuple):
            return {f"output-{i}": v.numpy() for i, v in enumerate(out)}
        return {"output-0": out.numpy()}

    sig = Signature(inputs, (), Task.TENSOR, False, ())
    predict, sig = postprocessed(run, sig, entry, meta)
    return Loaded(fmt, Framework.PYTORCH, sig, predict)


def _tensor(torch: Any, x: np.ndarray) -> Any:
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # unpickled/frombuffer arrays: torch warns on those
        x = x.copy()
    return torch.from_numpy(x)
