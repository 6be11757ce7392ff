"""Streaming transport: ``B_ft = B + alpha * pi(A_ft - A)`` one tensor at a time, in bounded memory.

For safetensors checkpoints (files, folders, sharded indexes) with the alignment known.
Per tensor ``w`` (B's name, dtype ``d``): read ``A[w]``, ``A_ft[w]``, ``B[w]`` from disk in
row chunks, compute ``(wide(B[w]) + alpha(w) * pi(wide(A_ft[w]) - wide(A[w]))).to(d)`` with
``wide`` = at least float32 (float64 stays float64), element for element as ``pg.transport``
does (the result is bit-identical), and append each block of output rows to the shard.
Several fine-tunes add their task vectors in order. Non-floating entries are B's. Memory:
a few chunks of about ``CHUNK`` elements, plus one wide copy of a tensor whose dim 0 is
permuted (its rows are gathered from anywhere); inputs are read with plain positioned
reads (page cache, not resident memory). The permutation is checked once and each axis's
gather index built once. Soft plans (transport matrices) take whole tensors.

Everything is checked before the first tensor is computed (every input's header, shards
listed in an index, the spec's names and shapes, fine-tune names); values are checked
(NaN/inf) as they stream, and every input file's size and mtime are compared with those
at the start before the output is committed. A fine-tune with parameters the base lacks
(a new head) needs the fine-tuned model compiled: ``NotStreamable``, the caller falls
back to the in-memory ``pg.transport``.
"""
from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from permgraph.align import apply_alignment
from permgraph.alignment import Alignment
from permgraph.errors import InputError, PermgraphWarning
from permgraph.ir import AxisTree
from permgraph.loading import ConvertedCheckpoint, Source, check_folder_tensors, copy_model_files, load_source
from permgraph.outputs import package_version
from permgraph.permutation import axis_index, check_permutation, permute_tensor
from permgraph.shards import Checkpoint, ShardWriter, find_checkpoint, plan_shards, shard_names, write_index
from permgraph.spec import PermSpec
from permgraph.transport import Alpha, alpha_for, check_alpha, check_transport_inputs, wide

DEFAULT_MAX_SHARD = 50 * 10 ** 9  # transformers 5's save_pretrained default, "50GB"
CHUNK = 1 << 20  # elements per row chunk


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
    buffers: dict = field(default_factory=dict, repr=False)  # reusable chunk read buffers (see _buffers)

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


