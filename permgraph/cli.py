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


def cmd_demo(args: argparse.Namespace) -> int:
    from permgraph.demo import run_demo

    return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="permgraph",
        description="Compile a PyTorch model into its permutation spec; explain and verify it.",
        epilog="MODEL is a transformers model folder (config.json + weights), a factory "
               "'package.module:function' returning a model or (model, example_inputs), "
               "or (for explain) a spec .json written by 'permgraph compile'. "
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
    s = sub.add_parser("demo", help="run the demo: compile, explain and verify a zoo of architectures")
    s.add_argument("--quick", action="store_true", help="fewer architectures")
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
