"""Which versions of a model to serve and how to route to them: a plan from config, store, aliases.

:func:`plan_model` is pure (no store access, no framework imports), so the rules are unit-tested
on their own; every serving process (router workers, framework services) computes the same plan
from the same inputs, so they agree on what to load without talking to each other.

The rules:

* **Served versions** are the model's ``version_policy`` (``latest: N``, ``all`` or ``specific``)
  plus every version an alias points at plus every target of its routing table.
* **Default** (a request without ``version`` and no routing table): the version a versioned
  ``tag: name:<version>`` pins, else the ``production`` alias, else the newest version the policy
  selects (``routed_by`` says which: ``tag``, ``alias:production``, ``latest``).
* **Split**: a weighted table over targets (aliases, versions, prefixes, ``latest``). A target
  that does not resolve (an alias not set yet) is left out and the rest keep their relative
  weights; the plan carries a warning. **Shadow**: one target that receives a copy of traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.aliases import DEFAULT_ALIAS
from models.config import ModelEntry

LATEST = "latest"
PINNED = "tag"
"""``routed_by`` of a default chosen by the entry's versioned tag."""


class PlanError(ValueError):
    """The model cannot be planned (no version in the store, an unknown pinned version, ...)."""


@dataclass(frozen=True)
class ModelPlan:
    """What one served model name should look like: versions to load and how to route."""

    name: str
    store_name: str
    versions: tuple[str, ...]
    """Versions to serve, oldest first."""
    aliases: dict[str, str]
    """Alias -> version, for every alias whose version is in the store."""
    default: str
    default_how: str
    """``alias:production`` or ``latest``."""
    split: tuple[tuple[str, str, float], ...] = ()
    """``(target, version, weight)`` with weights normalised to sum 1; empty: no split."""
    shadow: tuple[str, str] | None = None
    """``(target, version)`` of the shadow, if any."""
    store_versions: tuple[str, ...] = ()
    """Every version in the store, oldest first (to explain a 404 for an unserved version)."""
    policy: str = "latest: 1"
    """The version policy, as written in ``GET /models``."""
    warnings: tuple[str, ...] = field(default=())


def resolve_ref(ref: str, versions: tuple[str, ...], aliases: dict[str, str]) -> tuple[str, str]:
    """``(version, how)`` for ``ref`` among ``versions`` (oldest first): alias, latest, id, prefix.

    Raises :class:`LookupError` with a message fit for a client when nothing or several match.
    """
    if ref in aliases:
        return aliases[ref], f"alias:{ref}"
    if ref == LATEST:
        if not versions:
            raise LookupError("no versions")
        return versions[-1], LATEST
    if ref in versions:
        return ref, "version"
    matches = [v for v in versions if v.startswith(ref)]
    if len(matches) == 1:
        return matches[0], "version"
    if matches:
        raise LookupError(f"version prefix '{ref}' is ambiguous: {matches}")
    raise LookupError(f"no version or alias '{ref}'")


def plan_model(entry: ModelEntry, store_versions: list[str], aliases: dict[str, str]) -> ModelPlan:
    """The :class:`ModelPlan` of ``entry`` given its store versions (oldest first) and aliases."""
    stored = tuple(store_versions)
    if not stored:
        raise PlanError(f"model '{entry.store_name}' has no versions in the store")
    warnings: list[str] = []
    live_aliases: dict[str, str] = {}
    for alias, version in sorted(aliases.items()):
        if version in stored:
            live_aliases[alias] = version
        else:
            warnings.append(f"alias '{alias}' points at version '{version}', not in the store")

    policy = entry.version_policy
    if policy.all:
        chosen = set(stored)
    elif policy.specific:
        chosen = set()
        for ref in policy.specific:
            try:
                chosen.add(resolve_ref(ref, stored, {})[0])
            except LookupError as e:
                raise PlanError(f"version_policy of '{entry.name}': {e}") from None
    else:
        chosen = set(stored[-(policy.latest or 1) :])
    by_policy = set(chosen)
    chosen.update(live_aliases.values())

    def target(ref: str, role: str) -> tuple[str, str] | None:
        try:
            return resolve_ref(ref, stored, live_aliases)
        except LookupError as e:
            warnings.append(f"{role} target '{ref}' left out: {e}")
            return None

    split: list[tuple[str, str, float]] = []
    shadow: tuple[str, str] | None = None
    routing = entry.routing
    if routing is not None and routing.split:
        for ref, weight in routing.split.items():
            found = target(ref, "split")
            if found is not None and weight > 0:
                split.append((ref, found[0], weight))
        total = sum(w for _, _, w in split)
        if total > 0:
            split = [(ref, version, w / total) for ref, version, w in split]
        else:
            split = []
            warnings.append("no split target resolves: requests go to the default version")
    if routing is not None and routing.shadow:
        found = target(routing.shadow, "shadow")
        if found is not None:
            shadow = (routing.shadow, found[0])
    chosen.update(version for _, version, _ in split)
    if shadow is not None:
        chosen.add(shadow[1])

    versions = tuple(v for v in stored if v in chosen)
    if entry.pinned_version is not None:
        # "tag: iris:<version>" pins the default: the entry says which version answers, and an
        # alias moved by promote (compile points production at its source) must not override it
        (default,) = by_policy
        how = PINNED
    elif DEFAULT_ALIAS in live_aliases:
        default, how = live_aliases[DEFAULT_ALIAS], f"alias:{DEFAULT_ALIAS}"
    else:
        # newest by the policy: a version served only as an alias, split or shadow target (a
        # staging candidate, say) never becomes the default by being newer
        default, how = max(by_policy, key=stored.index), LATEST
    return ModelPlan(
        name=entry.name,
        store_name=entry.store_name,
        versions=versions,
        aliases=live_aliases,
        default=default,
        default_how=how,
        split=tuple(split),
        shadow=shadow,
        store_versions=stored,
        policy=policy.describe(),
        warnings=tuple(warnings),
    )
