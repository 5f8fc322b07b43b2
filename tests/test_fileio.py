import pytest

from ternlm.errors import TernlmError
from ternlm.fileio import atomic_dir, atomic_write_text


def test_atomic_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "ck"
    atomic_dir(out, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(out, broken)
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs left behind

    atomic_dir(out, lambda d: (d / "b.txt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TernlmError, match="not a directory"):
        atomic_dir(tmp_path / "f", lambda d: None)


def test_atomic_write_text(tmp_path):
    p = tmp_path / "sub" / "r.json"
    atomic_write_text(p, "1")
    atomic_write_text(p, "2")
    assert p.read_text() == "2" and [x.name for x in p.parent.iterdir()] == ["r.json"]
