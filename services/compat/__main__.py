"""``python -m services.compat``: each fix, the installed versions it meets and whether the
upstream code it replaces is still what it was written against. Exit status 1 if any changed.

Run it after upgrading BentoML, uvicorn, Starlette or Python (docs/internals/bentoml-fixes.md).
The upstream sources are read from the installed files, so a fix that is applied does not hide
the code it replaced.
"""

from __future__ import annotations

import sys

from services import compat


def main() -> int:
    changed = 0
    for fix in compat.FIXES:
        versions = []
        for package, known in fix.known.items():
            found = compat.installed_version(package)
            note = "" if compat.is_known(found, known) else f" (known: {', '.join(known)})"
            versions.append(f"{package} {found or 'not installed'}{note}")
        changes = compat.upstream_changes(fix)
        changed += bool(changes)
        state = "CHANGED upstream" if changes else "upstream unchanged"
        print(f"{fix.name} [{fix.policy}] {'; '.join(versions)}: {state}")
        for change in changes:
            print(f"  {change}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
