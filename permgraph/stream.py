"""Streaming transport: ``B_ft = B + alpha * pi(A_ft - A)`` one tensor at a time, in bounded memory.

For safetensors checkpoints (files, folders, sharded indexes) with the alignment known.
Per tensor ``w`` (B's name, dtype ``d``): read ``A[w]``, ``A_ft[w]``, ``B[w]`` from disk,
compute ``(wide(B[w]) + alpha(w) * pi(wide(A_ft[w]) - wide(A[w]))).to(d)`` with ``wide``
= at least float32 (float64 stays float64), exactly as ``pg.transport`` does (the
result is bit-identical), append it to the output shard and drop it. Several fine-tunes
add their moved task vectors in order. Non-floating entries are B's. Memory: one
tensor of each input plus a few float32 temporaries of it; inputs are read with plain
positioned reads (page cache, not resident memory).

Everything is checked before the first tensor is computed (every input's header, shards
listed in an index, the spec's names and shapes, fine-tune names); values are checked
(NaN/inf) as they stream, and every input file's size and mtime are compared with those
at the start before the output is committed. A fine-tune with parameters the base lacks
(a new head) needs the fine-tuned model compiled: ``NotStreamable``, the caller falls
back to the in-memory ``pg.transport``.
"""
from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from permgraph.align import apply_alignment
from permgraph.alignment import Alignment
from permgraph.errors import InputError, PermgraphWarning
from permgraph.loading import check_folder_tensors, copy_model_files
from permgraph.outputs import package_version
from permgraph.shards import Checkpoint, ShardWriter, find_checkpoint, plan_shards, shard_names, write_index
from permgraph.spec import PermSpec
from permgraph.transport import Alpha, alpha_for, check_alpha, check_transport_inputs, wide

DEFAULT_MAX_SHARD = 50 * 10 ** 9  # transformers 5's save_pretrained default, "50GB"


class NotStreamable(Exception):
    """These inputs need the in-memory transport (the message says why)."""


@dataclass
class Plan:
    """Opened inputs, checked against the spec: base name of every fine-tune name, per fine-tune."""

    a: Checkpoint
    fts: list[Checkpoint]
    b: Checkpoint
    names: list[dict[str, str]]
    alpha: Alpha
    folders: tuple[Path | None, Path | None]  # B's folder, the (first) fine-tune's folder

    def close(self) -> None:
        for c in (self.a, *self.fts, self.b):
            c.close()


