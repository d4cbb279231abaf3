"""File I/O of the package: frozen, versioned records written atomically.

A leaf: it imports nothing of xkd.

Every file xkd writes goes through :func:`atomic_write_bytes`: the data lands in a temporary file in
the same folder and is moved into place with :func:`os.replace`, so a crash never leaves a half
file. Under ``torchrun`` only rank 0 writes (``is_writer()``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import platform
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

SCHEMA_VERSION = 2  # 2: explanations.json keys metrics by registry name


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token")
"""Query parameters of a URL whose values :func:`hide_password` masks (matched as substrings)."""


def hide_password(url: str) -> str:
    """``url`` with the password of its user (``scheme://user:secret@host``) and the values of its
    password-like query parameters (``?password=secret``) replaced by ``***``, for messages and records.

    Any URL shape works (SQLAlchemy's ``postgresql+psycopg://``, ``http://``, ``sqlite:///path``); the
    rest of the text is kept as it is. Text the URL parser refuses still has a ``user:secret@`` masked.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: mask what looks like credentials
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    out = url
    user, at, _ = parts.netloc.rpartition("@")
    if at and ":" in user:
        out = out.replace(f"//{user}@", f"//{user.split(':', 1)[0]}:***@", 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        secret = [any(s in k.lower() for s in SECRET_QUERY_KEYS) for k, _ in pairs]
        if any(secret):
            masked = [(k, "***" if hide else v) for (k, v), hide in zip(pairs, secret)]
            out = out.replace(f"?{parts.query}", f"?{urllib.parse.urlencode(masked, safe='*/:')}", 1)
    return out


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (query left out); None for an in-memory
    database or any other kind of URL."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path not in ("", ":memory:") else None


def is_writer() -> bool:
    """True on the process that owns the run directory (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _json_safe(obj.item())
    if hasattr(obj, "tolist"):
        return _json_safe(obj.tolist())
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as JSON (non-finite floats become ``null``)."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results, for the run record."""
    out = {"python": platform.python_version()}
    for pkg in ("xkd", "torch", "torchvision", "captum", "numpy", "scikit-learn", "scikit-image"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def record(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Wrap ``payload`` with the schema version and kind, as every file in ``records/`` is."""
    return {"schema_version": SCHEMA_VERSION, "kind": kind, **payload}


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 writes them: YAML 1.1 needs a dot and a
    signed exponent, so ``lr: 1e-3`` (and ``--set train.optimizer.lr=1e-3``) came back a string;
    and refusing a key given twice in one mapping (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2's booleans: true and false only. YAML 1.1 also reads on/off/yes/no as booleans, so
# `amp: off` (and --set train.amp=off) came back False and was refused
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe: plain data only), ``1e-3`` read as a number, ``off`` as a string."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)
