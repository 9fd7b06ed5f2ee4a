"""Content-addressed result cache.

An entry is addressed by a *namespace* (e.g. ``"organism/engine"``) and a mapping of *parts*
(model id and revision, the sample's content hash, the condition key, ``ENGINE_VERSION``,
judge id and prompt version, ...). The store does not know what the parts mean: it hashes
their canonical JSON (sorted keys) with the namespace into a sha256 key, and keeps the parts
inside the entry so `Store.iter_entries` can say what is there.

Layout: ``ROOT/<namespace>/<key[:2]>/<key>.json`` for JSON entries (`put_json`/`get_json`) and
``ROOT/<namespace>/<key[:2]>/<key>.npz`` for records of JSON meta plus named numpy arrays
(`put`/`get`). JSON is pretty-printed with sorted keys so committed fixtures diff well; the
``.npz`` is a compressed zip holding ``meta.json`` and one ``.npy`` member per array (so
``numpy.load`` opens it; nothing is pickled).

Reliability:

- every entry carries a sha256 checksum of its payload, verified on read;
- writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d into
  place, so readers see either the old complete entry or the new complete entry; concurrent
  writers of one key (threads, ``accelerate launch`` processes, xdist workers) are safe: the
  last rename wins and both candidates are complete;
- an entry that fails to parse or verify is logged (naming the file), moved aside to
  ``<file>.corrupt`` and reported as a miss, so the caller recomputes; it is never used (a
  read-only store, or a directory that cannot be written, leaves it in place);
- a write that fails (disk full, read-only or unwritable directory) raises `StoreWriteError`
  naming the store and the fix, and leaves no partial entry; temporary files of writers killed
  mid-write are removed when a writable store is opened, once older than `STALE_TEMP_S`;
- `Store.claim` marks a key as being computed (a ``.<key>.claim`` file created with
  ``O_CREAT | O_EXCL``, holding pid, host and time), so concurrent workers compute each key
  once; a claim of a dead process on this host, or older than `CLAIM_STALE_S`, is taken over.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "avprobe-store/1"
_META_MEMBER = "meta.json"
_ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_NS_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SHARD = re.compile(r"^[0-9a-f]{2}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")
# Fixed zip timestamps: identical content gives identical bytes (reproducible fixtures).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# This store's own temporary files: `_atomic_write`'s mkstemp names (``.<key>.<ext>.XXXXXXXX.tmp``)
# and the names claims are moved to while being broken. Nothing else is ever removed.
_TEMP = re.compile(r"^\.[0-9a-f]{64}\.(?:json|npz|claim)\.[a-z0-9_]+\.tmp$")
_CLAIM = re.compile(r"^\.[0-9a-f]{64}\.claim$")
# A write takes milliseconds: a temporary file this old belongs to a writer that died.
STALE_TEMP_S = 3600.0
# A claim this old is abandoned even if its process may live (another host, a hung worker);
# taking it over costs at most one duplicate computation, never a wrong entry.
CLAIM_STALE_S = 1800.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class StoreError(Exception):
    """Base class of the store's errors."""


class CacheMiss(StoreError, LookupError):
    """A required entry is not in the store (offline / read-only runs raise this)."""

    def __init__(self, namespace: str, parts: Mapping[str, Any], path: Path | None = None, readonly: bool = False):
        self.namespace = namespace
        self.parts = dict(parts)
        self.path = path
        where = f" (expected at {path})" if path is not None else ""
        fix = (
            "the store is read-only (offline): compute it with a writable store or fetch the cached results"
            if readonly
            else "compute it first"
        )
        super().__init__(f"no cached entry in {namespace!r} for {_describe(self.parts)}{where}; {fix}")


class ReadOnlyStoreError(StoreError, PermissionError):
    """A write was attempted on a read-only store."""


class StoreWriteError(StoreError, OSError):
    """Writing to the store failed (disk full, read-only or unwritable directory, ...).

    The message names the store, the file and the fix; `errno` is the underlying error's.
    No partial entry is left behind: the old entry, if any, is still there.
    """


