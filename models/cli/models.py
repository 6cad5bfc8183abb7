"""``servery models``: list stored models and manage their aliases (see :mod:`models.aliases`).

    servery models list
    servery models show iris
    servery models promote iris <version or unique prefix> [--alias production]
    servery models rollback iris [--alias production]
    servery models export iris DEST_DIR      # every version (.bentomodel) + the alias file
    servery models import SRC_DIR            # into this store: versions, then aliases
                                             # (trusted archives only: docs/security.md)
    servery models compile iris [--version V] [--rows FILE]   # to ONNX, as a new version

The store is BentoML's (``$BENTOML_HOME``, else ``~/bentoml``). Changes print one
line each; ``--json`` prints machine-readable output instead. A mistake (unknown model, version,
ambiguous prefix, bad alias, an archive member that would leave its folder) is one line on stderr
and exit code 2; ``export`` and ``import`` show a progress bar per version on a terminal's stderr
(``--no-progress``: none); a compile that is refused (unsupported model, too few rows, the ONNX
model disagrees) says why on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list models, promote and roll back aliases")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="every stored model: versions, latest, aliases")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one model: versions, aliases and their history")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    promote = sub.add_parser("promote", help="point an alias at a version")
    promote.add_argument("name")
    promote.add_argument("version", help="version id or a unique prefix of one")
    promote.add_argument("--alias", default="production")
    promote.add_argument("--json", action="store_true")
    rollback = sub.add_parser("rollback", help="undo the latest promote of an alias")
    rollback.add_argument("name")
    rollback.add_argument("--alias", default="production")
    rollback.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="every version of a model and its aliases, to a folder")
    export.add_argument("name")
    export.add_argument("dest")
    export.add_argument("--json", action="store_true")
    export.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    imp = sub.add_parser("import", help="what 'servery models export' wrote: versions, aliases")
    imp.add_argument("src")
    imp.add_argument("--json", action="store_true")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    comp = sub.add_parser(
        "compile", help="convert a scikit-learn/XGBoost version to ONNX, check it, save it"
    )
    comp.add_argument("name")
    comp.add_argument(
        "--version", help="version, unique prefix or alias (default: production, else latest)"
    )
    comp.add_argument(
        "--rows",
        help="held-out rows to check on: .npy, or .csv (header of feature names or none); "
        "default: the rows stored with the model",
    )
    comp.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _model_names(store: Any) -> list[str]:
    from models.config import NAME_RE

    found = store.models_dir.iterdir()
    return sorted(p.name for p in found if p.is_dir() and NAME_RE.match(p.name))


def describe(store: Any, name: str) -> dict[str, Any]:
    from models.aliases import AliasError

    versions = store.versions(name)
    if not versions:
        raise AliasError(f"no model named {name!r} in the store ({store.models_dir})")
    aliases = store.read(name)
    return {
        "name": name,
        "versions": versions,
        "latest": versions[-1],
        "aliases": aliases.aliases,
        "history": aliases.history,
    }


def compile_version(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from dataclasses import asdict

    from models.compile import compile_model

    result = compile_model(args.name, args.version, args.rows)
    text = (
        f"{args.name}: compiled {result.source_tag} to ONNX as version {result.version} "
        f"({result.converter['name']}, {result.seconds:.1f}s): {result.rows} held-out rows, "
        f"labels agree, max |probability difference| {result.max_abs_proba_diff:.2g}\n"
        f"  shadow or promote it: servery models promote {args.name} {result.version} "
        "--alias staging"
    )
    if result.pinned_production:
        text += (
            f"\n  production -> {result.pinned_production} (the source): {args.name} had no "
            "production alias, and the compiled version would have been served as the newest"
        )
    return asdict(result), text


def run(args: argparse.Namespace) -> int:
    from models.aliases import AliasError, AliasStore, export_model, import_models
    from models.archives import ArchiveError
    from models.progress import bar
    from models.store import StoreError

    store = AliasStore()
    try:
        if args.models_command == "compile":
            from models.compile import CompileRefused

            try:
                out, text = compile_version(args)
            except CompileRefused as e:
                print(f"servery models compile: refused: {e.reason}", file=sys.stderr)
                return 1
        elif args.models_command == "list":
            out: Any = [describe(store, n) for n in _model_names(store) if store.versions(n)]
            text = "\n".join(
                f"{m['name']}: {len(m['versions'])} version(s), latest {m['latest']}"
                + "".join(f", {a} -> {v}" for a, v in sorted(m["aliases"].items()))
                for m in out
            )
        elif args.models_command == "show":
            out = describe(store, args.name)
            lines = [f"{out['name']} (latest {out['latest']})", "versions (oldest first):"]
            lines += [f"  {v}" for v in out["versions"]]
            lines.append("aliases:" if out["aliases"] else "aliases: none")
            lines += [f"  {a} -> {v}" for a, v in sorted(out["aliases"].items())]
            if out["history"]:
                lines.append("history:")
                lines += [
                    f"  {h['at']} {h['action']} {h['alias']}: {h['previous']} -> {h['version']}"
                    for h in out["history"]
                ]
            text = "\n".join(lines)
        elif args.models_command == "promote":
            out = store.promote(args.name, args.version, args.alias)
            text = f"{args.name}: {out['alias']} {out['previous']} -> {out['version']}"
        elif args.models_command == "rollback":
            out = store.rollback(args.name, args.alias)
            text = f"{args.name}: {out['alias']} rolled back {out['previous']} -> {out['version']}"
        elif args.models_command == "export":
            with bar(total=None, unit="version", desc="exporting", off=args.no_progress) as done:
                out = [str(p) for p in export_model(store, args.name, args.dest, done)]
            text = "\n".join(out)
        else:
            with bar(total=None, unit="archive", desc="importing", off=args.no_progress) as done:
                out = import_models(store, args.src, done)
            text = "\n".join(f"{n}: imported {', '.join(v)}" for n, v in out.items()) or (
                "no new versions (aliases imported where the store had none)"
            )
    except (AliasError, ArchiveError, StoreError) as e:
        print(f"servery models: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else text)
    return 0
