"""The ``permgraph`` command line.

Exit codes: 0 ok, 1 verification failed, 2 bad input (nothing written), 3 internal
error (a bug: please report it), 130/143 interrupted by SIGINT/SIGTERM (nothing written).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Iterator

from permgraph.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_VERIFY_FAILED, InputError, PermgraphError
from permgraph.outputs import OutputTarget
from permgraph.solvers import HEAD_STRATEGIES, get_solver

JSON_OUT = {".json": "file"}
MODEL_OUT = {".safetensors": "file", "": "folder"}
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


# -- commands -----------------------------------------------------------------------

def cmd_explain(args: argparse.Namespace) -> int:
    _, _, spec = _spec_for(args.model, args.outputs)
    print(spec.to_json() if args.json else spec.explain())
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    with _target(args, args.out, JSON_OUT, [args.model]) as target:
        _, _, spec = _spec_for(args.model, args.outputs)
        target.tmp.write_text(spec.to_json())
        out = target.commit()
    if not args.quiet:
        print(f"wrote {out}: {len(spec.groups)} groups, {spec.covered_fraction():.1%} of parameter entries "
              f"permuted ({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    import permgraph as pg

    model, inputs, spec = _spec_for(args.model, args.outputs)
    if model is None:
        raise InputError("verify needs a model (folder or factory), not a spec file")
    rep = pg.verify(model, spec, inputs, seed=args.seed, tolerance=args.tolerance, promote_float32=args.exact)
    if args.json:
        print(json.dumps({"ok": rep.ok, "max_rel_error": rep.max_rel_error, "max_abs_error": rep.max_abs_error,
                          "tolerance": rep.tolerance, "dtype": rep.dtype, "seed": rep.seed, "groups": rep.groups}))
    else:
        print(rep)
    return EXIT_OK if rep.ok else EXIT_VERIFY_FAILED


def cmd_align(args: argparse.Namespace) -> int:
    from permgraph.stream import load_for_align

    _check_solver_args(args)
    with _target(args, args.out, JSON_OUT, [args.model_a, args.model_b, args.spec]) as target:
        a, b, spec = load_for_align(args.model_a, args.model_b, lambda src: _spec_from(args, src),
                                    needs_module=get_solver(args.solver).needs_data)
        al = _align(args, a, b, spec)
        target.tmp.write_text(al.to_json())
        out = target.commit()
    _report(args, al, {"out": str(out)})
    return EXIT_OK


def cmd_transport(args: argparse.Namespace) -> int:
    import permgraph as pg
    from permgraph import stream
    from permgraph.loading import load_source, write_state
    from permgraph.transport import check_alpha, check_transport_inputs, parse_alpha

    t0 = time.perf_counter()
    _check_solver_args(args)
    alpha = parse_alpha(args.alpha)
    if not isinstance(alpha, dict):
        alpha = check_alpha(alpha, [])
    if args.heads == "flat" and not args.allow_non_preserving and not args.permutation:
        raise InputError("--heads flat is not function-preserving (an ablation): pass --allow-non-preserving "
                         "to transport with it anyway")
    if bool(args.finetuned) == bool(args.adapter):
        raise InputError("pass either --finetuned A_FT (full fine-tunes) or --adapter DIR (PEFT LoRA adapters)")
    if args.adapter:
        return _transport_adapters(args, alpha, t0)
    if args.merge or len(args.out) != 1:
        raise InputError("--merge and several --out paths are for --adapter; --finetuned writes one --out")
    inputs = [args.base_old, *args.finetuned, args.base_new, args.spec, args.permutation]
    with _target(args, args.out[0], MODEL_OUT, inputs) as target:
        al = _read_alignment(args)
        if stream.streamable([args.base_old, *args.finetuned, args.base_new]):
            done = _transport_streaming(args, target, al, alpha, t0)
            if done is not None:
                return done
        a, b = load_source(args.base_old), load_source(args.base_new)
        fts = [load_source(f) for f in args.finetuned]
        alpha = check_alpha(alpha, list(a.state))
        if al is None:
            spec = _spec_from(args, a if a.module is not None else b)
            check_transport_inputs(spec, a.state, [f.state for f in fts], b.state)  # fail before solving
            al = _align(args, a, b, spec)
        ft_inputs = [f.module if f.module is not None else f.state for f in fts]
        result = pg.transport(a.state, ft_inputs if len(fts) > 1 else ft_inputs[0], b.state, al, alpha=alpha,
                              allow_non_preserving=args.allow_non_preserving)
        write_state(result, target.tmp, target.kind, b, fts[0])
        out = target.commit()
    _report(args, al, {"out": str(out), "tensors": len(result), "alpha": args.alpha, "streamed": False,
                       "seconds": round(time.perf_counter() - t0, 2)})
    return EXIT_OK


def _transport_streaming(args: argparse.Namespace, target: OutputTarget, al, alpha, t0: float) -> int | None:
    """``transport --finetuned`` on safetensors inputs, tensor by tensor (``permgraph.stream``).

    Without ``--permutation``, the spec's parameters of A and B are read for ``pg.align``
    (``stream.load_for_align``) and dropped before streaming. None when the inputs need the
    in-memory path (a fine-tune with a new head).
    """
    import gc

    from permgraph import stream

    timings = {}
    t = time.perf_counter()
    if al is None:
        a, b, spec = stream.load_for_align(args.base_old, args.base_new, lambda src: _spec_from(args, src),
                                           needs_module=get_solver(args.solver).needs_data)
        timings["load_for_align"] = time.perf_counter() - t
    else:
        spec = al.spec
    try:
        plan = stream.prepare(args.base_old, args.finetuned, args.base_new, spec, alpha)  # fail before solving
    except stream.NotStreamable as e:
        if not args.quiet:
            print(f"permgraph: note: {e}", file=sys.stderr)
        return None
    with contextlib.closing(plan):
        if al is None:
            t = time.perf_counter()
            al = _align(args, a, b, spec)
            timings["align"] = time.perf_counter() - t
            del a, b
            gc.collect()
        if not al.carries_task_vectors() and not args.allow_non_preserving:
            raise InputError("this alignment is not function-preserving (flat heads or soft plans): pi(A) is not "
                             "equivalent to A. Pass --allow-non-preserving to use it anyway")
        rep = stream.run(plan, al, target.tmp, target.kind, max_shard_bytes=args.max_shard_size,
                         progress=not args.quiet and not args.json)
    out = target.commit()
    timings.update(rep.seconds)
    if not args.quiet and not args.json:
        print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
              + f"; {rep.tensors} tensors, {rep.bytes / 1e9:.2f} GB in {rep.shards} shard(s); "
              f"peak memory {rep.peak_rss_gb:.2f} GB")
    _report(args, al, {"out": str(out), "tensors": rep.tensors, "alpha": args.alpha, "streamed": True,
                       **rep.to_dict(), "stream_seconds": {k: round(v, 2) for k, v in timings.items()},
                       "seconds": round(time.perf_counter() - t0, 2)})
    return EXIT_OK


def _transport_adapters(args: argparse.Namespace, alpha, t0: float) -> int:
    """``transport --adapter``: LoRA adapters of A carried to B as adapters (or merged with --merge)."""
    import permgraph as pg
    from permgraph.adapters import read_adapter, write_result
    from permgraph.loading import load_source
    from permgraph.transport import check_alpha

    if len(args.out) != len(args.adapter):
        raise InputError(f"{len(args.adapter)} adapters need {len(args.adapter)} --out paths, got {len(args.out)}")
    kinds = {".safetensors": "file"} if args.merge else {"": "folder"}
    inputs = [args.base_old, *args.adapter, args.base_new, args.spec, args.permutation]
    with contextlib.ExitStack() as stack:
        targets = [stack.enter_context(_target(args, o, kinds, inputs)) for o in args.out]
        al = _read_alignment(args)
        adapters = [read_adapter(p) for p in args.adapter]
        a, b = load_source(args.base_old), load_source(args.base_new)
        alpha = check_alpha(alpha, list(a.state))
        if al is None:
            al = _align(args, a, b, _spec_from(args, a if a.module is not None else b))
        base_new = str(Path(args.base_new).resolve()) if Path(args.base_new).exists() else args.base_new
        results = pg.transport_adapter(al, adapters, base_new=base_new, merge=args.merge, alpha=alpha,
                                       base_a=a.module or a.state, base_b=b.module or b.state,
                                       allow_non_preserving=args.allow_non_preserving)
        outs = []
        for target, res in zip(targets, results):
            write_result(res, target.tmp)
            outs.append(str(target.commit()))
    kept = sum(len(r.kept) for r in results)
    _report(args, al, {"out": ", ".join(outs), "adapters": len(results), "merged": args.merge,
                       "kept_unchanged": kept, "seconds": round(time.perf_counter() - t0, 2)})
    return EXIT_OK


def _read_alignment(args: argparse.Namespace):
    """The alignment of --permutation, validated, or None."""
    from permgraph.alignment import Alignment
    from permgraph.loading import read_text

    if not args.permutation:
        return None
    al = Alignment.from_json(read_text(args.permutation, "alignment file"))
    if not al.carries_task_vectors() and not args.allow_non_preserving:
        raise InputError(f"the alignment {args.permutation} is not function-preserving: pass "
                         "--allow-non-preserving to transport with it anyway")
    return al


# -- shared steps ---------------------------------------------------------------------

def _spec_for(ref: str, outputs: list[str] | None):
    import permgraph as pg
    from permgraph.loading import load_model, load_spec_file

    if ref.endswith(".json") and Path(ref).is_file():
        return None, None, load_spec_file(ref)
    model, inputs = load_model(ref)
    return model, inputs, pg.compile(model, inputs, outputs=outputs)


def _spec_from(args: argparse.Namespace, src):
    """The spec: --spec file, or compiled from the source's module."""
    import permgraph as pg
    from permgraph.loading import load_spec_file

    if getattr(args, "spec", None):
        return load_spec_file(args.spec)
    if src.module is None:
        raise InputError(f"{src.ref} is a weights file: pass --spec SPEC.json (from 'permgraph compile')")
    return pg.compile(src.module, src.inputs, outputs=getattr(args, "outputs", None))


