"""Writing outputs without ever destroying a user's data.

``OutputTarget`` is the one way permgraph writes a result:

1. checks first, before any work: the suffix is one the command writes, the path
   neither equals, contains nor lies inside an input, it is not the working folder
   (or one of its ancestors, the home folder or the root), its folder exists, and an
   existing path is replaced only with ``force`` *and* only if permgraph wrote it
   (a folder with permgraph's manifest and nothing else, a ``.safetensors`` file
   with permgraph's metadata, a spec/alignment JSON); ``replace_foreign`` is the
   separate, explicit flag that allows anything else;
2. reserves a temporary path named after the output (``.NAME.permgraph-tmp-PID``)
   next to it, which proves the folder is writable; stale ones from runs that were
   killed are removed;
3. the caller writes into ``target.tmp``; ``commit()`` adds the manifest (folders)
   and moves it into place (an old output is moved aside first and removed last);
4. on any exception, ``KeyboardInterrupt`` or ``SystemExit`` (the command line turns
   SIGTERM into one), the temporary path is removed and nothing is left at the
   final path.

Files are created with the process umask, like every other tool.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Literal, Mapping

from permgraph.errors import OutputError

MANIFEST = "permgraph_output.json"
_TMP = ".permgraph-tmp-"
_OLD = ".permgraph-old-"
Kind = Literal["file", "folder"]


class OutputTarget:
    """A checked output path with a reserved temporary path; a context manager."""

    def __init__(self, out: str | os.PathLike, *, kinds: Mapping[str, Kind], inputs: Iterable[str | os.PathLike] = (),
                 force: bool = False, replace_foreign: bool = False, command: str = "") -> None:
        self.path = Path(os.path.abspath(Path(out).expanduser()))
        self.kind = _kind_for(str(out), self.path, kinds)
        self.command = command
        _refuse_overlap(self.path, [Path(p) for p in inputs])
        self.replace = _check_existing(self.path, self.kind, force, replace_foreign)
        if not self.path.parent.is_dir():
            raise OutputError(f"the output's folder {self.path.parent} does not exist (or is not a folder): "
                              "create it first")
        _remove_stale(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}{_TMP}{os.getpid()}")
        try:
            if self.kind == "folder":
                self.tmp.mkdir()
            else:
                self.tmp.touch(exist_ok=False)
        except OSError as e:
            raise OutputError(f"cannot write in {self.path.parent}: {e.strerror or e}") from None
        self.committed = False

    def __enter__(self) -> "OutputTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def discard(self) -> None:
        """Remove the temporary path (a no-op after ``commit``)."""
        if not self.committed:
            _remove(self.tmp)

    def commit(self) -> Path:
        """Move the written temporary path into place; return the final path."""
        _follow_umask(self.tmp)
        if self.kind == "folder":
            files = sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*") if p.is_file())
            manifest = {"tool": "permgraph", "version": package_version(), "command": self.command, "files": files}
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            _follow_umask(self.tmp / MANIFEST)
        old = None
        if self.path.exists() or self.path.is_symlink():
            if not self.replace:  # appeared while we worked
                raise OutputError(f"{self.path} appeared while permgraph was working; nothing was replaced")
            old = self.path.with_name(f".{self.path.name}{_OLD}{os.getpid()}")
            os.replace(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            if old is not None:
                os.replace(old, self.path)
            raise
        self.committed = True
        if old is not None:
            _remove(old)
        return self.path


def _follow_umask(path: Path) -> None:
    """Give what we wrote the modes of ordinary files and folders (some writers create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def is_permgraph_output(path: Path) -> bool:
    """True for what permgraph writes: a folder with only its manifest's files, a .safetensors
    file with permgraph's metadata, a spec or alignment JSON."""
    if path.is_dir():
        return not foreign_files(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return "permgraph" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - unreadable: not ours
            return False
    if path.suffix == ".json":
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and (d.get("format") == "permgraph-alignment"
                                        or {"version", "groups", "axes", "shapes"} <= d.keys())
    return False


def foreign_files(folder: Path) -> list[str]:
    """Entries of ``folder`` that permgraph's manifest does not list (all of them without one)."""
    entries = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return entries or ["(no permgraph manifest)"]
    return [e for e in entries if e not in listed]


def _kind_for(raw: str, path: Path, kinds: Mapping[str, Kind]) -> Kind:
    """File or folder, from the suffix. A name whose suffix does not look like a file extension
    (``llama-3.1-ft``) or that ends with a slash is a folder, where the command writes folders."""
    suffix = path.suffix.lower()
    if raw.endswith(("/", os.sep)) and "" in kinds:
        return "folder"
    if suffix in kinds:
        return kinds[suffix]
    if "" in kinds and not re.fullmatch(r"\.[a-z][a-z0-9_]{0,9}", suffix):
        return "folder"
    allowed = ", ".join("a folder (no suffix, or end the path with '/')" if s == "" else s for s in kinds)
    raise OutputError(f"cannot write '{path.name}': unknown output suffix '{suffix}'; this command writes {allowed}")


def _refuse_overlap(out: Path, inputs: list[Path]) -> None:
    real = Path(os.path.realpath(out))
    for p in inputs:
        if not p.exists():
            continue
        q = Path(os.path.realpath(p))
        if real == q:
            raise OutputError(f"the output {out} is the input {p}: choose another output path")
        if real in q.parents:
            raise OutputError(f"the output {out} contains the input {p}: choose another output path")
        if q in real.parents:
            raise OutputError(f"the output {out} lies inside the input {p}: choose a path outside it")
    protected = {Path.cwd().resolve(), Path.home().resolve(), Path(real.anchor)}
    if real in protected or real in Path.cwd().resolve().parents:
        raise OutputError(f"refusing to write over {out}: it is the working folder, one of its parents, "
                          "the home folder or the root; name a new file or folder")


def _check_existing(path: Path, kind: Kind, force: bool, replace_foreign: bool) -> bool:
    """Whether an existing ``path`` may be replaced; raises when it may not."""
    if not (path.exists() or path.is_symlink()):
        return False
    if not force:
        raise OutputError(f"{path} exists; pass --force to replace an earlier permgraph output")
    if path.is_symlink() or (path.is_dir() != (kind == "folder")):
        raise OutputError(f"{path} exists and is {'a link' if path.is_symlink() else 'not a ' + kind}; "
                          "remove it yourself or choose another output path")
    if replace_foreign or is_permgraph_output(path):
        return True
    what = (f"holds files permgraph did not write ({', '.join(foreign_files(path)[:5])})" if path.is_dir()
            else "was not written by permgraph")
    raise OutputError(f"{path} {what}; --force only replaces permgraph's own outputs. "
                      "Choose another path, or pass --replace-foreign to replace it anyway")


def _remove_stale(path: Path) -> None:
    """Remove temporary paths of this output left by runs that no longer exist."""
    for tag in (_TMP, _OLD):
        for p in path.parent.glob(f".{_glob_escape(path.name)}{tag}*"):
            pid = p.name.rpartition(tag)[2]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(p)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("permgraph")
    except PackageNotFoundError:
        return "unknown"
