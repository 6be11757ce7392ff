"""The human-readable report of a spec: groups, members, fixed axes and why, coverage."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # the report reads a spec; the spec module renders itself with it
    from permgraph.spec import PermSpec

# layer indices, duplicate-name counters, and the head of a per-head within-head group (ALiBi)
_NUM = re.compile(r"(?<=\.)\d+(?=\.|$)|(?<=#)\d+$|(?<=\.head)\d+$")
_NODE_NUM = re.compile(r"(?<=\(at )(\w+?)(?:_\d+)?\)")  # node names without their counter


def _pattern(name: str) -> tuple[str, tuple[int, ...]]:
    nums = tuple(int(m.group()) for m in _NUM.finditer(name))
    return _NUM.sub("*", name), nums


def _ranges(nums: Iterable[int]) -> str:
    xs = sorted(set(nums))
    if not xs:
        return ""
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def _collapse(names: Iterable[str]) -> list[tuple[str, int, str]]:
    """Group names that differ only in layer indices: (pattern, count, index ranges)."""
    buckets: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for n in names:
        pat, nums = _pattern(n)
        buckets[pat].append(nums)
    out = []
    for pat, nums in buckets.items():
        firsts = [n[0] for n in nums if n]
        out.append((pat, len(nums), _ranges(firsts) if len(nums) > 1 else ""))
    return out


def explain_spec(spec: "PermSpec", max_rows: int = 40) -> str:
    """One row per group pattern (layer indices collapsed), fixed axes with reasons, tied parameters."""
    lines = []
    model = spec.info.get("model", "model")
    members = spec.member_map()
    n_params = len(spec.shapes)
    lines.append(f"permutation spec of {model}: {len(spec.groups)} groups, "
                 f"{spec.covered_fraction():.1%} of parameter entries permuted ({n_params} parameter tensors)")
    lines.append("")
    lines.append("groups (layer and head indices collapsed as *):")
    rows = defaultdict(list)
    for g in spec.groups.values():
        pat, _ = _pattern(g.name)
        mem = members[g.name]
        mem_pat = sorted({_pattern(m.param)[0] + f"[{spec.axis_label(m.param, m.axis)}]" for m in mem})
        rows[pat].append((g, mem, mem_pat))
    header = f"  {'group':<46} {'kind':<22} {'size':>6} {'count':>5}  members"
    lines.append(header)
    for i, (pat, items) in enumerate(rows.items()):
        if i >= max_rows:
            lines.append(f"  ... {len(rows) - max_rows} more group patterns")
            break
        g, mem, mem_pat = items[0]
        kind = g.role or "flat"
        if g.ctx:
            kind += " per " + _pattern(g.ctx[-1])[0].rsplit(".", 1)[-1]
        elif re.search(r"\.head\d+$", g.name):
            kind += " per fixed head"
        nums = [_pattern(it[0].name)[1] for it in items]
        idx = _ranges(n[0] for n in nums if n)
        count = f"{len(items)}"
        mem_txt = ", ".join(_shorten(m, pat) for m in mem_pat[:4]) + (" ..." if len(mem_pat) > 4 else "")
        lines.append(f"  {pat + (f'  [{idx}]' if len(items) > 1 and idx else ''):<46} {kind:<22} "
                     f"{g.size:>6} {count:>5}  {len(mem)} axes: {mem_txt}")
    lines.append("")
    if spec.fixed:
        lines.append("fixed parameter axes (not permuted) and why:")
        fixed_rows: dict[tuple[str, str], list[str]] = defaultdict(list)
        for f in spec.fixed:
            pat, _ = _pattern(f.param)
            why = "; ".join(dict.fromkeys(_NODE_NUM.sub(r"\1)", _pattern(r)[0]) for r in f.reasons[:3]))
            fixed_rows[(f"{pat}[{spec.axis_label(f.param, f.axis)}] of {spec.view_shape(f.param)[f.axis]}: "
                        f"{f.part}", why)].append(f.param)
        for i, ((what, why), params) in enumerate(fixed_rows.items()):
            if i >= max_rows:
                lines.append(f"  ... {len(fixed_rows) - max_rows} more")
                break
            times = f" x{len(params)}" if len(params) > 1 else ""
            lines.append(f"  {what}{times} -- {why}")
    else:
        lines.append("fixed parameter axes: none")
    if spec.aliases:
        lines.append("")
        lines.append("tied parameters: " + ", ".join(f"{a} = {c}" for a, c in spec.aliases.items()))
    lines.append("")
    if spec.unknown_ops:
        lines.append("ops without a rule (their axes were fixed): "
                     + ", ".join(f"{k} x{v}" for k, v in spec.unknown_ops.items()))
    else:
        lines.append("ops without a rule: none")
    if spec.residual_sites is not None:
        sites = {g for trees in spec.residual_sites.values() for t in trees for g in t.groups()} - set(spec.groups)
        lines.append(f"untied residual (residual='untied', TransFusion's Step 3): {len(sites)} residual sites, "
                     "one per residual addend; for task vectors, not function-preserving for pi(A)")
    elif "residual_sites_missing" in spec.info:
        lines.append(f"untied residual: not available ({spec.info['residual_sites_missing']})")
    if "fixed_outputs" in spec.info:
        lines.append(_outputs_line(spec))
    # how it was traced, where not plainly
    for key in ("text_only_inputs", "dropped_inputs", "inputs", "experts", "attention", "constants", "specialised",
                "draft"):
        if spec.info.get(key):
            lines.append(spec.info[key])
    return "\n".join(lines)


def _outputs_line(spec: "PermSpec", most: int = 4) -> str:
    """Which outputs stay unchanged and which may come out permuted (checked permuted where typed)."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "") or "none"

    kept = list(spec.info["fixed_outputs"])
    free = [o for o in spec.info.get("outputs", []) if o not in kept]
    line = f"outputs kept unchanged: {listed(kept)}"
    if free:
        unchecked = [o for o in free if o not in spec.outputs]
        line += (f"; free (may come out permuted; verify compares them permuted): {listed(free)}"
                 + (f"; not compared (not typed as one tensor): {listed(unchecked)}" if unchecked else ""))
    return line


def _shorten(member: str, group_pat: str) -> str:
    prefix = group_pat.rsplit(".", 1)[0] if "." in group_pat else ""
    if prefix and member.startswith(prefix + "."):
        return member[len(prefix) + 1:]
    return member
