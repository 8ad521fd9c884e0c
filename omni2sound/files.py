"""Reading and writing the package's files safely.

Writes are atomic: the content goes to a temporary file in the target's own folder (so the final rename never
crosses a file system), is flushed to disk, and replaces the target with ``os.replace``. A reader therefore sees
the old file or the new one, never half of one, and a failed write (a full disk, a kill) leaves the old file as it
was. The finished file gets mode 0666 minus the umask, the mode any other new file would get (``tempfile.mkstemp``
and some writers give 0600).

Temporary files are named ``.<target name>.<host>-<pid>-<random>.o2s.tmp``. A process killed mid-write leaves one
behind; :func:`remove_stale_temps` (called by train, extract and generate on the folders they write) removes those
whose writer is gone: same host and the pid no longer running, or another host's and older than a day.

Reads of JSON and safetensors files go through :func:`read_json`, :func:`load_safetensors`,
:func:`open_safetensors` and :func:`load_torch`, which turn every way a file can be broken (missing, empty, truncated,
not JSON, a JSON list where an object is needed, a pickle holding more than tensors) into one :class:`BadFileError`
line naming the file and what is wrong. ``load_torch`` loads with ``weights_only=True``: tensors and plain containers
only, so no file this package reads can run code.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, os.PathLike]

TEMP_SUFFIX = ".o2s.tmp"
# .<target>.<host 8 hex>-<pid>-<8 hex>.o2s.tmp
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}"
                      + re.escape(TEMP_SUFFIX) + "$")
_FOREIGN_TEMP_AGE_S = 24 * 3600.0
# a write that failed while its folder's file system had less than this free is reported as a full disk, whatever
# the writer said (torch.save reports a full disk as "enforce fail at inline_container.cc: unexpected pos ...")
_FULL_DISK_BYTES = 1 << 20


class BadFileError(ValueError):
    """A file the package reads is missing, empty, truncated or holds the wrong kind of content. str() is one line:
    '<path>: <what is wrong>'."""

    def __init__(self, path: PathLike, problem: str):
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NoSpaceError(OSError):
    """A write ran out of disk space (or quota); the previous file at the target path is intact."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        super().__init__(errno.ENOSPC, f"no space left on device while writing {self.path} "
                                       "(the previous file, if any, is unchanged)")

    def __str__(self) -> str:
        return self.strerror


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFFFF:08x}"


def temp_path_for(path: PathLike) -> str:
    """A fresh name of our temporary-file pattern in path's folder (not created)."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    name = name[:200]                                   # keep the temporary name within NAME_MAX (255)
    return os.path.join(folder, f".{name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for a file name of our temporary-file pattern."""
    return _TEMP_RE.match(name) is not None


def _create_temp(path: str) -> str:
    for _ in range(100):
        tmp = temp_path_for(path)
        try:
            # 0o666 & ~umask: the mode a plain open(path, "w") would give the finished file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:            # name the file the caller asked for, not our temporary one
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(path) from None
            raise type(e)(e.errno, f"cannot write {path}: {e.strerror}") from None
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:         # some file systems refuse fsync on folders; the rename is done either way
        pass
    finally:
        os.close(fd)


def _is_no_space(exc: BaseException, folder: str) -> bool:
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return False
    try:
        return shutil.disk_usage(folder).free < _FULL_DISK_BYTES
    except OSError:
        return False


