"""omni2sound.files: atomic writes (mode, full disk, temporaries) and the one-line errors of its readers."""
import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from omni2sound import files
from omni2sound.files import BadFileError, NoSpaceError, atomic_write, read_json, remove_stale_temps


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gets_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        p = atomic_write(tmp_path / "a.json", "{}")
        q = atomic_write(tmp_path / "b.st", lambda t: save_file({"x": torch.zeros(2)}, t))
    finally:
        os.umask(old)
    for f in (p, q):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~mask
    assert [n for n in os.listdir(tmp_path) if files.is_temp_name(n)] == []


def test_atomic_write_full_disk_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_write(target, b"old")

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpaceError, match=f"no space left on device while writing {target}"):
        atomic_write(target, full)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_other_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write(target, "old")
    with pytest.raises(ZeroDivisionError):
        atomic_write(target, lambda t: 1 / 0)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_remove_stale_temps(tmp_path):
    # a writer killed mid-write: its temporary name carries its (now dead) pid
    proc = subprocess.run([sys.executable, "-c", "from omni2sound.files import temp_path_for; import sys;"
                           f"p = temp_path_for({str(tmp_path / 'w.safetensors')!r}); open(p, 'w').write('x');"
                           "print(p)"], capture_output=True, text=True, check=True)
    dead = proc.stdout.strip()
    live = files.temp_path_for(tmp_path / "mine.json")          # this process's: still being written
    open(live, "w").close()
    other = tmp_path / ".keep.tmp"                               # not ours: never touched
    other.write_text("x")
    assert os.path.exists(dead) and files.is_temp_name(os.path.basename(dead))
    assert remove_stale_temps(tmp_path, tmp_path / "missing") == [dead]
    assert os.path.exists(live) and other.exists() and not os.path.exists(dead)


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (b"   \n", "only whitespace"),
    (b'{"a": 1, "b": ', "truncated or not valid JSON"),
    (b"not json at all", "not valid JSON"),
    (b"[1, 2, 3]", "holds a JSON array, expected a JSON object"),
    (b'"text"', "holds a JSON string, expected a JSON object"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
])
def test_read_json_one_line_errors(tmp_path, content, problem):
    p = tmp_path / "config.json"
    p.write_bytes(content)
    with pytest.raises(BadFileError) as e:
        read_json(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and problem in msg and "\n" not in msg


def test_read_json_missing(tmp_path):
    with pytest.raises(BadFileError, match="No such file"):
        read_json(tmp_path / "nope.json")
    assert read_json(atomic_write(tmp_path / "ok.json", '{"a": [1]}')) == {"a": [1]}


@pytest.mark.parametrize("cut", [0, 5, 20, -3])
def test_load_safetensors_broken(tmp_path, cut):
    p = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(BadFileError) as e:
        files.load_safetensors(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    assert ("empty" in msg) if cut == 0 else ("truncated" in msg or "not" in msg)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_torch_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "step-0000001.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "evil": _Payload(str(marker))}, str(p))
    assert not marker.exists()
    with pytest.raises(BadFileError, match="refused"):
        files.load_torch(p)
    assert not marker.exists()
    good = tmp_path / "ok.pt"
    torch.save({"a": torch.ones(2), "b": [1, (2, None)], "c": "s"}, str(good))
    assert files.load_torch(good)["b"] == [1, (2, None)]


def test_write_json_roundtrip(tmp_path):
    p = files.write_json(tmp_path / "sub" / "m.json", {"x": 1, "p": tmp_path})
    assert json.loads(p.read_text()) == {"x": 1, "p": str(tmp_path)}
