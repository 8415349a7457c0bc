import json

import pytest

from peflow import io


def test_atomic_output_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with io.atomic_output_dir(out) as d:
        (d / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError):
        with io.atomic_output_dir(out) as d:
            (d / "a.txt").write_text("half-written")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    with io.atomic_output_dir(out) as d:
        (d / "b.txt").write_text("two")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_manifest_hashes(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x.bin").write_bytes(b"abc")
    m = io.write_manifest(out, stage="s", key="k1", config={"k": 1}, inputs={"data": "h"}, counts={"n": 1})
    assert m["outputs"] == {"x.bin": io.file_sha256(out / "x.bin")}
    assert json.loads((out / io.MANIFEST).read_text())["output_digest"] == m["output_digest"]
    assert json.loads((out / io.MANIFEST).read_text())["key"] == "k1"
    assert io.dataset_digest(out) == m["output_digest"]
