"""Check the model config against the model store before serving.

    python -m models.check [MODELS_FILE]

Resolves every entry of the model config (default: ``SERVERY_MODELS_FILE``) in the BentoML store
(``$BENTOML_HOME``) without loading any framework, prints what would be served, and exits 1 with
one clear line per problem. ``make serve`` runs it first: ``bentoml serve`` itself would retry a
router that cannot load its models forever, printing a traceback each time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from models.config import ConfigError, Framework, Settings, load_model_config
from models.store import StoreError, framework_of, get_model


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
            framework: Framework = framework_of(bento_model, entry.framework)
        except StoreError as e:
            problems.append(f"model '{entry.name}': {e}")
            continue
        placement = config.placement_of(entry).value
        print(f"  {entry.name:<24} {bento_model.tag!s:<40} {framework.value:<8} {placement}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    models_file = args[0] if args else str(Settings().models_file)
    print(f"model config: {models_file}")
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
