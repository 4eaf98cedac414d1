"""The synthetic data set: deterministic, well-formed labels, images that match them."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from fashionserve.data.catalog import CannotRender
from fashionserve.data.dataset import render_samples
from fashionserve.data.fingerprint import rendered_fingerprint, written_fingerprint
from fashionserve.data.reader import read_split
from fashionserve.data.scenes import SPLITS
from fashionserve.data.writer import synthesize
from fashionserve.imaging import decode_image
from fashionserve.taxonomy import Taxonomy, load_taxonomy

IMAGES = 40


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> dict[str, Any]:
    """Seed 0 rendered in-process and with two workers, and seed 1."""
    root = tmp_path_factory.mktemp("synth")
    return {
        "a": (root / "a", synthesize(root / "a", IMAGES, 0, taxonomy, workers=1, progress=False)),
        "b": (root / "b", synthesize(root / "b", IMAGES, 0, taxonomy, workers=2, progress=False)),
        "c": (root / "c", synthesize(root / "c", IMAGES, 1, taxonomy, workers=1, progress=False)),
    }


def labels(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / split / "labels.json").read_text())


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(runs: dict[str, Any]) -> None:
    a, b = files(runs["a"][0]), files(runs["b"][0])
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_gives_different_data(runs: dict[str, Any]) -> None:
    a, c = runs["a"][0], runs["c"][0]
    assert labels(a, "train")["annotations"] != labels(c, "train")["annotations"]
    assert (a / "train/images/000001.jpg").read_bytes() != (
        c / "train/images/000001.jpg"
    ).read_bytes()


def test_summary_counts_match_the_files(runs: dict[str, Any]) -> None:
    root, summary = runs["a"]
    assert summary["splits"]["train"]["images"] == IMAGES
    assert summary["products"] >= 10
    for split in SPLITS:
        lab = labels(root, split)
        assert summary["splits"][split] == {
            "images": len(lab["images"]),
            "annotations": len(lab["annotations"]),
        }
        assert len(list((root / split / "images").glob("*.jpg"))) == len(lab["images"])


def test_labels_are_coco_style_and_valid_in_the_taxonomy(
    runs: dict[str, Any], taxonomy: Taxonomy
) -> None:
    root = runs["a"][0]
    for split in SPLITS:
        lab = labels(root, split)
        assert lab["info"] == {
            "seed": 0,
            "split": split,
            "taxonomy_version": taxonomy.version,
            "taxonomy_hash": taxonomy.hash,
        }
        cats = {c["id"]: c for c in lab["categories"]}
        assert [c["name"] for c in lab["categories"]] == taxonomy.leaves
        for c in lab["categories"]:
            assert c["path"] == list(taxonomy.path(c["name"]))
            assert c["supercategory"] == c["path"][-2]
        images = {im["id"]: im for im in lab["images"]}
        assert [im["file_name"] for im in lab["images"]] == [
            f"{i:06d}.jpg" for i in range(1, len(images) + 1)
        ]
        assert [a["id"] for a in lab["annotations"]] == list(range(1, len(lab["annotations"]) + 1))
        for ann in lab["annotations"]:
            im = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            path = ann["category_path"]
            assert cats[ann["category_id"]]["path"] == path
            assert path[-1] in taxonomy.leaves and list(taxonomy.path(path[-1])) == path
            applicable = {g.name for g in taxonomy.groups if taxonomy.group_applies(g, path)}
            assert set(ann["tags"]) == applicable
            for group in taxonomy.groups:
                if group.name not in applicable:
                    continue
                value = ann["tags"][group.name]
                if group.exclusive:
                    assert value in group.labels
                else:
                    assert isinstance(value, list) and set(value) <= set(group.labels)
            assert isinstance(ann["product_id"], int)


def test_sleeve_only_on_tops_and_full_body(runs: dict[str, Any]) -> None:
    anns = labels(runs["a"][0], "train")["annotations"]
    with_sleeve = {a["category_path"][0] for a in anns if "sleeve" in a["tags"]}
    without = {a["category_path"][0] for a in anns if "sleeve" not in a["tags"]}
    assert with_sleeve == {"top", "full-body"} and without == {"bottom"}


def test_every_leaf_appears_in_every_split(runs: dict[str, Any], taxonomy: Taxonomy) -> None:
    for split in SPLITS:
        seen = {a["category_path"][-1] for a in labels(runs["a"][0], split)["annotations"]}
        assert seen == set(taxonomy.leaves), split


def test_held_out_splits_show_only_products_train_never_shows(runs: dict[str, Any]) -> None:
    """val, test, query and gallery measure new products; seen measures training ones."""
    root, summary = runs["a"]
    shown = {
        split: {a["product_id"] for a in labels(root, split)["annotations"]} for split in SPLITS
    }
    train = shown["train"]
    for split in ("val", "test", "query", "gallery"):
        assert shown[split] and not shown[split] & train, split
    assert shown["seen"] <= train
    assert shown["val"] | shown["test"] | shown["query"] <= shown["gallery"]
    assert len(train) + len(shown["gallery"]) == summary["products"]


def test_train_products_repeat_and_gallery_has_one_shop_image_each(runs: dict[str, Any]) -> None:
    root, _ = runs["a"]
    counts = collections.Counter(a["product_id"] for a in labels(root, "train")["annotations"])
    assert min(counts.values()) >= 3
    gallery = labels(root, "gallery")
    per_image = collections.Counter(a["image_id"] for a in gallery["annotations"])
    assert set(per_image.values()) == {1} and len(per_image) == len(gallery["images"])
    # A product keeps its labels wherever it appears.
    described: dict[int, Any] = {}
    for split in SPLITS:
        for a in labels(root, split)["annotations"]:
            label = (a["category_path"], a["tags"])
            assert described.setdefault(a["product_id"], label) == label


def test_query_shows_every_gallery_product_with_one_or_two_garments(
    runs: dict[str, Any],
) -> None:
    root, _ = runs["a"]
    query = labels(root, "query")
    per_image = collections.Counter(a["image_id"] for a in query["annotations"])
    assert len(per_image) == len(query["images"])
    assert set(per_image.values()) <= {1, 2}
    gallery = {a["product_id"] for a in labels(root, "gallery")["annotations"]}
    assert {a["product_id"] for a in query["annotations"]} == gallery


def test_scenes_hold_zero_to_four_garments_with_some_empty(runs: dict[str, Any]) -> None:
    root = runs["a"][0]
    for split in ("train", "val", "test", "seen"):
        lab = labels(root, split)
        per_image = collections.Counter(a["image_id"] for a in lab["annotations"])
        assert max(per_image.values()) <= 4
    train = labels(root, "train")
    empty = {im["id"] for im in train["images"]} - {a["image_id"] for a in train["annotations"]}
    assert empty, "some train images should have no garment"


def test_images_decode_at_their_declared_size(runs: dict[str, Any]) -> None:
    root = runs["a"][0]
    for split in SPLITS:
        for im in labels(root, split)["images"]:
            pixels = decode_image((root / split / "images" / im["file_name"]).read_bytes())
            assert pixels.shape == (im["height"], im["width"], 3)


def test_image_sizes_and_aspect_ratios_vary(runs: dict[str, Any]) -> None:
    images = labels(runs["a"][0], "train")["images"]
    sizes = {(im["width"], im["height"]) for im in images}
    assert len(sizes) > len(images) // 2
    aspects = [im["width"] / im["height"] for im in images]
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    assert all(180 <= v <= 650 for im in images for v in (im["width"], im["height"]))


def test_garments_are_a_sizeable_share_of_the_image(runs: dict[str, Any]) -> None:
    lab = labels(runs["a"][0], "train")
    images = {im["id"]: im for im in lab["images"]}
    for a in lab["annotations"]:
        im = images[a["image_id"]]
        share = max(a["bbox"][2] / im["width"], a["bbox"][3] / im["height"])
        assert 0.1 <= share <= 1.0


def test_a_taxonomy_subset_restricts_the_labels(tmp_path: Path) -> None:
    tax = Taxonomy.from_dict(
        {
            "version": "t1",
            "categories": [
                {"name": "top", "children": ["shirt", "t-shirt"]},
                {"name": "bottom", "children": ["skirt"]},
            ],
            "tag_groups": [
                {"name": "colour", "exclusive": True, "labels": ["red", "blue"]},
                {
                    "name": "sleeve",
                    "exclusive": True,
                    "labels": ["short", "long"],
                    "applies_to": ["top"],
                },
            ],
        }
    )
    synthesize(tmp_path, 24, 3, tax, workers=1, progress=False)
    anns = labels(tmp_path, "train")["annotations"]
    assert {a["category_path"][-1] for a in anns} == {"shirt", "t-shirt", "skirt"}
    assert {a["tags"]["colour"] for a in anns} == {"red", "blue"}
    assert {a["tags"].get("sleeve") for a in anns} <= {"short", "long", None}
    assert all(set(a["tags"]) == {"colour"} for a in anns if a["category_path"][0] == "bottom")


def test_categories_the_renderer_cannot_draw_are_refused(tmp_path: Path) -> None:
    tax = Taxonomy.from_dict(
        {"version": "t2", "categories": [{"name": "accessory", "children": ["hat"]}]}
    )
    with pytest.raises(CannotRender, match="hat"):
        synthesize(tmp_path, 24, 0, tax, workers=1, progress=False)


def test_samples_rendered_in_memory_are_the_written_ones_read_back(runs: dict[str, Any]) -> None:
    """render_samples (no data set written) gives the bytes and labels synthesize writes,
    in the order asked, and read_split reads them back as the same samples."""
    root, _ = runs["a"]
    wanted = ("val", "gallery")
    in_memory = list(render_samples(IMAGES, 0, splits=wanted))
    read_back = [s for split in wanted for s in read_split(root, split).samples]
    assert [(s.split, s.index) for s in in_memory] == [(s.split, s.index) for s in read_back]
    assert in_memory == read_back
    assert any(s.garments for s in in_memory)


def test_only_the_splits_asked_are_written_with_the_same_bytes(
    runs: dict[str, Any], taxonomy: Taxonomy, tmp_path: Path
) -> None:
    """A calibration set of new products need not render train: val and test alone are the
    very files of the whole data set."""
    summary = synthesize(tmp_path, IMAGES, 0, taxonomy, progress=False, splits=("test", "val"))
    assert sorted(summary["splits"]) == ["test", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test", "val"]
    whole = files(runs["a"][0])
    assert {k: v for k, v in whole.items() if k.split("/")[0] in ("val", "test")} == files(tmp_path)
    with pytest.raises(CannotRender, match="holdout"):
        synthesize(tmp_path, IMAGES, 0, taxonomy, progress=False, splits=("holdout",))


def test_a_trend_draws_sleeves_training_never_had_and_is_recorded(
    taxonomy: Taxonomy, tmp_path: Path
) -> None:
    """``--trend short-sleeve-sweaters``: the active-learning experiment's shifted traffic.
    The standard catalog has no short-sleeved sweater; the trend's data set has them,
    labelled as such, and says which trend it shows."""

    def sweater_sleeves(labels: dict[str, Any]) -> collections.Counter[str]:
        return collections.Counter(
            a["tags"]["sleeve"]
            for a in labels["annotations"]
            if a["category_path"][-1] == "sweater"
        )

    synthesize(tmp_path / "s", 200, 3, taxonomy, progress=False, splits=("val",))
    synthesize(tmp_path / "t", 200, 3, taxonomy, progress=False, splits=("val",),
               trend="short-sleeve-sweaters")  # fmt: skip
    standard = json.loads((tmp_path / "s" / "val" / "labels.json").read_text())
    trend = json.loads((tmp_path / "t" / "val" / "labels.json").read_text())
    assert sweater_sleeves(standard)["short"] == 0 and sweater_sleeves(standard).total() > 0
    assert sweater_sleeves(trend)["short"] > sweater_sleeves(trend).total() / 3
    assert "trend" not in standard["info"]
    assert trend["info"]["trend"] == "short-sleeve-sweaters"
    with pytest.raises(CannotRender, match="unknown trend 'neon'"):
        synthesize(tmp_path / "u", 200, 3, taxonomy, progress=False, trend="neon")


def test_a_trend_data_set_fingerprints_as_itself(taxonomy: Taxonomy, tmp_path: Path) -> None:
    """A model trained on a trend's data records a fingerprint that re-renders with the
    trend (and differs from the standard data set of the same seed)."""
    synthesize(tmp_path, 24, 5, taxonomy, progress=False, trend="short-sleeve-sweaters")
    written = written_fingerprint(tmp_path, taxonomy)
    assert written["trend"] == "short-sleeve-sweaters"
    assert written == rendered_fingerprint(24, 5, taxonomy, "short-sleeve-sweaters")
    assert written["plan_sha256"] != rendered_fingerprint(24, 5, taxonomy)["plan_sha256"]
