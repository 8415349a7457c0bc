"""peflow.validation: features, suites and per-row reasons on a damaged corpus."""

from __future__ import annotations

import json

import pytest

from peflow.validation import features, suites
from tests.validation_fixtures import make_bad_corpus


@pytest.fixture(scope="module")
def corpora(tiny_corpus, tmp_path_factory):
    bad = tmp_path_factory.mktemp("validation") / "bad"
    return tiny_corpus, bad, make_bad_corpus(tiny_corpus, bad)


@pytest.fixture(scope="module")
def bad_df(corpora):
    _, bad, _ = corpora
    return features.extract(bad, _label_sets(bad))


def _label_sets(root):
    from peflow.data.formats import label_names

    return {k: label_names(root, k) for k in ("image", "video")}


def _row(df, item):
    rows = df[(df["shard"] == item["shard"]) & (df["key"] == item["key"])]
    return rows.iloc[-1]  # a duplicate: the later copy


def test_clean_text_marks_invalid_utf8():
    assert features.clean_text(b"caf\xc3\xa9") == ("café", True)
    text, ok = features.clean_text(b"bad \xff byte")
    assert not ok and text == "bad \ufffd byte"
    text, ok = features.clean_text(b"bad \xff".decode("utf-8", "surrogateescape"))
    assert not ok and text == "bad \ufffd"
    assert features.clean_text(None) == (None, True)


def test_suite_names_and_bounds_are_checked():
    assert suites.parse("video, image,video") == ["video", "image"]
    with pytest.raises(ValueError, match="nope"):
        suites.parse("image,nope")
    with pytest.raises(ValueError, match="min_side"):
        suites.Bounds(min_side=64, max_side=32).check()
    assert set(suites.SUITE_KIND) == set(suites.SUITES)


def test_features_turn_damage_into_row_values(corpora, bad_df):
    clean, bad, expected = corpora
    df = bad_df
    card = json.loads((clean / "card.json").read_text())
    assert len(df) == sum(n for splits in card["splits"].values() for n in splits.values()) + 1  # + duplicate
    assert df["readable"].all()
    by_damage = {e["reasons"][0] + ":" + e["kind"]: _row(df, e) for e in expected}
    assert not by_damage["media_undecodable:image"]["decodes"]
    assert "Error" in by_damage["media_undecodable:image"]["decode_error"]
    assert not by_damage["media_undecodable:video"]["decodes"]
    assert by_damage["caption_missing:image"]["caption"] is None
    assert not by_damage["caption_missing:video"]["has_caption"]
    assert not by_damage["caption_not_utf8:image"]["caption_utf8_valid"]
    assert "\ufffd" in by_damage["caption_not_utf8:image"]["caption"]
    assert by_damage["label_unknown:image"]["label_in_label_set"] is False
    assert by_damage["duplicate_key:image"]["key_repeat"] == 1
    good = df[df["decodes"] == True]  # noqa: E712
    assert set(good["width"]) == {32} and set(good[good["kind"] == "video"]["num_frames"]) == {16}


def test_truncated_shard_becomes_an_error_row(corpora, tmp_path):
    clean, _, _ = corpora
    shard = clean / "image" / "val" / "shard-000000.tar"
    cut = tmp_path / "image" / "val" / "shard-000000.tar"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    df = features.extract(tmp_path, {})
    # an error row, and the sample read last is not trusted (it may have lost entries to the cut)
    assert not df.iloc[-1]["readable"] and df.iloc[-1]["key"] is None
    assert not df.iloc[-2]["readable"] and df.iloc[-2]["key"] is not None
    assert df.iloc[:-2]["readable"].all() and len(df) > 2


def test_suites_give_each_bad_row_its_reasons(corpora, bad_df, tmp_path):
    from peflow.validation import gx_run

    _, bad, expected = corpora
    label_sets = _label_sets(bad)
    df = bad_df
    outcome = gx_run.run_suites(df, ["image", "video"], suites.Bounds(), label_sets, tmp_path / "gx")
    got = {(df.loc[i, "shard"], df.loc[i, "key"]): sorted(r) for i, r in outcome.reasons.items()}
    assert got == {(e["shard"], e["key"]): sorted(e["reasons"]) for e in expected}
    assert (outcome.docs_dir / "index.html").is_file()
    failed = {e["reason"] for e in outcome.expectations if not e["success"]}
    assert failed == {r for e in expected for r in e["reasons"]}


def test_captions_suite_judges_generated_captions(corpora, tmp_path):
    from peflow.validation import gx_run

    clean, _, _ = corpora
    df = features.extract(clean, {}, kinds=["video"]).head(5).copy()
    title = df.loc[1, "title"]
    for i, (caption, ok) in enumerate([("A white pentagon moves left across a grid.", True), (title, True),
                                       (None, True), ("abc", True), ("a caption \ufffd here", False)]):
        df.loc[i, "model_caption"], df.loc[i, "model_caption_utf8_valid"] = caption, ok
        df.loc[i, "has_model_caption"] = caption is not None
        df.loc[i, "model_caption_length"] = len(caption) if caption else None
        df.loc[i, "model_caption_equals_title"] = None if caption is None else caption.casefold() == df.loc[
            i, "title"].casefold()
    outcome = gx_run.run_suites(df, ["captions"], suites.Bounds(), {}, tmp_path / "gx")
    assert outcome.reasons == {1: ["model_caption_copies_title"], 2: ["model_caption_missing"],
                               3: ["model_caption_length_out_of_bounds"], 4: ["model_caption_not_utf8"]}