def _align(args: argparse.Namespace, a, b, spec):
    import permgraph as pg

    return pg.align(a.state, b.state, spec, solver=args.solver, backend=args.backend, seed=args.seed,
                    max_iter=args.max_iter, progress=not args.quiet and not args.json, residual=args.residual,
                    **_solver_opts(args))


def _solver_opts(args: argparse.Namespace) -> dict:
    opts = {"heads": args.heads} if args.heads else {}
    opts |= {"workers": args.workers} if args.workers is not None else {}
    return opts | ({"device": args.device} if args.device else {})


def _check_solver_args(args: argparse.Namespace) -> None:
    """The solver and its options, validated by the solver's own options type before any work."""
    get_solver(args.solver).make_options(backend=args.backend, seed=args.seed, max_iter=args.max_iter,
                                         **_solver_opts(args))
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")


@contextlib.contextmanager
def _target(args: argparse.Namespace, out: str, kinds, inputs) -> Iterator[OutputTarget]:
    """The checked output, reserved before any work (see ``permgraph.outputs``); removed unless
    committed. SIGINT/SIGTERM are held while the temporary path is made, so a signal cannot land
    between its creation and the cleanup that owns it."""
    refs = [r for r in inputs if r and not (":" in r and not Path(r).exists())]  # factories are no paths
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        target = OutputTarget(out, kinds=kinds, inputs=refs, force=args.force,
                              replace_foreign=getattr(args, "replace_foreign", False), command=args.command)
    except BaseException:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    try:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a held signal is delivered here, inside the try
        yield target
    finally:
        target.discard()


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


