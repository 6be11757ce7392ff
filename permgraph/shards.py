"""safetensors checkpoints read and written one tensor at a time (files, folders, sharded indexes).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``name -> {dtype, shape, data_offsets}`` plus ``__metadata__``), then the raw
little-endian data; offsets count from the end of the header. ``Checkpoint`` reads a
tensor with one positioned read into a fresh buffer (no memory map, so nothing stays
resident once the tensor is dropped); ``ShardWriter`` writes the header first (names,
shapes and dtypes are known in advance) and then the data tensor by tensor, so writing
holds one tensor at a time. Sharded folders follow transformers: ``model.safetensors``
when one shard suffices, else ``model-0000i-of-0000N.safetensors`` and
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from permgraph.errors import InputError, ModelLoadError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def find_checkpoint(ref: str | os.PathLike) -> Path | None:
    """The safetensors file or index a reference names: a ``.safetensors`` file, or a folder's
    ``model.safetensors`` (else its ``model.safetensors.index.json``); None when it has neither."""
    p = Path(ref)
    if p.is_file():
        return p if p.suffix == ".safetensors" else None
    if p.is_dir():
        for name in (SINGLE, INDEX):
            if (p / name).is_file():
                return p / name
    return None


class Checkpoint:
    """The tensors of a safetensors file or sharded index, listed at once and read one by one.

    Every file's size and modification time are recorded when opened; ``check_unchanged``
    raises ``InputError`` when a file changed or vanished since.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, str] = {}
        files = _index_files(self.path) if self.path.name.endswith(".index.json") else {self.path: None}
        self.stamps = {f: _stamp(f) for f in files}
        for f, names in files.items():
            entries, meta = read_header(f)
            self.metadata = self.metadata or meta
            if names is not None:
                lost = sorted(names - entries.keys())
                if lost:
                    raise ModelLoadError(f"{self.path} maps {lost[:3]} to {f.name}, which does not hold them: "
                                         "is the checkpoint complete?")
                entries = {k: v for k, v in entries.items() if k in names}
            self.entries.update(entries)
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (shape and dtype, no data): for checks before any reading."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.entries.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None, buffer: torch.Tensor | None = None
             ) -> torch.Tensor:
        """One tensor, or its rows ``r0:r1`` along dim 0 (a 0-d tensor has one row), read from disk
        into its own memory, or into the front of ``buffer`` (uint8, large enough), which it then views."""
        e = self.entries[name]
        shape = e.shape
        if rows is not None:
            n0 = shape[0] if shape else 1
            r0, r1 = rows
            if not 0 <= r0 <= r1 <= n0:
                raise IndexError(f"rows {rows} of '{name}' with {n0} rows")
            row = e.nbytes // n0 if n0 else 0
            start, nbytes = e.start + r0 * row, (r1 - r0) * row
            shape = (r1 - r0, *shape[1:]) if shape else shape
        else:
            start, nbytes = e.start, e.nbytes
        h = self._handles.get(e.file)
        if h is None:
            h = self._handles[e.file] = open(e.file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        buf = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
        if nbytes:
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:  # an unbuffered read may return less than asked
                n = os.preadv(h.fileno(), [view[got:]], start + got)
                if n <= 0:
                    raise ModelLoadError(f"{e.file} ended inside '{name}': the file is truncated or changed "
                                         "during the run")
                got += n
        return buf.view(e.dtype).reshape(shape)

    def check_unchanged(self) -> None:
        for f, stamp in self.stamps.items():
            now = _stamp(f, missing_ok=True)
            if now != stamp:
                raise InputError(f"{f} {'vanished' if now is None else 'changed'} while permgraph was reading it; "
                                 "nothing was written. Run again on inputs that stay put")


def _stamp(f: Path, missing_ok: bool = False) -> tuple[int, int] | None:
    try:
        st = f.stat()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ModelLoadError(f"{f} does not exist") from None
    return st.st_size, st.st_mtime_ns


def _index_files(index: Path) -> dict[Path, set[str]]:
    """Shard file -> the names the index maps to it; ``ModelLoadError`` when a shard is missing."""
    try:
        d = json.loads(index.read_text())
        weight_map = d["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ModelLoadError(f"{index} is not a safetensors index (a JSON object with 'weight_map'): {e}") from None
    files: dict[Path, set[str]] = {}
    for name, fname in weight_map.items():
        files.setdefault(index.parent / fname, set()).add(name)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index} lists shard(s) {missing[:3]} that do not exist: the download is incomplete")
    return files


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The entries and metadata of one safetensors file, every byte range checked against its size."""
    bad = f"cannot read weights from {path}"
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{bad} (not a safetensors file: bad header length); is the file complete?")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ModelLoadError(f"{bad} (its header is not a JSON object); is the file complete?") from None
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for name, h in header.items():
        try:
            dtype, shape, (s, e) = DTYPES[h["dtype"]], tuple(int(x) for x in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{bad} (entry '{name}' is malformed or of an unknown dtype)") from None
        numel = math.prod(shape)
        if not (0 <= s <= e and e - s == numel * dtype.itemsize and 8 + n + e <= size):
            raise ModelLoadError(f"{bad} ('{name}' lies outside the file or has the wrong length); "
                                 "is the file complete?")
        entries[name] = Entry(path, dtype, shape, 8 + n + s, 8 + n + e)
    return entries, meta


# -- writing ----------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count -> bytes (decimal units as transformers)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise InputError(f"--max-shard-size must be a size like 5GB, 500MB or 1000000, got '{text}'")
    base = 1024 if m.group(3) else 1000
    value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if value < 1:
        raise InputError(f"--max-shard-size must be positive, got '{text}'")
    return value


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_bytes`` (a larger tensor gets its own shard),
    as transformers' ``save_pretrained`` does."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(count: int) -> list[str]:
    return [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(folder: Path, shards: list[list[str]], sizes: Mapping[str, int]) -> None:
    """``model.safetensors.index.json`` for more than one shard (transformers' format)."""
    if len(shards) < 2:
        return
    files = shard_names(len(shards))
    weight_map = {n: f for names, f in zip(shards, files) for n in names}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class ShardWriter:
    """One safetensors file written tensor by tensor, in the order given to the constructor.

    ``specs``: name -> (dtype, shape) of every tensor, known before any data.
    """

    def __init__(self, path: Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        offset = 0
        for name, (dtype, shape) in specs.items():
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self.path, self.specs, self.pending = path, dict(specs), list(specs)
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Append the next tensor's bytes: the tensor, or its consecutive row blocks (dim 0; a 0-d
        tensor is one block) in its dtype. It must be the next name with the announced dtype and shape."""
        want = self.pending.pop(0) if self.pending else None
        dtype, shape = self.specs.get(name, (None, None))
        if name != want:
            raise RuntimeError(f"ShardWriter: got '{name}', expected '{want}'")
        if isinstance(data, torch.Tensor):
            if (data.dtype, tuple(data.shape)) != (dtype, shape):
                raise RuntimeError(f"ShardWriter: got '{name}' {data.dtype} {tuple(data.shape)}, "
                                   f"expected {dtype} {shape}")
            data = [data]
        rows, want_rows = 0, (shape[0] if shape else 1)
        for block in data:
            if block.dtype != dtype or tuple(block.shape[1:]) != tuple(shape[1:]) or (not shape and block.dim()):
                raise RuntimeError(f"ShardWriter: a block of '{name}' is {block.dtype} {tuple(block.shape)}, "
                                   f"expected {dtype} rows of {shape}")
            rows += block.shape[0] if shape else 1
            if block.numel():
                self.file.write(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        if rows != want_rows:
            raise RuntimeError(f"ShardWriter: '{name}' got {rows} rows, expected {want_rows}")

    def close(self) -> None:
        """Finish the file; every announced tensor must have been written."""
        self.file.close()
        if self.pending:
            raise RuntimeError(f"ShardWriter: {self.path.name} closed with {len(self.pending)} tensors unwritten")


def write_file(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], specs, metadata) -> None:
    """All of ``tensors`` (an iterator, consumed lazily) into one safetensors file."""
    w = ShardWriter(path, specs, metadata)
    try:
        for name, t in tensors:
            w.write(name, t)
    finally:
        w.file.close()
    w.close()
