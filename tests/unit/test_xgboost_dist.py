"""models/xgboost_dist.py: importlib.metadata finds XGBoost as ``xgboost`` through the xgboost-cpu
distribution, so bentoml.xgboost's version lookup works in servery's environment."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

from models import xgboost_dist
from models.xgboost_dist import DistributionAlias


def test_lookup_of_xgboost_answers_with_the_installed_wheel() -> None:
    found = list(
        DistributionAlias().find_distributions(md.DistributionFinder.Context(name="xgboost"))
    )
    assert [d.metadata["Name"] for d in found] == ["xgboost-cpu"]
    assert found[0].version == md.version("xgboost-cpu")


def test_listings_and_other_names_are_left_to_the_real_finders() -> None:
    alias = DistributionAlias()
    assert list(alias.find_distributions(md.DistributionFinder.Context())) == []
    assert list(alias.find_distributions(md.DistributionFinder.Context(name="numpy"))) == []
    assert alias.find_spec("xgboost") is None  # never imports anything


def test_install_is_idempotent_and_fixes_the_lookup_in_a_fresh_interpreter() -> None:
    xgboost_dist.install()
    xgboost_dist.install()
    assert sum(isinstance(f, DistributionAlias) for f in sys.meta_path) == 1
    # -S: no site-packages .pth files run, so only install() can make the lookup work
    code = (
        f"import sys, importlib.metadata as md; sys.path[:0] = {sys.path!r}\n"
        "try:\n    md.version('xgboost'); print('found before')\n"
        "except md.PackageNotFoundError:\n    print('missing before')\n"
        "from models import xgboost_dist; xgboost_dist.install(); print(md.version('xgboost'))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["missing", "before", md.version("xgboost-cpu")]
