"""The ``permgraph`` command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _spec_for(ref: str, outputs: list[str] | None):
    import permgraph as pg
    from permgraph.loading import load_model, load_spec_file

    if ref.endswith(".json") and Path(ref).is_file():
        return None, None, load_spec_file(ref)
    model, inputs = load_model(ref)
    return model, inputs, pg.compile(model, inputs, outputs=outputs)


def cmd_explain(args: argparse.Namespace) -> int:
    _, _, spec = _spec_for(args.model, args.outputs)
    if args.json:
        print(spec.to_json())
    else:
        print(spec.explain())
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _, _, spec = _spec_for(args.model, args.outputs)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(spec.to_json())
    tmp.replace(out)
    if not args.quiet:
        print(f"wrote {out}: {len(spec.groups)} groups, {spec.covered_fraction():.1%} of parameter entries "
              f"permuted ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import permgraph as pg

    model, inputs, spec = _spec_for(args.model, args.outputs)
    if model is None:
        raise ValueError("verify needs a model (folder or factory), not a spec file")
    rep = pg.verify(model, spec, inputs, seed=args.seed, tolerance=args.tolerance)
    if args.json:
        print(json.dumps({"ok": rep.ok, "max_rel_error": rep.max_rel_error, "max_abs_error": rep.max_abs_error,
                          "tolerance": rep.tolerance, "dtype": rep.dtype, "seed": rep.seed, "groups": rep.groups}))
    else:
        print(rep)
    return EXIT_OK if rep.ok else EXIT_FAILED


def _spec_from(args: argparse.Namespace, src):
    """The spec: --spec file, or compiled from the source's module."""
    import permgraph as pg
    from permgraph.loading import load_spec_file

    if getattr(args, "spec", None):
        return load_spec_file(args.spec)
    if src.module is None:
        raise ValueError(f"{src.ref} is a weights file: pass --spec SPEC.json (from 'permgraph compile')")
    return pg.compile(src.module, src.inputs, outputs=getattr(args, "outputs", None))


def _align(args: argparse.Namespace, a, b, spec):
    import permgraph as pg

    opts = {"heads": args.heads} if args.heads else {}
    return pg.align(a.state, b.state, spec, solver=args.solver, backend=args.backend, seed=args.seed,
                    max_iter=args.max_iter, progress=not args.quiet and not args.json, **opts)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")


def cmd_align(args: argparse.Namespace) -> int:
    from permgraph.loading import load_source

    out = Path(args.out)
    _check_out(out, args.force)
    a, b = load_source(args.model_a), load_source(args.model_b)
    spec = _spec_from(args, a if a.module is not None else b)
    al = _align(args, a, b, spec)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(al.to_json())
    tmp.replace(out)
    _report(args, al, {"out": str(out)})
    return EXIT_OK


def _parse_alpha(text: str):
    try:
        return float(text)
    except ValueError:
        pass
    out = {}
    for part in text.split(","):
        pattern, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--alpha must be a number or 'pattern=value,...', got '{text}'")
        out[pattern.strip()] = float(value)
    return out


def cmd_transport(args: argparse.Namespace) -> int:
    import permgraph as pg
    from permgraph.loading import load_source, save_output
    from permgraph.solvers import Alignment
    from permgraph.transport import check_transport_inputs

    t0 = time.perf_counter()
    out = Path(args.out)
    _check_out(out, args.force)
    alpha = _parse_alpha(args.alpha)
    a, b = load_source(args.base_old), load_source(args.base_new)
    fts = [load_source(f) for f in args.finetuned]
    if not args.permutation:
        spec = _spec_from(args, a if a.module is not None else b)
        check_transport_inputs(spec, a.state, [f.state for f in fts], b.state)  # fail before solving
    if args.permutation:
        al = Alignment.from_json(Path(args.permutation).read_text()) if Path(args.permutation).is_file() else None
        if al is None:
            raise FileNotFoundError(f"alignment file {args.permutation} does not exist")
    else:
        al = _align(args, a, b, spec)
    ft_inputs = [f.module if f.module is not None else f.state for f in fts]
    result = pg.transport(a.state, ft_inputs if len(fts) > 1 else ft_inputs[0], b.state, al, alpha=alpha)
    save_output(result, out, b, fts[0], args.force)
    _report(args, al, {"out": str(out), "tensors": len(result), "alpha": args.alpha,
                       "seconds": round(time.perf_counter() - t0, 2)})
    return EXIT_OK


