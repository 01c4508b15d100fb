"""Reading and writing files safely, with no model knowledge (the engine, the codec and training all use these).

- Inputs are read only from regular files (never a FIFO, a device or a directory), opened without blocking, and
  never past a size limit checked before the read: `read_bytes_bounded`.
- A file is written through a temporary file in the same folder and appears whole or not at all; an existing
  file is replaced only when asked (`overwrite=True`), and the no-overwrite case is atomic too (a hard link
  cannot replace a file another process created meanwhile): `atomic_write_bytes`.
- A directory (a model directory, an export) is assembled in a temporary folder beside it and renamed into place
  as a whole: `atomic_directory`.
- Errors name the user's path, never a temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cod.errors import InputError, LimitError, OutputExistsError

MiB = 1 << 20
GiB = 1 << 30


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_mode(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_stat(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """stat() of a regular file (symbolic links followed), else an InputError naming the path and what it is."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{path}: broken symbolic link (it points to {os.readlink(path)}, which does not "
                             f"exist)") from None
        raise InputError(f"{path}: no such {what}") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is {describe_mode(st.st_mode)}, not a {what}; cod reads regular files only")
    return st


def read_bytes_bounded(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most max_bytes. The size is checked before reading and the read itself
    stops after max_bytes + 1 (a file that grows meanwhile is refused too); the file is opened non-blocking, so a
    FIFO swapped in after the check cannot hang the open."""
    path = Path(path)
    st = regular_file_stat(path, what)
    too_big = LimitError(f"{path}: {st.st_size} bytes is larger than any {what} cod reads ({max_bytes} bytes); "
                         f"is it the right file?")
    if st.st_size > max_bytes:
        raise too_big
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise InputError(f"{path}: cannot be opened ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{path}: is {describe_mode(mode)}, not a {what}; cod reads regular files only")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise InputError(f"{path}: read failed ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise too_big
    return data


MAX_YAML_NODES = 100_000


def load_yaml(data: bytes, source: str):
    """YAML text -> Python data, safely (yaml.safe_load: no objects) and bounded: a document whose aliases expand
    it past MAX_YAML_NODES nodes (a "billion laughs" file of a few hundred bytes) is refused, because the consumers
    walk and copy the expanded tree."""
    import yaml

    try:
        tree = yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None
    budget = [MAX_YAML_NODES]

    def walk(node, depth: int) -> None:  # counts every visit, so shared (aliased) nodes count each time
        budget[0] -= 1
        if budget[0] < 0 or depth > 64:
            raise InputError(f"{source}: the YAML document is too large or deep once its aliases are expanded "
                             f"(more than {MAX_YAML_NODES} values or 64 levels)")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            walk(child, depth + 1)

    walk(tree, 0)
    return tree


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where cod keeps what it can recompute (verified hashes, cost-model tables): $COD_CACHE_DIR, else
    $XDG_CACHE_HOME/cod, else ~/.cache/cod. Callers ignore a cache they cannot read or write."""
    if os.environ.get("COD_CACHE_DIR"):
        return Path(os.environ["COD_CACHE_DIR"])
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory (HOME unset, no passwd entry): a folder that caching will skip
        return Path(os.devnull) / "cod"
    return Path(base) / "cod"


def private_cache_dir() -> Path | None:
    """The cache folder, created private (0700) if missing; None (no caching) unless it is a directory owned by
    this user that nobody else can write to: what is read from it (verified hashes, work estimates) decides what
    cod accepts, so a folder others can write must not be trusted."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
        return None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return None
    return folder


HASH_CACHE_ENTRIES = 256


def _hash_key(path: Path, st: os.stat_result) -> list:
    # ctime changes with every write and cannot be set back by the user (unlike mtime); a replaced file has a
    # new inode. Any change to the file therefore changes the key and forces a new hash.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def sha256_file_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered in the user's private cache folder (private_cache_dir) under the file's
    identity (device, inode, size, mtime and ctime): a file that has not been written since it was last hashed is
    not read again. A cache that cannot be read or written, or is not private, is ignored."""
    path = Path(path).resolve()
    folder = private_cache_dir()
    if folder is None:
        return sha256_file(path)
    st = os.stat(path)
    key = _hash_key(path, st)
    cache_file = folder / "sha256.json"
    cache = read_cache_json(cache_file)
    entry = cache.get(str(path))
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    if _hash_key(path, os.stat(path)) != key:  # written while we read it: do not remember
        return digest
    cache.pop(str(path), None)
    cache[str(path)] = {"key": key, "sha256": digest}
    while len(cache) > HASH_CACHE_ENTRIES:
        cache.pop(next(iter(cache)))
    with contextlib.suppress(OSError):
        atomic_write_bytes(cache_file, json.dumps(cache).encode(), overwrite=True)
    return digest


def read_cache_json(path: Path) -> dict:
    """A JSON object from the cache folder, or {} when it is missing, unreadable, not a regular file, large or
    malformed: the cache is only ever a shortcut."""
    try:
        data = json.loads(read_bytes_bounded(path, 4 * MiB, "cache file"))
    except (ValueError, OSError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> None:
    """Write `data` to `path` through a temporary file in the same folder: the file appears whole or not at all.

    overwrite=False refuses an existing path (OutputExistsError), atomically: the finished file is hard-linked into
    place, which fails if another process created the path meanwhile. A failure (full disk, permissions) leaves
    nothing behind and raises an OSError naming `path`, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory, so a file cannot be written there; choose another name")
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path} exists already: pass --overwrite to replace it, or choose another output")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".partial", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path} exists already (created while cod was writing it): pass "
                                        f"--overwrite to replace it, or choose another output") from None
            except OSError as e:  # no hard links here (some network and FAT file systems): check, then rename
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                                   errno.ENOSYS):
                    raise
                if os.path.lexists(path):
                    raise OutputExistsError(f"{path} exists already: pass --overwrite to replace it") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        tmp = None
    except OSError as e:
        raise OSError(e.errno, f"cannot write it: {e.strerror or e} (nothing was written)", str(path)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def check_outputs(targets: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False, own: OwnOutput | None = None) -> None:
    """Refuse, before any work, outputs that are one of the inputs (always), that are directories (always), or
    that exist (unless overwrite; and with overwrite, unless `own` recognises them as files cod wrote). One error
    names the first few offenders."""
    targets = [Path(t) for t in targets]
    input_ids = set()
    for p in inputs:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            input_ids.add((st.st_dev, st.st_ino))
    clashes, dirs, existing = [], [], []
    for t in targets:
        try:
            st = os.stat(t)
        except OSError:
            if os.path.lexists(t):
                existing.append(t)  # a broken symbolic link is still something we would replace
            continue
        if (st.st_dev, st.st_ino) in input_ids:
            clashes.append(t)
        elif stat.S_ISDIR(st.st_mode):
            dirs.append(t)
        else:
            existing.append(t)

    def shown(paths: list[Path]) -> str:
        return ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

    if clashes:
        raise OutputExistsError(f"output {shown(clashes)} would replace an input of this command; cod never writes "
                                f"over its inputs: choose another output (-o)")
    if dirs:
        raise OutputExistsError(f"output {shown(dirs)} is a directory; choose another output (-o)")
    if existing and not overwrite:
        noun = "exists" if len(existing) == 1 else f"({len(existing)} files) exist"
        raise OutputExistsError(f"output {shown(existing)} {noun} already: pass --overwrite to replace, or choose "
                                f"another output (-o)")
    foreign = [t for t in existing if own is None or not own(t)]
    if foreign:
        raise OutputExistsError(f"output {shown(foreign)} exists and was not written by cod: cod replaces only its "
                                f"own outputs, even with --overwrite; choose another output (-o)")


OwnOutput = Callable[[Path], bool]  # recognises an earlier output of one kind by its content


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a symbolic-link loop
        raise InputError(f"{path}: a loop of symbolic links") from None


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                     overwrite: bool = False, own: OwnOutput | None = None) -> None:
    """Refuse, before any work, an output directory that exists (unless overwrite), that is a file, that is or
    holds one of the inputs (always), or that is neither empty nor recognised by `own` as an earlier output of
    the same kind (always: --overwrite replaces cod's own outputs, never a folder of the user's files)."""
    path = Path(os.path.abspath(path))
    resolved = _resolve(path)
    for p in inputs:
        p = _resolve(Path(p))
        if p == resolved or resolved in p.parents:
            raise OutputExistsError(f"output {path} holds an input of this command ({p}); cod never writes over "
                                    f"its inputs: choose another output")
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory; choose another output")
    if not overwrite:
        raise OutputExistsError(f"output {path} exists already: pass --overwrite to replace it (as a whole), or "
                                f"choose another output")
    try:
        empty = not any(os.scandir(path))
    except OSError:
        empty = False
    if not empty and not (own is not None and own(path)):
        raise OutputExistsError(f"output {path} exists and is not an earlier cod output of this kind: cod replaces "
                                f"only its own outputs, even with --overwrite; remove it yourself or choose another "
                                f"output")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, own: OwnOutput | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error, it becomes `path` as
    a whole. An existing `path` is refused unless overwrite, and then only if it is an earlier output of the same
    kind (check_output_dir); it is swapped with the new one in one atomic step where the system allows (Linux),
    else renamed aside first. On any error, or if the process is killed, `path` is untouched; a killed process
    leaves only a hidden `.NAME.partial-*` folder beside it."""
    path = Path(os.path.abspath(path))
    check_output_dir(path, overwrite=overwrite, own=own)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:200]}.partial-", dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot create it: {e.strerror or e}", str(path)) from None
    try:
        yield tmp
        mask = _umask()
        for entry in tmp.rglob("*"):  # mkdtemp makes 0700 and some writers 0600: the permissions open() gives
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.lexists(path):
            check_output_dir(path, overwrite=overwrite, own=own)  # created or changed while we wrote
            if _exchange(tmp, path):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
            else:
                old = path.with_name(f".{path.name[:200]}.old-{secrets.token_hex(4)}")
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is not None and str(tmp) in str(e.filename):
            raise OSError(e.errno, f"cannot write it: {e.strerror or e} (nothing was written)", str(path)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_files(src: Path, dst: Path) -> None:
    """Copy the regular files of folder src into folder dst (errors are OSErrors naming the file)."""
    for entry in sorted(Path(src).iterdir()):
        if entry.is_file():
            shutil.copyfile(entry, dst / entry.name)
