"""Model versions: list, roll out, pin, roll back, prune, and the taxonomy compatibility check."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from test_repository import EMBEDDING, parse, write_crop_model, write_detector

from fashionserve.cli import main
from fashionserve.ensemble import MODEL_NAME
from fashionserve.model_repository.build import build_repository
from fashionserve.model_repository.settings import RepositorySettings
from fashionserve.model_repository.versions import list_versions, prune, rollback, rollout
from fashionserve.repository import RepositoryError, TaxonomyRef, served_version
from fashionserve.taxonomy import Taxonomy, load_taxonomy
from fashionserve.taxonomy_compat import (
    IncompatibleTaxonomy,
    check_compatible,
    compare_taxonomies,
)

BASE = load_taxonomy().to_dict()


def taxonomy(edit: Any = None) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    if edit is not None:
        edit(doc)
    return doc


def add_colour(doc: dict[str, Any]) -> None:
    doc["tag_groups"][0]["labels"].append("beige")


def rename_shorts(doc: dict[str, Any]) -> None:
    doc["categories"][1]["children"][2] = "short-trousers"


def publish_tagger(repo: Path, version: int, doc: dict[str, Any]) -> None:
    """A tagger version whose logit width and manifest follow ``doc``."""
    tax = Taxonomy.from_dict(doc)
    write_crop_model(repo, "tagger", "logits", tax.num_logits, version=version)
    manifest = {
        "model": {"name": "tagger", "kind": "tagger", "version": version},
        "created": f"2026-11-2{version}T00:00:00Z",
        "source_checkpoint": {"sha256": f"{version}" * 64},
        "artifacts": {"model.onnx": {"sha256": "ab" * 32}},
        "taxonomy": {"version": tax.version, "hash": tax.hash, "document": tax.to_dict()},
        "parity": {"passed": True},
    }
    (repo / "tagger" / str(version) / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A built repository serving tagger version 1 (default taxonomy)."""
    repo = tmp_path / "repo"
    write_detector(repo)
    write_crop_model(repo, "embedder", "embedding", EMBEDDING)
    publish_tagger(repo, 1, taxonomy())
    build_repository(repo, RepositorySettings(max_images_per_request=4, max_crops_per_image=3))
    return repo


def served(repo: Path) -> tuple[list[int], int, str]:
    """(tagger's version_policy, the ensemble's tagger step, the ensemble's taxonomy hash)."""
    step = next(
        s for s in parse(repo, MODEL_NAME).ensemble_scheduling.step if s.model_name == "tagger"
    )
    params = parse(repo, MODEL_NAME).parameters
    return (
        list(parse(repo, "tagger").version_policy.specific.versions),
        step.model_version,
        params["taxonomy_hash"].string_value,
    )


# ---------------------------------------------------------------------- compatibility
def test_adding_labels_is_compatible_and_listed() -> None:
    changes = compare_taxonomies(
        Taxonomy.from_dict(taxonomy()), Taxonomy.from_dict(taxonomy(add_colour))
    )
    assert changes.compatible
    assert changes.added == ["tag colour/'beige'"]


def test_removing_renaming_and_moving_labels_break_callers() -> None:
    def edits(doc: dict[str, Any]) -> None:
        rename_shorts(doc)
        doc["tag_groups"][3]["labels"].remove("bow")
        doc["categories"][0]["children"].remove("blazer")
        doc["categories"][2]["children"].append("blazer")  # moved: its path changes
        doc["tag_groups"][1]["exclusive"] = False

    changes = compare_taxonomies(
        Taxonomy.from_dict(taxonomy()), Taxonomy.from_dict(taxonomy(edits))
    )
    assert not changes.compatible
    text = "\n".join(changes.breaking)
    assert "category 'bottom/shorts' removed (renamed to 'short-trousers'?)" in text
    assert "tag details/'bow' removed" in text
    assert "category 'blazer' moved: top/blazer -> full-body/blazer" in text
    assert "tag group 'pattern' changed from exclusive to independent" in text