def atomic_write(path: PathLike, content: Union[str, bytes, Callable[[str], Any]]) -> Path:
    """Write ``path`` atomically and return it as a Path.

    content: text (written as UTF-8), bytes, or a function ``write(tmp_path)`` that writes the whole file at the
    temporary path it is given (``lambda p: save_file(state, p)``, ``lambda p: torch.save(obj, p)``; it must not
    rely on the file name's extension: the temporary name ends in ``.o2s.tmp``). The target's folder is created if
    missing. A full disk raises :class:`NoSpaceError` ("no space left on device while writing <path>"); on any
    failure the temporary file is removed and the previous file at ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temp(path)
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with open(tmp, "wb") as f:
                f.write(data)
        # a writer may have replaced the temporary file with one of its own (safetensors writes 0600 files)
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        no_space = _is_no_space(exc, folder)
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if no_space:
            raise NoSpaceError(path) from exc
        raise
    _fsync_dir(folder)
    return Path(path)


def check_writable(path: PathLike) -> None:
    """Raise OSError naming ``path`` if a file cannot be written there (its folder is missing and cannot be made,
    is not a folder, is read-only, or ``path`` is a folder), by creating and removing a temporary file of our
    pattern beside it: a check before long work whose result would otherwise be lost at the end."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder")
    folder = os.path.dirname(path)
    probe = folder
    while not os.path.exists(probe):            # the nearest folder that exists must let us make the rest
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {probe} is a file, not a folder")
    if probe != folder:
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, f"cannot write {path}: cannot create folders in {probe}")
        return
    tmp = _create_temp(path)
    os.remove(tmp)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """``obj`` as JSON at ``path``, atomically (values JSON cannot hold are written as their str())."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


def remove_stale_temps(*folders: PathLike, recursive: bool = False) -> list:
    """Remove the temporary files of our naming pattern that a killed writer left in ``folders`` (missing folders
    are skipped). A file is stale when its writer ran on this host and is no longer running, or ran on another host
    and the file is older than a day. Returns the removed paths."""
    host, me = _host_tag(), os.getpid()
    now = time.time()
    removed = []
    for folder in folders:
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            continue
        walker = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
        for root, _, names in walker:
            for name in names:
                m = _TEMP_RE.match(name)
                if m is None:
                    continue
                p = os.path.join(root, name)
                pid = int(m.group("pid"))
                if m.group("host") == host:
                    if pid == me or _pid_alive(pid):
                        continue
                else:
                    try:
                        if now - os.path.getmtime(p) < _FOREIGN_TEMP_AGE_S:
                            continue
                    except OSError:
                        continue
                try:
                    os.remove(p)
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's live process
        return True
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _check_nonempty(path: str) -> None:
    if not os.path.exists(path):
        raise BadFileError(path, "No such file") from None
    if os.path.isdir(path):
        raise BadFileError(path, "is a folder, expected a file")
    if os.path.getsize(path) == 0:
        raise BadFileError(path, "empty file")


def read_json(path: PathLike, kind: type = dict, what: str = "") -> Any:
    """Parse a JSON file whose top level must be a ``kind`` (dict: a JSON object, list: an array).

    Raises BadFileError, one line: '<path>: <what is wrong>' (no such file, empty, not JSON with the line and
    column, a JSON list where an object is needed, ...). ``what`` names the file's role in the message
    ("a pipeline config")."""
    path = os.fspath(path)
    _check_nonempty(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(path, f"not UTF-8 text (byte {e.start}), expected JSON") from None
    except OSError as e:
        raise BadFileError(path, f"cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise BadFileError(path, "holds only whitespace, expected JSON")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        end = "truncated or not valid JSON" if cut else "not valid JSON"
        raise BadFileError(path, f"{end} (line {e.lineno} column {e.colno}: {e.msg})") from None
    if not isinstance(obj, kind):
        want = {dict: "a JSON object {...}", list: "a JSON array [...]"}.get(kind, kind.__name__)
        role = f" for {what}" if what else ""
        raise BadFileError(path, f"holds {_json_kind(obj)}, expected {want}{role}")
    return obj


def read_config(path: PathLike, cls: type, what: str = "") -> Any:
    """A typed config dataclass from its JSON file: ``cls.from_dict(obj)`` (or ``cls(**obj)``) after checking that
    the file holds an object whose values have the fields' types. Every problem (the file's, an unknown field, a
    value of the wrong type, a value the config itself rejects) is one BadFileError line naming the file."""
    import dataclasses

    obj = read_json(path, dict, what or f"a {cls.__name__}")
    if dataclasses.is_dataclass(cls):
        problems = _field_type_problems(cls, obj)
        if problems:
            raise BadFileError(path, f"not a valid {cls.__name__}: " + "; ".join(problems))
    make = getattr(cls, "from_dict", None) or (lambda d: cls(**d))
    try:
        return make(obj)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise BadFileError(path, f"not a valid {cls.__name__}: {msg}") from None


def _field_type_problems(cls: type, obj: dict) -> list:
    import dataclasses
    import typing

    try:
        hints = typing.get_type_hints(cls)
    except Exception:           # an annotation this Python cannot resolve: leave the checking to the class
        return []
    known = {f.name for f in dataclasses.fields(cls)}
    out = []
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        out.append(f"unknown fields {unknown}")
    for k, v in obj.items():
        if k in hints and not _matches(v, hints[k]):
            out.append(f"{k} = {json.dumps(v)[:60]} is not {_type_name(hints[k])}")
    return out


def _matches(v: Any, t: Any) -> bool:
    import typing

    if t is Any:
        return True
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        return any(_matches(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t is str:
        return isinstance(v, str)
    if origin in (tuple, list) or t in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(v) == len(args) and all(_matches(x, a) for x, a in zip(v, args))
        return not args or all(_matches(x, args[0]) for x in v)
    if origin is dict or t is dict:
        return isinstance(v, dict)
    return True                 # a type JSON does not carry (an enum, a class): the config checks it


def _type_name(t: Any) -> str:
    import typing

    if t in (int, float, str, bool):
        return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Union or (origin is not None and getattr(origin, "__name__", "") == "UnionType"):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list) or t in (tuple, list):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return "a list" + (f" of {plural[args[0]]}" if args and args[0] in plural else "")
    return getattr(t, "__name__", str(t))


def _json_kind(obj: Any) -> str:
    if isinstance(obj, dict):
        return "a JSON object"
    if isinstance(obj, list):
        return "a JSON array"
    if isinstance(obj, str):
        return "a JSON string"
    if isinstance(obj, bool):
        return "a JSON boolean"
    if isinstance(obj, (int, float)):
        return "a JSON number"
    return "JSON null" if obj is None else type(obj).__name__


def _safetensors_problem(path: str, e: BaseException) -> BadFileError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    size = os.path.getsize(path)
    if size < 8:
        return BadFileError(path, f"truncated ({size} bytes), not a safetensors file")
    low = msg.lower()
    if "incomplete" in low or "too small" in low or "out of bounds" in low or "invalid" in low:
        return BadFileError(path, f"truncated or not a safetensors file ({size} bytes; {msg})")
    return BadFileError(path, f"not a readable safetensors file ({msg})")


def load_safetensors(path: PathLike, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` with a one-line BadFileError naming the file when it is missing, empty,
    truncated or not safetensors."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    _check_nonempty(path)
    try:
        return load_file(path, device=device)
    except Exception as e:           # SafetensorError, OSError, RuntimeError: all mean the file is unusable
        raise _safetensors_problem(path, e) from None


def open_safetensors(path: PathLike):
    """``safetensors.safe_open(path, framework="pt")`` (memory-mapped reads) with one-line errors naming the file.
    Use as a context manager like safe_open."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_nonempty(path)
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise _safetensors_problem(path, e) from None