def _report(args: argparse.Namespace, al, extra: dict) -> None:
    if args.json:
        print(json.dumps({"groups": len(al.spec.groups), "sweeps": al.sweeps,
                          "objective_before": al.history[0] if al.history else None,
                          "objective_after": al.history[-1] if al.history else None,
                          "function_preserving": al.function_preserving, "settings": al.settings,
                          "timings": al.timings, **extra}))
    elif not args.quiet:
        print(al.summary())
        print("wrote " + extra["out"])


def cmd_demo(args: argparse.Namespace) -> int:
    from permgraph.demo import run_demo

    return run_demo(quick=args.quick, task=args.task, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="permgraph",
        description="Compile a PyTorch model into its permutation spec; explain, verify, align, transport.",
        epilog="MODEL is a transformers model folder (config.json + weights), a factory "
               "'package.module:function' returning a model or (model, example_inputs), "
               "or (for explain) a spec .json written by 'permgraph compile'. "
               "A and B may also be weights files (.safetensors, .bin) with --spec. "
               "Exit codes: 0 ok, 1 verification failed, 2 bad input.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("model", metavar="MODEL")
        s.add_argument("--outputs", nargs="*", default=None, metavar="NAME",
                       help="outputs that must stay unchanged (default: all); others may come out permuted")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        s.add_argument("-q", "--quiet", action="store_true", help="print only errors")
        return s

    s = model_cmd("explain", "show the permutation groups, their members, and what is fixed and why")
    s.set_defaults(fn=cmd_explain)
    s = model_cmd("compile", "write the permutation spec as JSON")
    s.add_argument("--out", required=True, help="spec file to write")
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(fn=cmd_compile)
    s = model_cmd("verify", "check that a random permutation from the spec leaves the outputs unchanged")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tolerance", type=float, default=None, help="relative error allowed (default 1e-6 in float64)")
    s.set_defaults(fn=cmd_verify)
    def solver_opts(s: argparse.ArgumentParser) -> None:
        s.add_argument("--solver", default="transfusion",
                       help="transfusion (default), weight_matching, ot, or a registered solver")
        s.add_argument("--heads", default=None, choices=["spectral", "brute", "natural", "lap", "flat"],
                       help="head matching strategy (weight_matching, ot)")
        s.add_argument("--backend", default="auto", help="LAP backend: auto, scipy, lap, torch, pot")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--max-iter", type=int, default=100, help="maximum coordinate-descent sweeps")
        s.add_argument("--spec", default=None, help="spec JSON, needed when models are weights files")
        s.add_argument("--outputs", nargs="*", default=None, metavar="NAME",
                       help="outputs that must stay unchanged (default: all)")
        s.add_argument("--force", action="store_true", help="overwrite an existing output")
        s.add_argument("--json", action="store_true", help="print a JSON summary")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")

    s = sub.add_parser("align", help="find the permutation of A that matches B; write it as JSON",
                       description="Align model A to model B (same architecture) and write the alignment.")
    s.add_argument("model_a", metavar="A")
    s.add_argument("model_b", metavar="B")
    s.add_argument("--out", required=True, help="alignment JSON to write")
    solver_opts(s)
    s.set_defaults(fn=cmd_align)

    s = sub.add_parser("transport", help="move a fine-tune of release A onto release B: B + alpha*pi(A_ft - A)",
                       description="Carry a fine-tuning (task vector) from an old base release onto a new "
                                   "one, with no data and no training.")
    s.add_argument("--base-old", required=True, metavar="A", help="the release the fine-tune was made from")
    s.add_argument("--finetuned", required=True, nargs="+", metavar="A_FT",
                   help="the fine-tuned model(s); several are summed")
    s.add_argument("--base-new", required=True, metavar="B", help="the new release")
    s.add_argument("--out", required=True, help="output folder (transformers) or .safetensors file")
    s.add_argument("--alpha", default="1.0", help="scale: a number, or 'glob=value,...' per parameter")
    s.add_argument("--permutation", default=None, help="alignment JSON from 'permgraph align' (skip solving)")
    solver_opts(s)
    s.set_defaults(fn=cmd_transport)

    s = sub.add_parser("demo", help="re-base a fine-tune onto a new release on real data (sklearn digits)")
    s.add_argument("--quick", action="store_true", help="train less (seconds instead of minutes)")
    s.add_argument("--task", default="rotate90", choices=["rotate90", "invert", "flip", "relabel"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from permgraph.loading import ModelLoadError
    from permgraph.trace import TraceError

    try:
        return args.fn(args)
    except (ModelLoadError, TraceError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"permgraph: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