class StorePathError(StoreError, NotADirectoryError):
    """The store's root exists but is not a directory."""


@dataclass(frozen=True)
class Record:
    """A stored result: JSON-able `meta` plus named numpy `arrays`."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreStats:
    """Counters of one `Store` object (per process), for reports."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0


class _Corrupt(Exception):
    """Internal: an entry failed to parse or verify."""


def to_jsonable(obj: Any, where: str = "value") -> Any:
    """Convert `obj` to plain JSON types: numpy scalars/arrays -> Python, tuples -> lists.

    Floats (NaN and infinities included) are kept as they are; the store writes them with
    ``allow_nan`` so NaN round-trips. Dict keys must be strings (JSON would silently turn
    other keys into strings, so a read would not give back what was written).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), where)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: numpy array of dtype {obj.dtype} is not JSON-able; store it as an array")
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict key {k!r} is {type(k).__name__}, JSON keys must be str")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"{where}: {type(obj).__name__} is not JSON-able; pass str/int/float/bool/None, lists, dicts "
        "or numpy scalars (e.g. a condition's .key(), a path as str)"
    )


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys: the byte-stable form that keys and checksums hash."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def _sha256(text: str | bytes) -> str:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def _describe(parts: Mapping[str, Any]) -> str:
    try:
        return canonical_json(parts)
    except TypeError:
        return repr(parts)


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError(f"namespace must be a non-empty str, got {namespace!r}")
    for seg in namespace.split("/"):
        if not _NS_SEGMENT.match(seg) or seg in (".", ".."):
            raise ValueError(
                f"bad namespace {namespace!r}: segments are non-empty [A-Za-z0-9_.-] separated by '/', "
                "no '.', '..' or leading/trailing '/'"
            )
        if _SHARD.match(seg):
            # A 2-hex-char segment would share a directory name with a shard of the parent namespace.
            raise ValueError(f"bad namespace {namespace!r}: segment {seg!r} looks like a shard directory; rename it")
    return namespace


def _json_dump_pretty(obj: Any) -> str:
    """Indented JSON with sorted keys; lists of scalars stay on one line (short, diff-friendly)."""
    return _pretty(obj, 0) + "\n"


def _pretty(obj: Any, depth: int) -> str:
    def flat(x: Any) -> str:
        return json.dumps(x, sort_keys=True, ensure_ascii=False, allow_nan=True)

    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{flat(k)}: {_pretty(obj[k], depth + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _pretty(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return flat(obj)


def _json_loads(text: str) -> Any:
    # allow NaN/Infinity (json's default) but reject duplicate keys: a hand-edited file is suspicious.
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            raise ValueError("duplicate key")
        return d

    return json.loads(text, object_pairs_hook=no_dupes)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


class Store:
    """Content-addressed cache of JSON results and numpy arrays under `root`.

    `readonly=True` is the offline mode: nothing is written (corrupt entries are reported as
    misses but left in place), ``put*`` raise `ReadOnlyStoreError`, and the ``require*``
    variants raise `CacheMiss` naming what is missing.
    """

    def __init__(self, root: Path | str, readonly: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        if self.root.exists() and not self.root.is_dir():
            # Otherwise every read fails with NotADirectoryError deep inside get().
            raise StorePathError(
                f"--store {self.root} is a file, not a directory; pass a directory (it is created if missing)"
            )
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "writes": 0, "corrupt": 0}
        self._claims: dict[tuple[str, str], str] = {}  # (namespace, key) -> token of the claims held
        if not readonly:
            self._remove_stale_temps()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, readonly={self.readonly})"

    # ---- addressing -------------------------------------------------------------------

    def key(self, namespace: str, parts: Mapping[str, Any]) -> str:
        """sha256 hex of the canonical JSON of (namespace, parts)."""
        _check_namespace(namespace)
        if not isinstance(parts, Mapping):
            raise TypeError(f"parts must be a mapping, got {type(parts).__name__}")
        return _sha256(canonical_json({"namespace": namespace, "parts": to_jsonable(parts, "parts")}))

    def path(self, namespace: str, parts: Mapping[str, Any], *, arrays: bool = False) -> Path:
        """Where the entry lives: the ``.npz`` record if `arrays`, else the ``.json`` entry."""
        k = self.key(namespace, parts)
        return self._path_for(namespace, k, "npz" if arrays else "json")

    def _path_for(self, namespace: str, key: str, ext: str) -> Path:
        return self.root.joinpath(*namespace.split("/"), key[:2], f"{key}.{ext}")

    # ---- counters ---------------------------------------------------------------------

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the hit / miss / write / corrupt counters."""
        with self._lock:
            return StoreStats(**self._counts)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # ---- JSON entries -----------------------------------------------------------------

    def put_json(self, namespace: str, parts: Mapping[str, Any], value: Mapping[str, Any]) -> None:
        """Store a JSON-able dict (NaN kept, numpy scalars and tuples converted)."""
        self._check_writable(namespace, parts)
        if not isinstance(value, Mapping):
            raise TypeError(f"value must be a dict, got {type(value).__name__}")
        k = self.key(namespace, parts)
        jparts = to_jsonable(parts, "parts")
        jvalue = to_jsonable(value, "value")
        doc = {
            "format": FORMAT,
            "namespace": namespace,
            "key": k,
            "parts": jparts,
            "value": jvalue,
            "checksum": _sha256(canonical_json({"key": k, "namespace": namespace, "parts": jparts, "value": jvalue})),
        }
        self._atomic_write(self._path_for(namespace, k, "json"), _json_dump_pretty(doc).encode("utf-8"))

    def get_json(self, namespace: str, parts: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored dict, or None on a miss (absent, or corrupt and moved aside)."""
        k = self.key(namespace, parts)
        path = self._path_for(namespace, k, "json")
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._count("misses")
            return None
        try:
            doc = self._parse_json_entry(data)
            self._verify_identity(doc, namespace, k)
        except _Corrupt as e:
            self._quarantine(path, st, str(e))
            self._count("misses")
            return None
        self._count("hits")
        return doc["value"]

    def require_json(self, namespace: str, parts: Mapping[str, Any]) -> dict[str, Any]:
        """Like `get_json`, but a miss raises `CacheMiss`."""
        value = self.get_json(namespace, parts)
        if value is None:
            raise CacheMiss(namespace, parts, self.path(namespace, parts), self.readonly)
        return value

    @classmethod
    def _parse_json_entry(cls, data: bytes) -> dict[str, Any]:
        doc = cls._parse_json_doc(data)
        missing = {"namespace", "key", "parts", "value", "checksum"} - set(doc)
        if missing:
            raise _Corrupt(f"missing fields {sorted(missing)}")
        want = _sha256(
            canonical_json({"key": doc["key"], "namespace": doc["namespace"], "parts": doc["parts"], "value": doc["value"]})
        )
        if want != doc["checksum"]:
            raise _Corrupt("checksum mismatch")
        return doc

    @staticmethod
    def _verify_identity(doc: Mapping[str, Any], namespace: str, key: str) -> None:
        # The checksum proves the payload is intact; this proves it is the entry asked for.
        if doc["namespace"] != namespace or doc["key"] != key:
            raise _Corrupt(f"entry is for {doc['namespace']!r}/{doc['key']}, not {namespace!r}/{key}")
        if _sha256(canonical_json({"namespace": doc["namespace"], "parts": doc["parts"]})) != key:
            raise _Corrupt("stored parts do not hash to the key")

    # ---- records (meta + arrays) ------------------------------------------------------

    def put(
        self,
        namespace: str,
        parts: Mapping[str, Any],
        meta: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Store a `Record`: JSON-able `meta` plus named arrays (numeric/bool/str dtypes, no objects)."""
        self._check_writable(namespace, parts)
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        k = self.key(namespace, parts)
        jparts = to_jsonable(parts, "parts")
        jmeta = to_jsonable(meta, "meta")
        members: dict[str, bytes] = {}
        index: dict[str, dict[str, Any]] = {}
        for name, arr in (arrays or {}).items():
            if not isinstance(name, str) or not _ARRAY_NAME.match(name):
                raise ValueError(f"bad array name {name!r}: use [A-Za-z0-9_.-]")
            a = np.asarray(arr)
            if a.dtype.hasobject:
                raise TypeError(f"array {name!r} has dtype object; the store never pickles: convert it first")
            b = _npy_bytes(a)
            members[f"{name}.npy"] = b
            index[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(b)}
        head = {"key": k, "namespace": namespace, "parts": jparts, "meta": jmeta, "arrays": index}
        doc = {"format": FORMAT, **head, "checksum": _sha256(canonical_json(head))}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            # meta first, so iter_entries reads only the first member.
            zf.writestr(zipfile.ZipInfo(_META_MEMBER, _ZIP_DATE), _json_dump_pretty(doc), zipfile.ZIP_DEFLATED)
            for mname in sorted(members):
                zf.writestr(zipfile.ZipInfo(mname, _ZIP_DATE), members[mname], zipfile.ZIP_DEFLATED)
        self._atomic_write(self._path_for(namespace, k, "npz"), buf.getvalue())

    def get(self, namespace: str, parts: Mapping[str, Any]) -> Record | None:
        """The stored `Record`, or None on a miss (absent, or corrupt and moved aside)."""
        k = self.key(namespace, parts)
        path = self._path_for(namespace, k, "npz")
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._count("misses")
            return None
        try:
            rec = self._parse_record(data, namespace, k)
        except _Corrupt as e:
            self._quarantine(path, st, str(e))
            self._count("misses")
            return None
        self._count("hits")
        return rec

    def require(self, namespace: str, parts: Mapping[str, Any]) -> Record:
        """Like `get`, but a miss raises `CacheMiss`."""
        rec = self.get(namespace, parts)
        if rec is None:
            raise CacheMiss(namespace, parts, self.path(namespace, parts, arrays=True), self.readonly)
        return rec

    @classmethod
    def _read_record_meta(cls, zf: zipfile.ZipFile) -> dict[str, Any]:
        doc = cls._parse_json_doc(zf.read(_META_MEMBER))
        missing = {"namespace", "key", "parts", "meta", "arrays", "checksum"} - set(doc)
        if missing:
            raise _Corrupt(f"missing fields {sorted(missing)}")
        head = {k: doc[k] for k in ("key", "namespace", "parts", "meta", "arrays")}
        if _sha256(canonical_json(head)) != doc["checksum"]:
            raise _Corrupt("checksum mismatch")
        return doc

    @staticmethod
    def _parse_json_doc(data: bytes) -> dict[str, Any]:
        try:
            doc = _json_loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise _Corrupt(f"unparsable JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _Corrupt(f"not an {FORMAT} entry")
        return doc

    def _parse_record(self, data: bytes, namespace: str, key: str) -> Record:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                doc = self._read_record_meta(zf)
                self._verify_identity(doc, namespace, key)
                index = doc["arrays"]
                names = set(zf.namelist())
                if names != {_META_MEMBER} | {f"{n}.npy" for n in index}:
                    raise _Corrupt("zip members do not match the array index")
                arrays = {}
                for name, info in index.items():
                    raw = zf.read(f"{name}.npy")  # zipfile checks each member's CRC32
                    if _sha256(raw) != info["sha256"]:
                        raise _Corrupt(f"array {name!r} checksum mismatch")
                    arrays[name] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except _Corrupt:
            raise
        except Exception as e:  # damaged bytes fail in many ways (zlib, struct, zip, npy header): all mean corrupt
            raise _Corrupt(f"unreadable npz ({type(e).__name__}: {e})") from None
        return Record(meta=doc["meta"], arrays=arrays)

    # ---- listing ----------------------------------------------------------------------

    def contains(self, namespace: str, parts: Mapping[str, Any]) -> bool:
        """Whether a JSON or record entry file exists (cheap: not verified; `get*` verifies)."""
        k = self.key(namespace, parts)
        return any(self._path_for(namespace, k, ext).is_file() for ext in ("json", "npz"))

    def iter_entries(self, namespace: str) -> Iterator[tuple[dict[str, Any], Path]]:
        """Yield (parts, path) for every entry of `namespace` (not nested namespaces), sorted by path.

        JSON entries are fully verified; for records only the checksummed meta is read
        (`get` verifies the arrays). Corrupt entries are handled as in `get`.
        """
        base = self.root.joinpath(*_check_namespace(namespace).split("/"))
        if not base.is_dir():
            return
        for shard in sorted(p for p in base.iterdir() if p.is_dir() and _SHARD.match(p.name)):
            for path in sorted(shard.iterdir()):
                stem, _, ext = path.name.partition(".")
                if ext not in ("json", "npz") or not _KEY.match(stem) or not stem.startswith(shard.name):
                    continue  # temporary files, quarantined entries, strangers
                try:
                    with open(path, "rb") as f:
                        st = os.fstat(f.fileno())
                        data = f.read()
                except FileNotFoundError:
                    continue  # removed meanwhile
                try:
                    if ext == "json":
                        doc = self._parse_json_entry(data)
                    else:
                        try:
                            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                                doc = self._read_record_meta(zf)
                        except _Corrupt:
                            raise
                        except Exception as e:  # as in _parse_record: any failure on damaged bytes
                            raise _Corrupt(f"unreadable npz ({type(e).__name__}: {e})") from None
                    self._verify_identity(doc, namespace, stem)
                except _Corrupt as e:
                    self._quarantine(path, st, str(e))
                    continue
                yield doc["parts"], path

    # ---- writing ----------------------------------------------------------------------

    def _check_writable(self, namespace: str, parts: Mapping[str, Any]) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(
                f"store {self.root} is read-only (offline); cannot write {namespace!r} {_describe(parts)}"
            )

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; entries are shared files
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # already gone, or the directory went read-only: the next writable open removes it
            if isinstance(e, OSError):
                raise self._write_error(path, e) from e
            raise
        _fsync_dir(path.parent)
        self._count("writes")

    def _write_error(self, path: Path, exc: OSError) -> StoreWriteError:
        """One clear error for any failed write, saying what to do about it."""
        reason = exc.strerror or str(exc)
        if exc.errno in _NO_SPACE:
            fix = "free space on that disk, or pass a --store on a disk with room"
        elif exc.errno in _NOT_WRITABLE:
            fix = "pass a writable --store (or make this one writable)"
        else:
            fix = "check that --store is a writable directory with free space"
        err = StoreWriteError(f"cannot write to store {self.root}: {reason} ({path}); {fix}")
        err.errno = exc.errno
        return err

    def _remove_stale_temps(self) -> None:
        """Remove this store's temporary files (and broken claims) left by killed writers.

        Only names of this store's own patterns are touched, and only once older than
        `STALE_TEMP_S` (a live writer's file is seconds old); claims only when stale (`_claim_stale`).
        """
        removed = 0
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith("."):
                    continue
                path = Path(dirpath, name)
                try:
                    if _TEMP.match(name):
                        if now - os.lstat(path).st_mtime > STALE_TEMP_S:
                            os.unlink(path)
                            removed += 1
                    elif _CLAIM.match(name):
                        seen = self._claim_stale(path)
                        if seen is not None:
                            self._break_claim(path, seen)
                            removed += 1
                except (OSError, StoreError) as e:  # gone meanwhile, or not ours to remove: harmless
                    log.debug("could not remove stale %s: %s", path, e)
        if removed:
            log.info("store %s: removed %d stale temporary or claim files of interrupted writers", self.root, removed)

    # ---- claims -----------------------------------------------------------------------

    def _claim_path(self, namespace: str, key: str) -> Path:
        return self.root.joinpath(*namespace.split("/"), key[:2], f".{key}.claim")

    def claim(self, namespace: str, parts: Mapping[str, Any]) -> bool:
        """Claim the key for computing: True if this `Store` object now holds it, False if
        another worker (process, thread or `Store` object) does.

        The claim is a ``.<key>.claim`` file created atomically (``O_CREAT | O_EXCL``) with the
        holder's pid, host and time; `release` it after `put`. A claim of a dead process on this
        host, or one older than `CLAIM_STALE_S`, is taken over. Claims coordinate work only:
        entries stay correct without them (writes are atomic), a lost race costs one duplicate
        computation.
        """
        self._check_writable(namespace, parts)
        k = self.key(namespace, parts)
        path = self._claim_path(namespace, k)
        token = uuid.uuid4().hex
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "token": token})
        for _ in range(3):  # a broken stale claim may be re-claimed by someone else first
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                seen = self._claim_stale(path)
                if seen is None:
                    return False
                self._break_claim(path, seen)
                continue
            except OSError as e:
                raise self._write_error(path, e) from e
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(body)
            except OSError as e:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                raise self._write_error(path, e) from e
            with self._lock:
                self._claims[(namespace, k)] = token
            return True
        return False

    def release(self, namespace: str, parts: Mapping[str, Any]) -> None:
        """Give up a claim this object holds (a no-op otherwise, e.g. after a takeover)."""
        k = self.key(namespace, parts)
        with self._lock:
            token = self._claims.pop((namespace, k), None)
        if token is None:
            return
        path = self._claim_path(namespace, k)
        info = _read_claim(path)
        if info is not None and info.get("token") == token:  # not a claim taken over from us
            try:
                os.unlink(path)
            except OSError:
                pass  # gone, or unremovable: it goes stale (age), then is taken over

    def _claim_stale(self, path: Path) -> os.stat_result | None:
        """The claim file's stat if it may be taken over (dead holder on this host, or too old), else None."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # released meanwhile: the caller's next attempt sees that
        age = time.time() - st.st_mtime
        info = _read_claim(path)
        if age > CLAIM_STALE_S:
            reason = f"{age:.0f} s old"
        elif (
            info is not None
            and info.get("host") == socket.gethostname()
            and isinstance(info.get("pid"), int)
            and info["pid"] > 0  # 0 and negatives address process groups in os.kill
            and not _pid_alive(info["pid"])
        ):
            reason = f"process {info['pid']} is gone"
        else:
            return None  # a live holder, or one being written (empty file, seconds old)
        log.info("taking over stale claim %s (%s)", path, reason)
        return st

    def _break_claim(self, path: Path, seen: os.stat_result) -> None:
        """Remove the stale claim `seen`, but never a fresh one that replaced it meanwhile."""
        aside = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.rename(path, aside)  # atomic: of racing breakers, one moves it
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._write_error(path, e) from e
        try:
            st = os.stat(aside)
            if (st.st_ino, st.st_dev) != (seen.st_ino, seen.st_dev):
                # Another worker broke it and claimed anew before us: give its claim back
                # (link fails if yet another claim exists; then two compute, harmlessly).
                try:
                    os.link(aside, path)
                except OSError:
                    pass
        finally:
            try:
                os.unlink(aside)
            except OSError:
                pass

    def _quarantine(self, path: Path, st: os.stat_result, reason: str) -> None:
        """Log a corrupt entry and move it aside, unless a writer has replaced it meanwhile."""
        self._count("corrupt")
        if self.readonly:
            log.warning("corrupt cache entry %s (%s): treated as a miss; left in place (read-only store)", path, reason)
            return
        try:
            now = os.stat(path)
        except FileNotFoundError:
            log.warning("corrupt cache entry %s (%s): already removed", path, reason)
            return
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
            # A concurrent writer renamed a fresh entry over the bad one: leave the fresh one.
            log.warning("corrupt cache entry %s (%s): already replaced by a new write", path, reason)
            return
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            pass
        except OSError as e:
            # A read-only mount or another user's store: reading must still work.
            log.warning(
                "corrupt cache entry %s (%s): treated as a miss; left in place (cannot move it aside: %s)",
                path, reason, e.strerror or e,
            )
            return
        log.warning("corrupt cache entry %s (%s): moved aside to %s; it will be recomputed", path, reason, aside)


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or still being written
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: assume alive (the age limit still applies)
    return True


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; not possible on every platform/filesystem, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
