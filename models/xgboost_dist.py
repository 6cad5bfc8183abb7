"""Make ``importlib.metadata`` find XGBoost under the name ``xgboost`` when the ``xgboost-cpu``
wheel provides it, so ``bentoml.xgboost.save_model`` works in servery's environment.

servery installs XGBoost from the ``xgboost-cpu`` wheel (pyproject.toml: 4 MB, where PyPI's
``xgboost`` wheel is 132 MB and brings a 300 MB NCCL that can clash with torch's). Both install
the same ``xgboost`` package; only the distribution's name differs. BentoML's
``bentoml.xgboost.save_model`` records ``importlib.metadata.version("xgboost")``, which raises
``PackageNotFoundError`` for ``xgboost-cpu``. The problem is one of package metadata, so it is
fixed there, once for every caller (BentoML's framework module, or anyone else asking): a
metadata finder on ``sys.meta_path`` answers a lookup of ``xgboost`` with the ``xgboost-cpu``
distribution, and only when no distribution named ``xgboost`` is installed.

``make`` writes ``servery-xgboost-cpu.pth`` into the environment's site-packages (the Makefile's
environment step), so every interpreter there has the finder: a notebook's
``import bentoml; bentoml.xgboost.save_model(...)`` included. The Bento's services install it
when they start (``services/compat``), and :func:`install` may be called any number of times.
This module imports only the standard library.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from collections.abc import Iterable
from typing import Any

ALIASES = {"xgboost": "xgboost-cpu"}
"""distribution asked for -> the distribution that provides the same import package"""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class DistributionAlias(md.DistributionFinder):
    """A ``sys.meta_path`` entry that finds no modules, only aliased distributions."""

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_distributions(
        self, context: md.DistributionFinder.Context | None = None
    ) -> Iterable[md.Distribution]:
        name = getattr(context, "name", None)
        if not name:
            return ()  # a listing of every distribution: the real ones are listed already
        target = ALIASES.get(_normalize(name))
        if target is None:
            return ()
        # Only when the real distribution is absent: the path-based finders answer first, but a
        # lookup through this finder alone must not shadow an installed `xgboost`.
        if self._find(name):
            return ()
        return self._find(target)[:1]

    def _find(self, name: str) -> list[md.Distribution]:
        found: list[md.Distribution] = []
        for finder in sys.meta_path:
            # not through an alias (this one, or another installed twice by another copy)
            if not isinstance(finder, DistributionAlias) and hasattr(finder, "find_distributions"):
                found.extend(finder.find_distributions(md.DistributionFinder.Context(name=name)))
        return found


def install() -> None:
    """Add the finder to ``sys.meta_path`` (once)."""
    if not any(isinstance(f, DistributionAlias) for f in sys.meta_path):
        sys.meta_path.append(DistributionAlias())