# -- the parser -----------------------------------------------------------------------

EPILOG = """\
MODEL is a transformers model folder (config.json + weights), a factory
'package.module:function' returning a model or (model, example_inputs), or (for
explain) a spec .json written by 'permgraph compile'. A factory RUNS that Python
code: permgraph imports the module (looked up in the current directory, then on
PYTHONPATH and in installed packages) and calls the function. A and B may also be
weights files (.safetensors, .bin) with --spec.

Outputs are written to a temporary path next to the output (.NAME.permgraph-tmp-PID)
and moved into place at the end; an interrupted run leaves nothing. permgraph refuses
an output that equals, contains or lies inside an input. --force replaces only an
earlier permgraph output (a folder with permgraph_output.json and nothing else, or a
file permgraph wrote); --replace-foreign replaces anything else.

Exit codes: 0 ok, 1 verification failed, 2 bad input (nothing written),
3 internal error (a bug in permgraph: please report it), 130/143 interrupted."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="permgraph", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a PyTorch model into its permutation spec; explain, verify, align, transport.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=description or help_, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        s = command(name, help_)
        s.add_argument("model", metavar="MODEL")
        s.add_argument("--outputs", nargs="*", default=None, metavar="NAME",
                       help="outputs that must stay unchanged (default: all); others may come out permuted")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        s.add_argument("-q", "--quiet", action="store_true", help="print only errors and warnings")
        return s

    def output_opts(s: argparse.ArgumentParser) -> None:
        s.add_argument("--force", action="store_true", help="replace an earlier permgraph output at --out")
        s.add_argument("--replace-foreign", action="store_true",
                       help="with --force, also replace a file or folder that permgraph did not write")

    model_cmd("explain", "show the permutation groups, their members, and what is fixed and why"
              ).set_defaults(fn=cmd_explain)
    s = model_cmd("compile", "write the permutation spec as JSON")
    s.add_argument("--out", required=True, help="spec file to write (.json)")
    output_opts(s)
    s.set_defaults(fn=cmd_compile)
    s = model_cmd("verify", "check that a random permutation from the spec leaves the outputs unchanged")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tolerance", type=float, default=None,
                   help="relative error allowed (default 1e-6 in float64, 1e-10 with --exact)")
    s.add_argument("--exact", action="store_true",
                   help="run the exported graph with its casts to float32 made float64 (norms computed in "
                        "float32 then no longer limit the check)")
    s.set_defaults(fn=cmd_verify)

    def solver_opts(s: argparse.ArgumentParser) -> None:
        s.add_argument("--solver", default="weight_matching",
                       help="weight_matching (default), transfusion, ot, a preset or a registered solver")
        s.add_argument("--heads", default=None, choices=list(HEAD_STRATEGIES),
                       help="head matching strategy (weight_matching, ot); 'flat' is not function-preserving")
        s.add_argument("--backend", default="auto", help="LAP backend: auto, scipy, lap, torch, pot")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--max-iter", type=int, default=100, help="maximum coordinate-descent sweeps")
        s.add_argument("--residual", default="tied", choices=["tied", "untied"],
                       help="untied: every residual addend gets its own permutation (TransFusion's Step 3); "
                            "for task vectors only: pi(A) is then not function-preserving")
        s.add_argument("--workers", type=int, default=None,
                       help="CPU threads for the assignments of independent groups (default: one per core)")
        s.add_argument("--device", default=None,
                       help="where alignment runs (cpu, cuda, cuda:1); default: where the weights are (cpu)")
        s.add_argument("--spec", default=None, help="spec JSON, needed when models are weights files")
        s.add_argument("--outputs", nargs="*", default=None, metavar="NAME",
                       help="outputs that must stay unchanged (default: all)")
        output_opts(s)
        s.add_argument("--json", action="store_true", help="print a JSON summary")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress or summary; errors and warnings only")

    s = command("align", "find the permutation of A that matches B; write it as JSON",
                "Align model A to model B (same architecture) and write the alignment.")
    s.add_argument("model_a", metavar="A")
    s.add_argument("model_b", metavar="B")
    s.add_argument("--out", required=True, help="alignment JSON to write (.json)")
    solver_opts(s)
    s.set_defaults(fn=cmd_align)

    s = command("transport", "move a fine-tune of release A onto release B: B + alpha*pi(A_ft - A)",
                "Carry a fine-tuning (task vector) from an old base release onto a new one, with no data "
                "and no training.")
    s.add_argument("--base-old", required=True, metavar="A", help="the release the fine-tune was made from")
    s.add_argument("--finetuned", nargs="+", metavar="A_FT", default=[],
                   help="the fine-tuned model(s); several are summed")
    s.add_argument("--adapter", nargs="+", metavar="DIR", default=[],
                   help="PEFT LoRA adapter folder(s) trained on A, carried to B as adapters (one --out each); "
                        "instead of --finetuned")
    s.add_argument("--merge", action="store_true",
                   help="with --adapter: write B + alpha*pi(dW) as a full .safetensors state instead")
    s.add_argument("--base-new", required=True, metavar="B", help="the new release")
    s.add_argument("--out", required=True, nargs="+",
                   help="output: a folder (transformers; no suffix, or end it with '/') or a .safetensors file; "
                        "with --adapter, one adapter folder (or .safetensors with --merge) per adapter")
    s.add_argument("--alpha", default="1.0",
                   help="scale: a finite number, or 'glob=value,...' per parameter (each glob must match)")
    s.add_argument("--permutation", default=None, help="alignment JSON from 'permgraph align' (skip solving)")
    s.add_argument("--allow-non-preserving", action="store_true",
                   help="accept an alignment that is not function-preserving (flat heads, soft OT plans)")
    s.add_argument("--max-shard-size", default="50GB", type=_shard_size,
                   help="folder outputs: largest safetensors shard, e.g. 5GB, 500MB (default 50GB, as "
                        "transformers' save_pretrained); more than one shard gets model.safetensors.index.json")
    solver_opts(s)
    s.set_defaults(fn=cmd_transport)
    return p


def _shard_size(text: str) -> int:
    from permgraph.shards import parse_size

    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- running a command: errors, signals, quiet libraries ---------------------------------

class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup code runs."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _terminate_raises(), _quiet_libraries(getattr(args, "quiet", False)), _warnings_to_stderr():
        try:
            return args.fn(args)
        except PermgraphError as e:
            return _fail(f"error: {e}", e.exit_code)
        except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            return _fail(f"error: {e.strerror or e}: {e.filename or ''}", EXIT_BAD_INPUT)
        except OSError as e:  # disk full, I/O error: the output was not written
            return _fail(f"error: {e}; nothing was written", EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            return _fail("interrupted; nothing was written", EXIT_SIGINT)
        except _Terminated:
            return _fail("terminated; nothing was written", EXIT_SIGTERM)
        except Exception as e:  # noqa: BLE001 - a bug: say so, with the traceback for the report
            _close_bars()
            traceback.print_exc()
            return _fail(f"internal error: {type(e).__name__}: {e}\nThis is a bug in permgraph; please report it "
                         "with the command and the traceback above.", EXIT_INTERNAL)


def _fail(message: str, code: int) -> int:
    _close_bars()
    print(f"permgraph: {message}", file=sys.stderr)
    return code


def _close_bars() -> None:
    """Close open progress bars so that a message never shares a line with one."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # cleanup runs next: a second signal must not cut it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """With -q, no progress bars or info logs from transformers and huggingface_hub either."""
    if not quiet:
        yield
        return
    import os

    saved = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ.update(TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    loaded = [m for m in ("transformers", "huggingface_hub") if m in sys.modules]  # else the env vars do it
    _hf_progress(loaded, enable=False)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _hf_progress(loaded, enable=True)


def _hf_progress(loaded: list[str], enable: bool) -> None:
    if "huggingface_hub" in loaded:
        from huggingface_hub import utils as hub_utils

        (hub_utils.enable_progress_bars if enable else hub_utils.disable_progress_bars)()
    if "transformers" in loaded:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if enable else hf_logging.disable_progress_bar)()
        if not enable:
            hf_logging.set_verbosity_error()


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """permgraph's warnings as one 'permgraph: warning: ...' line each."""
    from permgraph.errors import PermgraphWarning

    with warnings.catch_warnings():
        old = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, PermgraphWarning):
                return old(message, category, filename, lineno, file, line)
            _close_bars()
            print(f"permgraph: warning: {message}", file=sys.stderr)

        warnings.simplefilter("always", PermgraphWarning)
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    raise SystemExit(main())
