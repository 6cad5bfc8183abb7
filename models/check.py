"""Check the model config against the model store before serving.

    python -m models.check [MODELS_FILE]

Resolves every entry of the model config (default: ``SERVERY_MODELS_FILE``) in the BentoML store
(``$BENTOML_HOME``, else ``~/bentoml``) and loads the version it would serve exactly as the
servers do (:func:`models.formats.load`: the model's file, its framework, its signature, one
warm-up call on two rows), prints what would be served, and exits 1 with one line per model that
cannot be served, naming it and why: never a green check followed by a failing serve. ``make
serve`` runs it first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from models.config import ConfigError, Placement, Settings, load_model_config
from models.formats import inline_only, load
from models.store import StoreError, get_model, store_home


def check(models_file: str) -> list[str]:
    """Problems with ``models_file`` (none when every entry resolves); prints resolved entries."""
    try:
        config = load_model_config(models_file)
    except ConfigError as e:
        return [str(e)]
    problems = []
    for entry in config.models:
        try:
            bento_model = get_model(entry.store_tag)
            loaded = load(bento_model, entry)
        except StoreError as e:
            problems.append(f"model '{entry.name}': {e}")
            continue
        placement = config.placement_of(entry)
        sig = loaded.signature
        why = (
            inline_only(entry.name, loaded.framework, sig)
            if placement is Placement.SERVICE
            else None
        )
        if why is not None:
            problems.append(why)
            continue
        inputs = ", ".join(f"{t.name}{t.oip_shape()} {t.datatype}" for t in sig.inputs[:3])
        more = f" (+{len(sig.inputs) - 3})" if len(sig.inputs) > 3 else ""
        print(
            f"  {entry.name:<20} {bento_model.tag!s:<36} "
            f"{loaded.framework.value + ' (' + loaded.format.value + ')':<30} "
            f"{sig.task.value:<14} {placement.value:<8} {inputs}{more}"
        )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    models_file = args[0] if args else str(Settings().models_file)
    print(f"model config: {models_file}")
    print(f"model store:  {os.path.join(store_home(), 'models')}")
    problems = check(models_file)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(
            "hint: train the demo models with `make models`, or fix the model config",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
