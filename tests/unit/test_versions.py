"""models/versions.py (the serving plan), models/reload.py (desired state, change detection) and
the store side of models/aliases.py they rely on (versions(), fingerprint())."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.harness.store import bentoml_store, save_iris
from models.aliases import AliasStore
from models.config import ModelEntry, parse_model_config
from models.reload import Desired, desired, fingerprint, read_desired
from models.versions import LATEST, ModelPlan, PlanError, plan_model, resolve_ref

# Four stored versions, oldest first. Two share the prefix "abc" so prefixes can be ambiguous.
V1, V2, V3, V4 = "abc1x7kq", "abc2m4pz", "def3r8ts", "ghi4w2yn"
STORE = [V1, V2, V3, V4]


def entry(**fields: Any) -> ModelEntry:
    return ModelEntry.model_validate({"name": "iris", **fields})


def plan(aliases: dict[str, str] | None = None, store: list[str] | None = None, **fields: Any):
    return plan_model(entry(**fields), STORE if store is None else store, aliases or {})


# --- resolve_ref ----------------------------------------------------------------------------------


def test_resolve_ref_alias_latest_id_prefix() -> None:
    versions = tuple(STORE)
    aliases = {"production": V2, "staging": V4}
    assert resolve_ref("production", versions, aliases) == (V2, "alias:production")
    assert resolve_ref("staging", versions, aliases) == (V4, "alias:staging")
    assert resolve_ref(LATEST, versions, aliases) == (V4, "latest")
    assert resolve_ref(V1, versions, aliases) == (V1, "version")
    assert resolve_ref("abc1", versions, aliases) == (V1, "version")
    assert resolve_ref("d", versions, aliases) == (V3, "version")


def test_resolve_ref_prefers_an_exact_id_to_a_longer_version_it_prefixes() -> None:
    assert resolve_ref("abc", ("abc", "abcd"), {}) == ("abc", "version")


def test_resolve_ref_alias_wins_over_a_version_prefix() -> None:
    assert resolve_ref("def", tuple(STORE), {"def": V1}) == (V1, "alias:def")


@pytest.mark.parametrize(
    ("ref", "versions", "message"),
    [
        ("abc", tuple(STORE), "ambiguous"),
        ("zzz", tuple(STORE), "no version or alias 'zzz'"),
        ("production", tuple(STORE), "no version or alias 'production'"),
        (LATEST, (), "no versions"),
    ],
)
def test_resolve_ref_failures(ref: str, versions: tuple[str, ...], message: str) -> None:
    with pytest.raises(LookupError, match=message):
        resolve_ref(ref, versions, {})


# --- version_policy -------------------------------------------------------------------------------


def test_default_policy_is_latest_one() -> None:
    p = plan()
    assert isinstance(p, ModelPlan)
    assert p.versions == (V4,)
    assert p.policy == "latest: 1"
    assert (p.default, p.default_how) == (V4, "latest")
    assert p.store_versions == tuple(STORE)
    assert p.aliases == {} and p.split == () and p.shadow is None and p.warnings == ()
    assert (p.name, p.store_name) == ("iris", "iris")


@pytest.mark.parametrize(("n", "served"), [(1, [V4]), (2, [V3, V4]), (4, STORE), (50, STORE)])
def test_policy_latest_n(n: int, served: list[str]) -> None:
    p = plan(version_policy={"latest": n})
    assert p.versions == tuple(served)
    assert p.policy == f"latest: {n}"
    assert p.default == V4


def test_policy_all() -> None:
    p = plan(version_policy={"all": True})
    assert p.versions == tuple(STORE)
    assert p.policy == "all"
    assert (p.default, p.default_how) == (V4, "latest")


def test_policy_specific_ids_and_prefixes_served_oldest_first() -> None:
    p = plan(version_policy={"specific": [V3, "abc1"]})
    assert p.versions == (V1, V3)  # store order, not the order written
    assert p.policy == f"specific: {V3}, abc1"
    assert (p.default, p.default_how) == (V3, "latest")  # the newest served, not the newest stored


def test_policy_specific_duplicates_collapse() -> None:
    assert plan(version_policy={"specific": [V2, "abc2", V2[:5]]}).versions == (V2,)


@pytest.mark.parametrize(
    ("ref", "message"),
    [("nope", "no version or alias 'nope'"), ("abc", "ambiguous"), ("production", "production")],
)
def test_policy_specific_unknown_or_ambiguous_is_a_plan_error(ref: str, message: str) -> None:
    # specific names versions, not aliases: "production" is unknown even when the alias is set
    with pytest.raises(PlanError, match=message) as info:
        plan({"production": V1}, version_policy={"specific": [V1, ref]})
    assert "version_policy of 'iris'" in str(info.value)


def test_pinned_tag_is_specific() -> None:
    pinned = plan(tag=f"iris:{V2}")
    specific = plan(version_policy={"specific": [V2]})
    assert pinned.versions == specific.versions == (V2,)
    assert pinned.policy == specific.policy == f"specific: {V2}"
    assert pinned.default == V2


def test_pinned_tag_prefix_and_unknown_pin() -> None:
    assert plan(tag="iris:def").versions == (V3,)
    with pytest.raises(PlanError, match="no version or alias 'gone'"):
        plan(tag="iris:gone")


def test_store_name_comes_from_the_tag() -> None:
    p = plan(tag=f"iris_v2:{V1}")
    assert (p.name, p.store_name) == ("iris", "iris_v2")
    assert plan(tag="other").store_name == "other"


def test_no_versions_in_the_store_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="'iris' has no versions in the store"):
        plan(store=[])
    with pytest.raises(PlanError, match="'other' has no versions"):
        plan_model(entry(tag="other:latest"), [], {"production": V1})


def test_plan_error_is_a_value_error() -> None:
    assert issubclass(PlanError, ValueError)


# --- aliases and the default version --------------------------------------------------------------


def test_aliased_versions_are_always_served() -> None:
    p = plan({"staging": V1, "canary": V3})
    assert p.versions == (V1, V3, V4)  # latest: 1 plus both aliases, oldest first
    assert p.aliases == {"canary": V3, "staging": V1}
    assert (p.default, p.default_how) == (V4, "latest")


def test_aliases_add_to_a_specific_policy() -> None:
    p = plan({"staging": V4}, version_policy={"specific": [V1]})
    assert p.versions == (V1, V4)


def test_production_alias_is_the_default_even_when_older() -> None:
    p = plan({"production": V2}, version_policy={"all": True})
    assert (p.default, p.default_how) == (V2, "alias:production")
    assert p.versions == tuple(STORE)


def test_production_alias_outside_the_policy_is_served_and_default() -> None:
    p = plan({"production": V1})
    assert p.versions == (V1, V4)
    assert (p.default, p.default_how) == (V1, "alias:production")


def test_a_versioned_tag_pins_the_default_over_production() -> None:
    # compile points production at its source; an entry pinned to the compiled version must
    # still answer with it (the formats benchmark served the source under the compiled name)
    p = plan({"production": V1}, tag=f"iris:{V3[:5]}")
    assert (p.default, p.default_how) == (V3, "tag")
    assert p.versions == (V1, V3)  # the alias's version is still served by name
    assert plan({"production": V1}, version_policy={"specific": [V3]}).default == V1


def test_without_production_the_newest_served_version_is_default() -> None:
    p = plan({"staging": V1}, version_policy={"latest": 2})
    assert (p.default, p.default_how) == (V4, "latest")


def test_alias_to_a_version_not_in_the_store_is_ignored_with_a_warning() -> None:
    p = plan({"production": "deleted1", "staging": V2})
    assert p.aliases == {"staging": V2}
    assert "deleted1" not in p.versions
    assert p.versions == (V2, V4)
    # production is dangling: the default falls back to the newest served version
    assert (p.default, p.default_how) == (V4, "latest")
    assert len(p.warnings) == 1
    assert "alias 'production'" in p.warnings[0] and "deleted1" in p.warnings[0]


def test_warnings_are_in_a_stable_order() -> None:
    a = plan({"zeta": "gone-z", "alpha": "gone-a"})
    b = plan({"alpha": "gone-a", "zeta": "gone-z"})
    assert a.warnings == b.warnings
    assert [w.split("'")[1] for w in a.warnings] == ["alpha", "zeta"]


# --- routing: split -------------------------------------------------------------------------------


def test_split_weights_are_normalised() -> None:
    p = plan(
        {"production": V2, "staging": V3}, routing={"split": {"production": 90, "staging": 10}}
    )
    assert [(t, v) for t, v, _ in p.split] == [("production", V2), ("staging", V3)]
    assert [w for _, _, w in p.split] == pytest.approx([0.9, 0.1])
    assert sum(w for _, _, w in p.split) == pytest.approx(1.0)
    assert p.warnings == ()
    # relative weights: 0.9 / 0.1 is the same split
    q = plan(
        {"production": V2, "staging": V3}, routing={"split": {"production": 0.9, "staging": 0.1}}
    )
    assert [w for _, _, w in q.split] == pytest.approx([0.9, 0.1])


def test_split_targets_may_be_versions_prefixes_and_latest() -> None:
    p = plan(routing={"split": {V1: 1, "def": 1, "latest": 2}})
    assert [(t, v) for t, v, _ in p.split] == [(V1, V1), ("def", V3), ("latest", V4)]
    assert [w for _, _, w in p.split] == pytest.approx([0.25, 0.25, 0.5])


def test_split_targets_are_served() -> None:
    p = plan(routing={"split": {V1: 50, "abc2": 50}})  # latest: 1 serves V4 alone
    assert p.versions == (V1, V2, V4)
    assert (p.default, p.default_how) == (V4, "latest")  # the split does not change the default


def test_unresolvable_split_target_is_left_out_and_the_rest_renormalised() -> None:
    p = plan(
        {"production": V2, "canary": V3},
        routing={"split": {"production": 60, "staging": 30, "canary": 20}},
    )
    assert [(t, v) for t, v, _ in p.split] == [("production", V2), ("canary", V3)]
    assert [w for _, _, w in p.split] == pytest.approx([0.75, 0.25])
    assert len(p.warnings) == 1
    assert "split target 'staging' left out" in p.warnings[0]


def test_ambiguous_split_target_is_left_out() -> None:
    p = plan(routing={"split": {"abc": 1, V3: 1}})
    assert [(t, v, w) for t, v, w in p.split] == [(V3, V3, 1.0)]
    assert any("split target 'abc' left out" in w and "ambiguous" in w for w in p.warnings)
    assert V1 not in p.versions and V2 not in p.versions


def test_split_with_no_resolvable_target_means_no_split() -> None:
    p = plan(routing={"split": {"staging": 50, "canary": 50}})
    assert p.split == ()
    assert p.versions == (V4,)
    assert (p.default, p.default_how) == (V4, "latest")
    assert any("no split target resolves" in w for w in p.warnings)
    assert sum("left out" in w for w in p.warnings) == 2


def test_split_target_with_alias_to_a_missing_version_is_left_out() -> None:
    p = plan({"staging": "deleted1"}, routing={"split": {"staging": 1, V4: 1}})
    assert [(t, v) for t, v, _ in p.split] == [(V4, V4)]
    assert any("alias 'staging'" in w for w in p.warnings)
    assert any("split target 'staging' left out" in w for w in p.warnings)


def test_zero_weight_split_target_is_dropped() -> None:
    p = plan({"staging": V1}, routing={"split": {"latest": 1, V2: 0}})
    assert [(t, v, w) for t, v, w in p.split] == [("latest", V4, 1.0)]
    assert V2 not in p.versions  # a zero-weight target does not get a version loaded
    assert p.versions == (V1, V4)


def test_split_with_only_zero_weight_resolvable_targets_means_no_split() -> None:
    p = plan(routing={"split": {V1: 0, "staging": 5}})
    assert p.split == ()
    assert V1 not in p.versions
    assert any("no split target resolves" in w for w in p.warnings)


# --- routing: shadow ------------------------------------------------------------------------------


def test_shadow_resolves_and_is_served() -> None:
    p = plan({"candidate": V2}, routing={"shadow": "candidate"})
    assert p.shadow == ("candidate", V2)
    assert p.versions == (V2, V4)
    assert p.split == ()
    p = plan(routing={"shadow": "def"})
    assert p.shadow == ("def", V3)
    assert p.versions == (V3, V4)


def test_unresolvable_shadow_is_none_with_a_warning() -> None:
    p = plan(routing={"shadow": "candidate"})
    assert p.shadow is None
    assert p.versions == (V4,)
    assert p.warnings == ("shadow target 'candidate' left out: no version or alias 'candidate'",)


def test_split_and_shadow_together() -> None:
    p = plan(
        {"production": V1, "staging": V2, "candidate": V3},
        routing={"split": {"production": 9, "staging": 1}, "shadow": "candidate"},
    )
    assert [v for _, v, _ in p.split] == [V1, V2]
    assert p.shadow == ("candidate", V3)
    assert p.versions == tuple(STORE)
    assert (p.default, p.default_how) == (V1, "alias:production")


def test_plans_are_immutable_and_comparable() -> None:
    p = plan({"production": V2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.default = V1  # type: ignore[misc]
    assert p == plan({"production": V2})
    assert p != plan({"production": V3})


# --- a real store: AliasStore.versions / fingerprint, desired(), fingerprint() --------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AliasStore, list[str]]]:
    """A temporary store with two versions of ``iris`` (oldest first); tests that change the store
    use a model name of their own."""
    home = tmp_path_factory.mktemp("versions") / "bentoml"
    with bentoml_store(home):
        versions = [save_iris("iris", 0.1), save_iris("iris", 1.0)]
        yield AliasStore(home / "models"), versions


def write_config(path: Path, *models: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"models": list(models)}))
    return path


def test_store_versions_are_oldest_first(store) -> None:
    aliases, versions = store
    assert aliases.versions("iris") == versions
    assert aliases.versions("no_such_model") == []


def test_versions_skip_a_half_written_version_directory(store) -> None:
    aliases, _ = store
    v1 = save_iris("partial")
    folder = aliases.models_dir / "partial"
    (folder / "zzzzhalfwritten").mkdir()  # BentoML creates the directory before its files
    (folder / "aaaagarbage").mkdir()
    (folder / "aaaagarbage" / "model.yaml").write_text("{not: [valid")
    (folder / "notadir").write_text("x")
    assert aliases.versions("partial") == [v1]
    assert aliases.latest("partial") == v1
    # and the planner keeps working while the save is in progress
    cfg = parse_model_config({"models": [{"name": "partial"}]})
    state = desired(cfg, aliases)
    assert state.errors == {}
    assert state.plans["partial"].store_versions == (v1,)


def test_desired_plans_every_model_and_reports_errors_per_model(store) -> None:
    aliases, (v0, v1) = store
    cfg = parse_model_config(
        {
            "models": [
                {"name": "iris", "version_policy": {"all": True}},
                {"name": "ghost"},  # not in the store
                {"name": "pinned", "tag": "iris:nosuchversion"},
                {"name": "iris_old", "tag": f"iris:{v0}"},
            ]
        }
    )
    state = desired(cfg, aliases)  # must not raise
    assert isinstance(state, Desired) and state.config is cfg
    assert set(state.plans) == {"iris", "iris_old"}
    assert state.plans["iris"].versions == (v0, v1)
    assert state.plans["iris_old"].versions == (v0,)
    assert state.plans["iris_old"].store_name == "iris"
    assert set(state.errors) == {"ghost", "pinned"}
    assert "'ghost' has no versions in the store" in state.errors["ghost"]
    assert "nosuchversion" in state.errors["pinned"]


def test_desired_reports_a_broken_alias_file_for_that_model_only(store) -> None:
    aliases, _ = store
    version = save_iris("broken")
    aliases.path("broken").write_text("{not json")
    cfg = parse_model_config({"models": [{"name": "broken"}, {"name": "iris"}]})
    state = desired(cfg, aliases)
    assert "not valid JSON" in state.errors["broken"]
    assert set(state.plans) == {"iris"}
    aliases.path("broken").unlink()
    assert desired(cfg, aliases).plans["broken"].versions == (version,)


def test_desired_uses_the_aliases_in_the_store(store) -> None:
    aliases, _ = store
    old, new = save_iris("aliased", 0.1), save_iris("aliased", 1.0)
    aliases.promote("aliased", old)
    aliases.promote("aliased", new, "staging")
    cfg = parse_model_config(
        {"models": [{"name": "aliased", "routing": {"split": {"production": 3, "staging": 1}}}]}
    )
    p = desired(cfg, aliases).plans["aliased"]
    assert p.aliases == {"production": old, "staging": new}
    assert (p.default, p.default_how) == (old, "alias:production")
    assert [(t, v, w) for t, v, w in p.split] == [
        ("production", old, pytest.approx(0.75)),
        ("staging", new, pytest.approx(0.25)),
    ]


def test_read_desired_reads_the_models_file(store, tmp_path) -> None:
    from models.config import ConfigError

    aliases, (_, v1) = store
    path = write_config(tmp_path / "models.yaml", {"name": "iris"}, {"name": "ghost"})
    state = read_desired(path, aliases)
    assert state.plans["iris"].versions == (v1,)
    assert set(state.errors) == {"ghost"}
    with pytest.raises(ConfigError):
        read_desired(tmp_path / "missing.yaml", aliases)


def test_alias_store_fingerprint_of_a_missing_model(store) -> None:
    aliases, _ = store
    assert aliases.fingerprint("no_such_model") == (None, None, None)


def test_fingerprint_is_stable_while_nothing_changes(store, tmp_path) -> None:
    aliases, _ = store
    path = write_config(tmp_path / "models.yaml", {"name": "iris"}, {"name": "ghost"})
    cfg = read_desired(path, aliases).config
    first = fingerprint(path, cfg, aliases)
    desired(cfg, aliases)  # reading the store and the aliases changes nothing
    aliases.versions("iris")
    assert fingerprint(path, cfg, aliases) == first
    assert fingerprint(str(path), cfg, aliases) == first
    assert len(first) == 3  # the file plus one entry per store name (ghost included)


def test_fingerprint_changes_when_a_version_is_saved(store, tmp_path) -> None:
    aliases, _ = store
    save_iris("grows")
    path = write_config(tmp_path / "models.yaml", {"name": "grows"})
    cfg = read_desired(path, aliases).config
    before = fingerprint(path, cfg, aliases)
    save_iris("grows")
    after = fingerprint(path, cfg, aliases)
    assert after != before
    assert after[0] == before[0]  # the models file did not change
    assert fingerprint(path, cfg, aliases) == after


def test_fingerprint_changes_when_the_first_version_appears(store, tmp_path) -> None:
    aliases, _ = store
    path = write_config(tmp_path / "models.yaml", {"name": "newborn"})
    cfg = read_desired(path, aliases).config
    before = fingerprint(path, cfg, aliases)
    assert before[1] == (None, None, None)
    save_iris("newborn")
    assert fingerprint(path, cfg, aliases) != before


def test_fingerprint_ignores_models_not_in_the_config(store, tmp_path) -> None:
    aliases, _ = store
    save_iris("unlisted")
    path = write_config(tmp_path / "models.yaml", {"name": "iris"})
    cfg = read_desired(path, aliases).config
    before = fingerprint(path, cfg, aliases)
    save_iris("unlisted")
    aliases.promote("unlisted", aliases.versions("unlisted")[0])
    assert fingerprint(path, cfg, aliases) == before


def test_fingerprint_changes_on_promote_and_rollback(store, tmp_path) -> None:
    aliases, _ = store
    first, second = save_iris("promoted", 0.1), save_iris("promoted", 1.0)
    path = write_config(tmp_path / "models.yaml", {"name": "promoted"})
    cfg = read_desired(path, aliases).config
    seen = [fingerprint(path, cfg, aliases)]
    aliases.promote("promoted", first)
    seen.append(fingerprint(path, cfg, aliases))
    aliases.promote("promoted", second)
    seen.append(fingerprint(path, cfg, aliases))
    aliases.rollback("promoted")
    seen.append(fingerprint(path, cfg, aliases))
    assert len(set(seen)) == len(seen)
    assert {fp[0] for fp in seen} == {seen[0][0]}  # only the store part moved
    assert desired(cfg, aliases).plans["promoted"].default == first


def test_fingerprint_changes_when_the_models_file_changes(store, tmp_path) -> None:
    aliases, _ = store
    path = write_config(tmp_path / "models.yaml", {"name": "iris"})
    cfg = read_desired(path, aliases).config
    before = fingerprint(path, cfg, aliases)
    write_config(path, {"name": "iris", "version_policy": {"all": True}})
    changed = fingerprint(path, cfg, aliases)
    assert changed != before and changed[1:] == before[1:]
    # a ConfigMap-style swap: a new file renamed over the old one (new inode, same size)
    swapped = tmp_path / "new.yaml"
    swapped.write_text(path.read_text())
    swapped.replace(path)
    assert fingerprint(path, cfg, aliases) != changed
    # a deleted file is a change too, and does not raise
    path.unlink()
    gone = fingerprint(path, cfg, aliases)
    assert gone[0] is None and gone[1:] == before[1:]


def test_fingerprint_without_a_config_covers_only_the_file(store, tmp_path) -> None:
    aliases, _ = store
    path = write_config(tmp_path / "models.yaml", {"name": "iris"})
    fp = fingerprint(path, None, aliases)
    assert len(fp) == 1 and fp[0] is not None
    assert fingerprint(tmp_path / "missing.yaml", None, aliases) == (None,)


def test_fingerprint_lists_each_store_name_once(store, tmp_path) -> None:
    aliases, (v0, _) = store
    path = write_config(
        tmp_path / "models.yaml",
        {"name": "iris"},
        {"name": "iris_old", "tag": f"iris:{v0}"},
        {"name": "other", "tag": "iris"},
    )
    cfg = read_desired(path, aliases).config
    assert fingerprint(path, cfg, aliases) == (
        fingerprint(path, None, aliases)[0],
        aliases.fingerprint("iris"),
    )


def test_default_without_production_is_the_policys_newest_not_a_side_version() -> None:
    # a pinned V1 with a newer staging alias and a newer shadow: V1 still answers by default
    p = plan({"staging": V4, "candidate": V3}, tag=f"iris:{V1}", routing={"shadow": "candidate"})
    assert set(p.versions) == {V1, V3, V4}
    assert (p.default, p.default_how) == (V1, "tag")