def test_the_check_refuses_unless_forced_and_says_what_breaks() -> None:
    def recorded(doc: dict[str, Any]) -> TaxonomyRef:
        tax = Taxonomy.from_dict(doc)
        return TaxonomyRef(tax.version, tax.hash, tax.num_logits, document=tax)

    old, new = recorded(taxonomy()), recorded(taxonomy(rename_shorts))
    with pytest.raises(IncompatibleTaxonomy, match="bottom/shorts' removed") as info:
        check_compatible("tagger", 1, old, new)
    assert "--force" in str(info.value) and "served version 1" in str(info.value)
    assert info.value.reason == "INCOMPATIBLE_TAXONOMY"
    forced = check_compatible("tagger", 1, old, new, force=True)
    assert forced is not None and forced.breaking


def test_detector_classes_may_only_be_appended() -> None:
    def det(classes: list[str]) -> TaxonomyRef:
        return TaxonomyRef("1", "h", classes=tuple(classes))

    appended = check_compatible(
        "detector", 1, det(["top", "bottom"]), det(["top", "bottom", "bag"])
    )
    assert appended is not None and appended.added == ["detector class 'bag'"]
    with pytest.raises(IncompatibleTaxonomy, match="reordered or replaced"):
        check_compatible("detector", 1, det(["top", "bottom"]), det(["bottom", "top"]))


# --------------------------------------------------------------------------- versions
def test_publishing_changes_nothing_served_until_rolled_out(repo: Path) -> None:
    publish_tagger(repo, 2, taxonomy(add_colour))
    assert served(repo)[:2] == ([1], 1)
    assert served_version(repo / "tagger") == 1

    switch = rollout(repo, "tagger")
    assert (switch.old, switch.new) == (1, 2)
    assert switch.changes is not None and switch.changes.added == ["tag colour/'beige'"]
    policy, step, taxonomy_hash = served(repo)
    assert (policy, step) == ([2], 2)
    # The ensemble now describes version 2: its taxonomy, for the gateway to decode with.
    assert taxonomy_hash == Taxonomy.from_dict(taxonomy(add_colour)).hash
    document = parse(repo, MODEL_NAME).parameters["taxonomy_document"].string_value
    assert Taxonomy.from_dict(json.loads(document)).hash == taxonomy_hash
    # Rebuilt with the settings the repository was built with, not the defaults.
    assert parse(repo, MODEL_NAME).parameters["max_crops_per_image"].string_value == "3"


def test_a_rollout_that_renames_a_label_is_refused_unless_forced(repo: Path) -> None:
    publish_tagger(repo, 2, taxonomy(rename_shorts))
    with pytest.raises(IncompatibleTaxonomy, match="shorts"):
        rollout(repo, "tagger")
    assert served(repo)[:2] == ([1], 1)  # nothing changed

    rollout(repo, "tagger", force=True)
    assert served(repo)[:2] == ([2], 2)


def test_pin_survives_a_rebuild_and_rollback_pins_the_previous_version(repo: Path) -> None:
    publish_tagger(repo, 2, taxonomy())
    publish_tagger(repo, 3, taxonomy())
    rollout(repo, "tagger")
    assert served(repo)[:2] == ([3], 3)

    switch = rollback(repo, "tagger")
    assert (switch.old, switch.new) == (3, 2)
    build_repository(repo, RepositorySettings(max_images_per_request=4, max_crops_per_image=3))
    assert served(repo)[:2] == ([2], 2)  # a plain rebuild keeps the pin
    listed = {i.version: i for i in list_versions(repo, "tagger")}
    assert listed[2].served and listed[2].pinned and not listed[3].served
    assert listed[3].checkpoint_sha256 == "3" * 64 and listed[3].parity_passed is True

    with pytest.raises(RepositoryError, match="not the newest"):
        rollout(repo, "tagger", 2)  # serving an older version is a pin
    rollout(repo, "tagger")  # back to the newest, pin removed
    assert served(repo)[:2] == ([3], 3)
    assert not any(i.pinned for i in list_versions(repo, "tagger"))


