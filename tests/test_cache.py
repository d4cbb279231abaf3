"""xkd.cache: keys (unchanged from the ones existing caches were written with), layout, read/write."""

from __future__ import annotations

import hashlib
import json
import logging

import torch

from xkd.cache import Cache


def test_keys_are_the_sha256_prefixes_existing_caches_use():
    # one JSON value: the teacher-cache key of the pipeline, sha256(json.dumps(key, sort_keys=True))[:16]
    desc = {"seed": 0, "data": {"name": "digits", "size": 16}}
    assert Cache.key(desc) == hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    # tensors: shape then raw bytes; several parts are hashed in order
    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    h = hashlib.sha256()
    h.update(b"(2, 3)")
    h.update(t.numpy().tobytes())
    h.update(b'"x"')
    assert Cache.key(t, "x") == h.hexdigest()[:16]
    assert Cache.key(t, "x") != Cache.key("x", t) and len(Cache.key()) == 16


def test_layout_of_file_and_folder_entries(tmp_path):
    cache = Cache(tmp_path)
    assert cache.file("xdistill", "targets", "0123abcd") == tmp_path / "xdistill" / "targets-0123abcd.safetensors"
    assert cache.folder("teachers", "0123abcd") == tmp_path / "teachers" / "0123abcd"
    assert not (tmp_path / "xdistill").exists()  # paths only: nothing is created before a write


def test_write_then_read_with_the_key_and_the_seconds(tmp_path):
    path = Cache(tmp_path).file("k", "t", "abc")
    assert Cache.read(path, "desc") is None  # missing: no file, no warning
    tensors = {"a": torch.randn(2, 3, requires_grad=True), "b": torch.arange(4)}
    Cache.write(path, "desc", tensors, seconds=1.5)
    got = Cache.read(path, "desc")
    assert (
        set(got) == {"a", "b"} and torch.equal(got["a"], tensors["a"].detach()) and torch.equal(got["b"], tensors["b"])
    )
    assert Cache.seconds(path) == 1.5
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temp file left
    Cache.write(path, "desc", tensors)
    assert Cache.seconds(path) == 0.0  # not stored


def test_another_key_or_a_damaged_file_reads_as_none_with_a_warning(tmp_path, caplog):
    path = tmp_path / "e.safetensors"
    Cache.write(path, "teacher A", {"a": torch.zeros(1)})
    with caplog.at_level(logging.WARNING, logger="xkd"):
        assert Cache.read(path, "teacher B") is None
    assert "written for another key" in caplog.text
    path.write_bytes(b"not a safetensors file")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xkd"):
        assert Cache.read(path, "teacher A") is None
    assert "cannot read cache" in caplog.text
    assert Cache.seconds(path) == 0.0