@dataclass
class StreamReport:
    """What a streaming run did and where its time went (seconds), and the peak RSS of the process."""

    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "compute": 0.0, "write": 0.0})
    peak_rss_gb: float = 0.0

    def to_dict(self) -> dict:
        return {"streamed_tensors": self.tensors, "streamed_bytes": self.bytes, "shards": self.shards,
                "stream_seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "peak_rss_gb": self.peak_rss_gb}


def streamable(refs: Sequence[str]) -> bool:
    """Whether every reference is a safetensors file or a folder with safetensors weights."""
    return all(r and find_checkpoint(r) is not None for r in refs)


def prepare(base_old: str, finetuned: Sequence[str], base_new: str, spec: PermSpec, alpha: Alpha) -> Plan:
    """Open A, the fine-tunes and B lazily and run every check that needs no values:
    headers, shards, config.json classes, spec names and shapes, fine-tune names."""
    opened: list[Checkpoint] = []
    try:
        for ref in (base_old, *finetuned, base_new):
            opened.append(Checkpoint(find_checkpoint(ref)))
            if Path(ref).is_dir() and (Path(ref) / "config.json").is_file():
                check_folder_tensors(Path(ref), {k: e.shape for k, e in opened[-1].entries.items()})
        a, *fts, b = opened
        ma = a.meta()
        names = check_transport_inputs(spec, ma, [f.meta() for f in fts], b.meta())
        extra = sorted(set(fts[0].entries) - set(names[0]))
        if extra:
            raise NotStreamable(f"the fine-tune has parameters the base lacks ({extra[:3]}): they need the "
                                "fine-tuned model compiled, so the transport runs in memory")
        if any(n != names[0] for n in names[1:]):
            raise InputError("fine-tunes to sum must share parameter names")
        alpha = check_alpha(alpha, list(ma) + [x for x, c in spec.aliases.items() if c in ma])
    except BaseException:
        for c in opened:
            c.close()
        raise
    folder = (lambda r: Path(r) if Path(r).is_dir() else None)  # noqa: E731
    return Plan(a, fts, b, names, alpha, (folder(base_new), folder(finetuned[0])))


def run(plan: Plan, alignment: Alignment, tmp: Path, kind: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD,
        progress: bool = False) -> StreamReport:
    """Write ``B + alpha * pi(A_ft - A)`` into ``tmp`` (a folder: shards, index, B's config and
    tokenizer files; or one .safetensors file), tensor by tensor, in B's names and dtypes."""
    base_of = {b: f for f, b in plan.names[0].items()}  # base name -> output (fine-tune) name
    order = list(plan.b.entries)
    sizes = {base_of[n]: plan.b.entries[n].nbytes for n in order}
    shards = plan_shards(sizes, max_shard_bytes) if kind == "folder" else [list(sizes)]
    files = shard_names(len(shards)) if kind == "folder" else [None]
    report = StreamReport(shards=len(shards))
    meta = {"format": "pt", "permgraph": package_version()}
    dist = [[0.0, 0.0] for _ in plan.fts]
    bar = _bar(sum(sizes.values()), progress)
    to_base = {f: b for b, f in base_of.items()}
    try:
        for names, fname in zip(shards, files):
            path = tmp if fname is None else tmp / fname
            specs = {n: (plan.b.entries[to_base[n]].dtype, plan.b.entries[to_base[n]].shape) for n in names}
            w = ShardWriter(path, specs, meta)
            try:
                for out_name in names:
                    t = _one(plan, alignment, to_base[out_name], report, dist)
                    t0 = time.perf_counter()
                    w.write(out_name, t)
                    report.seconds["write"] += time.perf_counter() - t0
                    report.tensors += 1
                    report.bytes += sizes[out_name]
                    bar.update(sizes[out_name])
                    del t
            finally:
                w.file.close()
            w.close()
    finally:
        bar.close()
    for c in (plan.a, *plan.fts, plan.b):
        c.check_unchanged()
    if kind == "folder":
        write_index(tmp, shards, sizes)
        copy_model_files(tmp, *plan.folders)
    _warn_if_closer_to_b(dist)
    report.peak_rss_gb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
    return report


def _one(plan: Plan, alignment: Alignment, base: str, report: StreamReport, dist: list[list[float]]) -> torch.Tensor:
    """One output tensor: ``(wide(B) + alpha * sum_i pi(wide(A_ft_i) - wide(A))).to(B.dtype)``."""
    t0 = time.perf_counter()
    b, a = plan.b.read(base), plan.a.read(base)
    fts = [c.read(next(f for f, b in names.items() if b == base)) for c, names in zip(plan.fts, plan.names)]
    t1 = time.perf_counter()
    report.seconds["read"] += t1 - t0
    for label, x in [("base A", a), ("base B", b)] + [(f"fine-tune {i}", f) for i, f in enumerate(fts)]:
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise InputError(f"{label}: '{base}' contains NaN or inf")
    if not (a.is_floating_point() and b.is_floating_point()):
        return b
    total = None
    for i in range(len(fts)):
        wf = wide(fts[i])
        fts[i] = None  # type: ignore[call-overload]  # freed as soon as possible: memory is one tensor
        tau = wf - wide(a)
        dist[i][0] += float(tau.pow(2).sum())
        dist[i][1] += float(wf.sub_(wide(b)).pow(2).sum())  # wf is this run's own buffer (or a widened copy)
        del wf
        moved = apply_alignment(alignment, {base: tau})[base]
        del tau
        total = moved if total is None else total.add_(moved)
        del moved
    del a
    # (wide(B) + alpha * total) in place: the same two roundings as pg.transport, so bit-identical
    out = total.mul_(alpha_for(plan.alpha, base)).add_(wide(b)).to(b.dtype)
    report.seconds["compute"] += time.perf_counter() - t1
    return out


def _warn_if_closer_to_b(dist: list[list[float]]) -> None:
    """``|A_ft - B| < |A_ft - A|``: the task vector would mostly be B - A (as ``pg.transport`` warns)."""
    for i, (to_a, to_b) in enumerate(dist):
        if to_b < to_a:
            label = f"fine-tune {i}" if len(dist) > 1 else "fine-tune"
            warnings.warn(f"{label} is closer to base B (distance {to_b ** 0.5:.4g}) than to base A "
                          f"({to_a ** 0.5:.4g}): is it a fine-tune of B rather than of A? Its task vector "
                          "A_ft - A would then be mostly B - A", PermgraphWarning, stacklevel=3)


class _NoBar:
    update: Callable[[int], None] = staticmethod(lambda n: None)
    close: Callable[[], None] = staticmethod(lambda: None)


def _bar(total: int, show: bool):
    if not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc="transport", leave=False)