def map_threshold(nbytes: int) -> bool:
    """glibc serves blocks of ``nbytes`` or more with their own memory maps, given back to the
    system when freed; smaller ones come from its heaps, which keep freed memory for reuse.

    By default glibc raises the threshold up to 32 MB as blocks are freed. Alignment sets
    ``SMALL_MAPS`` (1 MB): its temporaries are parameter-sized and the heaps held 0.7 GB more at
    the peak (0.5 GB fp32 checkpoint). The streaming loop sets ``LARGE_MAPS`` (32 MB): its
    chunk-sized temporaries, mapped and zeroed afresh each time, made compute 2-3x slower.
    Process-wide; False where the C library has no ``mallopt`` (not glibc)."""
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(-3, int(nbytes)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


SMALL_MAPS, LARGE_MAPS = 1 << 20, 32 << 20


def load_for_align(ref_a: str, ref_b: str, spec_of: Callable[[Source], PermSpec], *, needs_module: bool = False
                   ) -> tuple[Source, Source, PermSpec]:
    """A and B for an alignment, holding only the spec's parameters, each in its own dtype.

    For safetensors inputs (folders, files, sharded indexes): a folder's model is built from its
    config.json on the meta device (for ``spec_of`` to compile; every checkpoint is first checked
    against its config), then each spec parameter is read from disk into its own memory, nothing
    else; ``Source.module`` is that meta model. Other inputs, a solver that runs the model
    (``needs_module``), or a model that does not compile on the meta device: loaded whole
    (``load_source``) as before.
    """
    def whole() -> tuple[Source, Source, PermSpec]:
        a, b = load_source(ref_a), load_source(ref_b)
        return a, b, spec_of(a if a.module is not None else b)

    if needs_module or not streamable([ref_a, ref_b]):
        return whole()
    map_threshold(SMALL_MAPS)
    srcs = []
    for ref in (ref_a, ref_b):
        with Checkpoint(find_checkpoint(ref)) as ck:
            folder = Path(ref) if Path(ref).is_dir() else None
            module = None
            if folder is not None and (folder / "config.json").is_file():
                try:
                    module = check_folder_tensors(folder, {k: e.shape for k, e in ck.entries.items()})
                except ConvertedCheckpoint:
                    return whole()
            srcs.append(Source(ref, {}, module, None, folder))
    a, b = srcs
    try:
        spec = spec_of(a if a.module is not None else b)
    except Exception:  # noqa: BLE001 - tracing on the meta device failed: try the loaded model
        if a.module is None and b.module is None:
            raise
        return whole()
    for src in srcs:
        with Checkpoint(find_checkpoint(src.ref)) as ck:
            for name in spec.shapes:
                hit = next((n for n in spec.names_of(name) if n in ck.entries), None)
                if hit is not None:  # a missing one is named by the alignment's own checks
                    src.state[hit] = ck.read(hit)
            ck.check_unchanged()
    return a, b, spec


def prepare(base_old: str, finetuned: Sequence[str], base_new: str, spec: PermSpec, alpha: Alpha) -> Plan:
    """Open A, the fine-tunes and B lazily and run every check that needs no values:
    headers, shards, config.json classes, spec names and shapes, fine-tune names."""
    opened: list[Checkpoint] = []
    try:
        for ref in (base_old, *finetuned, base_new):
            opened.append(Checkpoint(find_checkpoint(ref)))
            if Path(ref).is_dir() and (Path(ref) / "config.json").is_file():
                try:
                    check_folder_tensors(Path(ref), {k: e.shape for k, e in opened[-1].entries.items()})
                except ConvertedCheckpoint as e:
                    raise NotStreamable(str(e)) from None
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
    mover = Mover(alignment)
    map_threshold(LARGE_MAPS)
    bar = _bar(sum(sizes.values()), progress)
    to_base = {f: b for b, f in base_of.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # chunks are small and the work memory-bound: thread wake-ups cost more than they buy
    try:
        for names, fname in zip(shards, files):
            path = tmp if fname is None else tmp / fname
            specs = {n: (plan.b.entries[to_base[n]].dtype, plan.b.entries[to_base[n]].shape) for n in names}
            w = ShardWriter(path, specs, meta)
            try:
                for out_name in names:
                    t0, busy = time.perf_counter(), report.seconds["read"] + report.seconds["compute"]
                    w.write(out_name, _one(plan, mover, to_base[out_name], report, dist))
                    busy = report.seconds["read"] + report.seconds["compute"] - busy
                    report.seconds["write"] += time.perf_counter() - t0 - busy
                    report.tensors += 1
                    report.bytes += sizes[out_name]
                    bar.update(sizes[out_name])
            finally:
                w.file.close()
            w.close()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    for c in (plan.a, *plan.fts, plan.b):
        c.check_unchanged()
    if kind == "folder":
        write_index(tmp, shards, sizes)
        copy_model_files(tmp, *plan.folders)
    _warn_if_closer_to_b(dist)
    report.peak_rss_gb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
    return report


class Mover:
    """An alignment applied to one tensor at a time: the permutation is checked once, and each
    axis tree's gather index is built once and reused by every tensor that has that axis."""

    def __init__(self, alignment: Alignment) -> None:
        self.alignment, self.spec = alignment, alignment.spec
        self.soft = bool(alignment.soft)  # soft plans mix along an axis: whole tensors, apply_alignment
        if not self.soft:
            check_permutation(self.spec, alignment.permutation)
        self._index: dict[AxisTree, torch.Tensor] = {}
        self.ft_names: list[dict[str, str]] | None = None

    def indices(self, name: str) -> list[torch.Tensor | None]:
        """Per dim of ``name``: its gather index (new position -> old), or None where nothing moves."""
        trees = self.spec.axes_of(name)
        out: list[torch.Tensor | None] = []
        for tree in trees or ():
            if not tree.groups():
                out.append(None)
                continue
            if tree not in self._index:
                self._index[tree] = axis_index(tree, self.alignment.permutation, self.spec.ctx, self.spec.sizes)
            out.append(self._index[tree])
        return out

    def whole(self, name: str, tau: torch.Tensor) -> torch.Tensor:
        return apply_alignment(self.alignment, {name: tau})[name]


def _one(plan: Plan, mover: Mover, base: str, report: StreamReport, dist: list[list[float]]
         ) -> Iterator[torch.Tensor]:
    """One output tensor as row blocks: ``(wide(B) + alpha * pi(sum_i wide(A_ft_i) - wide(A))).to(B.dtype)``,
    the expression of ``pg.transport`` on each element, so the result is bit-identical.

    Rows are read in chunks of about ``CHUNK`` elements. When dim 0 is not permuted (embeddings,
    the LM head, norms, anything unpermuted) each chunk of output rows needs only those rows of
    the inputs: memory is a few chunks. When dim 0 is permuted, the (wide) task vector of the
    whole tensor is accumulated first, then gathered block by block: one wide copy of the tensor
    (two for a tensor with a layout, an expert bank: it is permuted whole, then read by rows).
    """
    if mover.ft_names is None:
        mover.ft_names = [{b: f for f, b in names.items()} for names in plan.names]
    fnames = [m[base] for m in mover.ft_names]
    eb, ea = plan.b.entries[base], plan.a.entries[base]
    if not (ea.dtype.is_floating_point and eb.dtype.is_floating_point):
        yield plan.b.read(base)
        return
    if mover.soft:
        yield _whole(plan, mover, base, fnames, report, dist)
        return
    alpha = alpha_for(plan.alpha, base)
    viewed = mover.spec.canonical(base) in mover.spec.layouts  # dims merged (an expert's units): moved whole
    idx = [torch.arange(eb.shape[0])] if viewed else mover.indices(base)
    idx += [None] * (len(eb.shape) - len(idx))
    rows = eb.shape[0] if eb.shape else 1
    step = max(1, CHUNK // max(1, math.prod(eb.shape[1:])))
    spans = [(r, min(rows, r + step)) for r in range(0, rows, step)]
    bufs = _buffers(plan, step * math.prod(eb.shape[1:]))
    permuted0 = bool(idx) and idx[0] is not None
    tau = None
    for r0, r1 in spans:
        t0 = time.perf_counter()
        a = plan.a.read(base, (r0, r1), bufs["a"])
        b = plan.b.read(base, (r0, r1), bufs["b"])
        fts = [c.read(f, (r0, r1), bufs[i]) for i, (c, f) in enumerate(zip(plan.fts, fnames))]
        t1 = time.perf_counter()
        total = _task_vector(base, a, b, fts, dist)
        if permuted0:
            if tau is None:
                tau = torch.empty(eb.shape, dtype=total.dtype)
            tau[r0:r1] = total
            report.seconds["read"] += t1 - t0
            report.seconds["compute"] += time.perf_counter() - t1
            continue
        out = _finish(b, total, idx, alpha)
        report.seconds["read"] += t1 - t0
        report.seconds["compute"] += time.perf_counter() - t1
        yield out
    if viewed and tau is not None:
        tau = permute_tensor(mover.spec, mover.alignment.permutation, base, tau)
    for r0, r1 in spans if permuted0 else ():
        t0 = time.perf_counter()
        b = plan.b.read(base, (r0, r1), bufs["b"])
        t1 = time.perf_counter()
        out = _finish(b, tau.index_select(0, idx[0][r0:r1]), idx, alpha)
        report.seconds["read"] += t1 - t0
        report.seconds["compute"] += time.perf_counter() - t1
        yield out


def _task_vector(base: str, a: torch.Tensor, b: torch.Tensor, fts: list[torch.Tensor],
                 dist: list[list[float]]) -> torch.Tensor:
    """``sum_i (wide(A_ft_i) - wide(A))`` on one chunk, summed in order as ``pg.transport`` sums the moved
    task vectors (a gather only relocates elements, so summing before it gives the same values).

    Also accumulates each fine-tune's squared distances to A and to B, whose finiteness proves the
    chunk's values finite (``x - y`` is finite only when both are): the exact per-input check runs
    only when a sum is not finite."""
    total = None
    for i, f in enumerate(fts):
        wf = wide(f)
        t = wf - wide(a)
        d = wf - wide(b)
        to_a, to_b = _sq(t), _sq(d)
        del d
        if not (math.isfinite(to_a) and math.isfinite(to_b)):
            for label, x in [("base A", a), ("base B", b)] + [(_ft_label(j, len(fts)), y) for j, y in enumerate(fts)]:
                if not bool(torch.isfinite(x).all()):
                    raise InputError(f"{label}: '{base}' contains NaN or inf")
            to_a, to_b = _sq(t.double()), _sq(wf.double() - wide(b).double())  # finite values that overflowed
        dist[i][0] += to_a
        dist[i][1] += to_b
        total = t if total is None else total + t
    assert total is not None
    return total


def _sq(x: torch.Tensor) -> float:
    x = x.reshape(-1)
    return float(torch.dot(x, x)) if x.numel() else 0.0


def _ft_label(i: int, n: int) -> str:
    return f"fine-tune {i}" if n > 1 else "fine-tune"


def _finish(b: torch.Tensor, moved: torch.Tensor, idx: list[torch.Tensor | None], alpha: float) -> torch.Tensor:
    """``(wide(B) + alpha * moved).to(B.dtype)`` on rows whose dim 0 is already in place; other dims gathered."""
    for dim in range(1, len(idx)):
        if idx[dim] is not None:
            moved = moved.index_select(dim, idx[dim])
    return (wide(b) + alpha * moved).to(b.dtype)


def _buffers(plan: Plan, numel: int) -> dict:
    """Reusable read buffers (uint8) for one chunk of each input: keys "a", "b" and each fine-tune's index."""
    cache = plan.buffers
    need = numel * 8
    if cache.get("size", -1) < need:
        cache.clear()
        cache["size"] = need
        cache["bufs"] = {k: torch.empty(need, dtype=torch.uint8) for k in ["a", "b", *range(len(plan.fts))]}
    return cache["bufs"]


def _whole(plan: Plan, mover: Mover, base: str, fnames: list[str], report: StreamReport,
           dist: list[list[float]]) -> torch.Tensor:
    """Soft plans mix along an axis: the whole tensor at once, moved by ``apply_alignment``."""
    t0 = time.perf_counter()
    b, a = plan.b.read(base), plan.a.read(base)
    fts = [c.read(f) for c, f in zip(plan.fts, fnames)]
    t1 = time.perf_counter()
    total = None
    for i, f in enumerate(fts):
        one = [[0.0, 0.0]]
        tau = _task_vector(base, a, b, [f], one)
        dist[i][0] += one[0][0]
        dist[i][1] += one[0][1]
        moved = mover.whole(base, tau)
        total = moved if total is None else total + moved
    out = (wide(b) + alpha_for(plan.alpha, base) * total).to(b.dtype)
    report.seconds["read"] += t1 - t0
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