def test_prune_keeps_the_newest_and_never_the_served_or_pinned(repo: Path) -> None:
    for version in (2, 3, 4, 5):
        publish_tagger(repo, version, taxonomy())
    rollout(repo, "tagger", 2, pin=True)
    assert prune(repo, "tagger", keep=2) == [1, 3]
    assert sorted(int(p.name) for p in (repo / "tagger").iterdir() if p.name.isdigit()) == [
        2,
        4,
        5,
    ]
    assert not any(p.name.startswith(".") for p in (repo / "tagger").iterdir())
    with pytest.raises(RepositoryError, match="at least 1"):
        prune(repo, "tagger", keep=0)


def test_the_versions_commands(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish_tagger(repo, 2, taxonomy(rename_shorts))
    args = ["repo", "versions"]
    assert main([*args, "list", "--repository", str(repo), "--model", "tagger"]) == 0
    out = capsys.readouterr().out
    assert "served" in out.splitlines()[1] and out.splitlines()[2].split()[:3] == [
        "tagger",
        "2",
        "-",
    ]

    assert main([*args, "rollout", "--repository", str(repo), "--model", "tagger"]) == 1
    err = capsys.readouterr().err
    assert "error: tagger: the new version's taxonomy breaks callers" in err
    assert "'bottom/shorts' removed" in err

    assert main([*args, "rollout", "--repository", str(repo), "--model", "tagger", "--force"]) == 0
    assert "tagger: serving version 2 (was 1)" in capsys.readouterr().out
    assert main([*args, "rollback", "--repository", str(repo), "--model", "tagger", "--force"]) == 0
    assert "tagger: serving version 1 (was 2)" in capsys.readouterr().out
    assert served(repo)[:2] == ([1], 1)
    assert main([*args, "list", "--repository", str(repo), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(v["model"], v["version"], v["pinned"]) for v in listed} >= {("tagger", 1, True)}


def test_export_refuses_a_taxonomy_that_breaks_the_served_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_export import make_checkpoint

    repo = tmp_path / "repo"
    served_ckpt = make_checkpoint("tagger", tmp_path / "v1.pt", Taxonomy.from_dict(taxonomy()))
    assert main(["export", "--checkpoint", str(served_ckpt), "--repository", str(repo)]) == 0
    renamed = make_checkpoint(
        "tagger", tmp_path / "v2.pt", Taxonomy.from_dict(taxonomy(rename_shorts))
    )
    args = ["export", "--checkpoint", str(renamed), "--repository", str(repo)]
    capsys.readouterr()

    assert main(args) == 1
    err = capsys.readouterr().err
    assert "breaks callers of the served version 1" in err and "'bottom/shorts' removed" in err
    assert sorted(p.name for p in (repo / "tagger").iterdir()) == ["1"]  # nothing published

    assert main([*args, "--force"]) == 0
    assert "breaks callers: category 'bottom/shorts' removed" in capsys.readouterr().out
    assert (repo / "tagger" / "2" / "manifest.json").is_file()


def test_a_version_with_other_shapes_is_not_switched_live(repo: Path) -> None:
    """During a live switch one config loads both versions: a new embedding size cannot."""
    write_crop_model(repo, "embedder", "embedding", EMBEDDING + 4, version=2)
    with pytest.raises(RepositoryError, match=r"output embedding: \[16\] TYPE_FP32 -> \[20\]"):
        rollout(repo, "embedder", tritons=["127.0.0.1:1"])  # refused before any call
    assert list(parse(repo, "embedder").version_policy.specific.versions) == [1]
    rollout(repo, "embedder")  # offline, then a Triton restart, is fine
    assert list(parse(repo, "embedder").version_policy.specific.versions) == [2]
