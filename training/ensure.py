"""Train and save each demo model that is not in the BentoML model store yet.

    python -m training.ensure [--size small|large|all] [--seed N] [--no-progress]

The store is BentoML's standard one, ``$BENTOML_HOME``, else ``~/bentoml`` (the one ``bentoml
serve`` and ``make serve`` use; ``make`` does not set it). A model counts as present when any
version of its store name exists; delete it (``bentoml models delete NAME``) to retrain.
The training scripts, and with them torch and XGBoost, are imported only for models that are
missing, so a run with everything present takes about a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from models.store import StoreError, get_model, store_home
from training.common import SIZES, Size, store_name

DEMOS: tuple[str, ...] = ("iris", "breast_cancer", "digits")
"""Demo model scripts (``training.<name>``); their store names are ``name`` / ``name_large``."""

OLD_PROJECT_STORE = Path(__file__).resolve().parents[1] / ".bentoml"
"""Where ``make`` put the store before it used BentoML's standard one; only named in a hint."""


def present(name: str) -> str | None:
    """The tag of the latest stored version of ``name``, or None if it has none."""
    try:
        return str(get_model(f"{name}:latest").tag)
    except StoreError:
        return None


def ensure(size: Size | str = "small", progress: bool = True, seed: int = 0) -> list[str]:
    """Train and save every missing demo model of ``size`` (small, large or all).

    Returns the tags of the versions it created, in order; empty when all were present.
    """
    if size != "all" and size not in SIZES:
        raise ValueError(f"size must be one of {(*SIZES, 'all')}, not {size!r}")
    sizes = SIZES if size == "all" else (cast(Size, size),)
    created: list[str] = []
    for s in sizes:
        for demo in DEMOS:
            name = store_name(demo, s)
            tag = present(name)
            if tag is not None:
                print(f"{name}: already in the model store ({tag}), skipping")
                continue
            print(f"{name}: not in the model store, training ({s}) ...", flush=True)
            script = importlib.import_module(f"training.{demo}")
            start = time.perf_counter()
            result = script.train(size=s, seed=seed, progress=progress)
            bento_model = script.save(result)
            scores = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
            elapsed = time.perf_counter() - start
            print(f"{name}: saved {bento_model.tag} in {elapsed:.1f}s; hold-out {scores}")
            created.append(str(bento_model.tag))
    return created


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m training.ensure`` command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = (*SIZES, "all")
    parser.add_argument("--size", choices=sizes, default="small", help="default: small")
    parser.add_argument("--seed", type=int, default=0, help="random seed for new models")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    # Printed so nobody wonders where the models went.
    home = store_home()
    source = "$BENTOML_HOME" if "BENTOML_HOME" in os.environ else "BentoML's default, ~/bentoml"
    print(f"model store: {os.path.join(home, 'models')} ({source})")
    old = OLD_PROJECT_STORE
    if "BENTOML_HOME" not in os.environ and (old / "models").is_dir():
        print(f"note: {old}, the store make used before, is unused; BENTOML_HOME={old} keeps it")
    created = ensure(args.size, progress=not args.no_progress, seed=args.seed)
    print(f"{len(created)} model(s) trained" if created else "all demo models present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