def safetensors_metadata(path: PathLike) -> dict:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (its class, its dtype and the array rebuild function): data only,
    no callable that could run code. numpy 2 keeps the rebuild function in ``numpy._core``, numpy 1 in
    ``numpy.core``."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:                     # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct] + [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None))
                                                   if n.endswith("DType")]


def load_torch(path: PathLike, map_location="cpu", numpy_arrays: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers (dict, list, tuple, str, int, float,
    bool, None) only, so the file cannot run code. One-line BadFileError when it is missing, empty, truncated or
    holds anything else (the pickled object it refused is named). ``numpy_arrays=True`` also accepts plain numpy
    arrays (resume checkpoints of earlier releases stored numpy's RNG state as one)."""
    import pickle

    import torch

    path = os.fspath(path)
    _check_nonempty(path)
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = " ".join(str(e).split())
        inner = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", reason)
        inner = inner.group(1) if inner else reason
        if "global" not in inner.lower():
            raise BadFileError(path, f"truncated or not a torch checkpoint ({inner[:160]})") from None
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", reason) or re.search(r"GLOBAL ([\w.]+)", reason)
        what = f" ({m.group(1)})" if m else ""
        raise BadFileError(path, f"refused: holds a pickled object{what} beyond tensors and plain containers; "
                                 "it is not a checkpoint this package wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise BadFileError(path, f"truncated or not a torch checkpoint ({msg})") from None


def hash_file_into(h, path: PathLike, chunk: int = 1 << 20):
    """Feed a file's bytes to the hash object ``h`` (hashlib's interface) in chunks; returns ``h``."""
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h


def content_hash(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, hex."""
    import hashlib

    return hash_file_into(hashlib.sha256(), path, chunk).hexdigest()


__all__ = ["BadFileError", "NoSpaceError", "TEMP_SUFFIX", "atomic_write", "check_writable", "content_hash",
           "hash_file_into", "is_temp_name", "load_safetensors", "load_torch", "open_safetensors", "read_config",
           "read_json", "remove_stale_temps", "safetensors_metadata", "temp_path_for", "write_json"]
