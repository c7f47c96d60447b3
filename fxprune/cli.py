"""Command line: ``fxprune inspect | prune | sparsify | export | bench | demo``.

Models: ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` (``hf:minilm``),
``path/to/file.py:factory``, a result folder written by ``fxprune prune --out``, or (only with
``--trust-pickle``) a pickled module.

Every argument and output path is checked before a model is loaded. Errors print one line
(``fxprune prune: error: ...``) and exit 2; ``-v`` shows tracebacks. Results are written whole
or not at all, and a folder holding files fxprune did not write is never replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fxprune
from fxprune._version import __version__
from fxprune.debug import print_graph
from fxprune.errors import FxpruneError
from fxprune.export import available_runtimes, build_engine, compare_latency, to_onnx
from fxprune.export.latency import inputs_by_batch
from fxprune.files import (
    ResultFolder,
    check_output_file,
    check_output_folder,
    temp_dir_beside,
    write_bytes_atomic,
    write_result,
    write_text_atomic,
)
from fxprune.models import load_model, parse_shape
from fxprune.pass_infra import Instrument
from fxprune.recipes import load_recipe, recipe_source, run_recipe
from fxprune.saving import KEPT, kept_bytes, result_files

logger = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn_scale", "fpgm", "random")
BACKENDS = ("torch", "ort", "trt")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: ``fxprune prune: error: ...`` and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: each says what it expects, so argparse reports it before any work ----


def _ratio(text: str) -> float:
    v = _float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(
            f"ratio must be in [0, 1) (the fraction of channels to remove), got {text}"
        )
    return v


def _fraction(text: str) -> float:
    v = _float(text)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1] (the fraction of the original MACs to keep), got {text}"
        )
    return v


def _positive(text: str) -> float:
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return v


def _round_to(text: str) -> int | str:
    if text == "heads":
        return "heads"
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number (8 for fp16, 4 for tf32) or 'heads', got {text!r}"
        )
    return v


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(_count(b) for b in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected batch sizes like 1,8 (positive whole numbers), got {text!r}"
        ) from None


def _backends(text: str) -> tuple[str, ...]:
    names = tuple(b.strip() for b in text.split(","))
    bad = [b for b in names if b not in BACKENDS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)}"
        )
    return names


def _pattern(text: str) -> str:
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise argparse.ArgumentTypeError(f"expected an N:M pattern like 2:4, got {text!r}")
    return text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="torchvision:NAME, timm:NAME, hf:PATH, file.py:factory or a result folder",
    )
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--frontend", default="auto", choices=("auto", "fx", "export"))
    p.add_argument(
        "--original",
        help="for a result folder: the model it was pruned from (needed for file.py:factory)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickled module file; it can run any code it holds",
    )


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ratio", type=_ratio, default=0.5, help="fraction of channels to remove (default 0.5)"
    )
    p.add_argument(
        "--round-to",
        type=_round_to,
        default=8,
        help="keep multiples of N channels (8 fp16, 4 tf32) or 'heads'",
    )
    p.add_argument("--align", default="round", choices=("round", "pad"))
    p.add_argument("--importance", default="l2", choices=IMPORTANCES)
    p.add_argument("--global-ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--target-macs", type=_fraction, help="prune until MACs reach this fraction")
    p.add_argument("--head-mode", choices=("auto", "heads", "head_dim"))
    p.add_argument("--no-verify", action="store_true", help="skip the correctness oracle")


def _out_args(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument("--out", default=default, help=f"{what} (default {default})")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier fxprune result there (never a folder holding other files)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what fxprune does; show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the graph, one row per node, with channel groups")
    _model_args(p)
    p.add_argument("--groups", action="store_true", help="also print the prune groups")

    p = sub.add_parser("prune", help="prune a model, verify it, write the result and a report")
    _model_args(p)
    _prune_args(p)
    _out_args(p, "fxprune-out", "result folder: safetensors weights, plan, reports")

    p = sub.add_parser("sparsify", help="apply 2:4 (N:M) masks with channel permutation")
    _model_args(p)
    p.add_argument("--pattern", type=_pattern, default="2:4")
    p.add_argument("--no-permute", action="store_true")
    p.add_argument(
        "--time-budget", type=_positive, default=1.0, help="seconds of permutation search per layer"
    )
    _out_args(p, "fxprune-sparse", "result folder")

    p = sub.add_parser(
        "export", help="export to ONNX (checked with ONNX Runtime) and a TensorRT engine"
    )
    _model_args(p)
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--engine", help="also build a TensorRT / TensorRT-RTX engine here")
    p.add_argument(
        "--sparse", action="store_true", help="set SPARSE_WEIGHTS when building the engine"
    )
    p.add_argument("--force", action="store_true", help="replace existing files at --out/--engine")

    p = sub.add_parser("bench", help="prune, then time original vs pruned side by side")
    _model_args(p)
    _prune_args(p)
    p.add_argument("--backends", type=_backends, default=("torch", "ort"))
    p.add_argument("--batch-sizes", type=_batch_sizes, default=(1, 8))
    p.add_argument("--rounds", type=_count, default=15)
    _out_args(p, "fxprune-bench", "folder for report.json and speedup.png")

    p = sub.add_parser(
        "run", help="run a recipe: a TOML file of steps (prune, export.onnx, bench, ...)"
    )
    p.add_argument("recipe", help="the recipe file (see examples/*.toml)")
    _out_args(p, "fxprune-recipe", "result folder: every step's files")

    p = sub.add_parser(
        "demo", help="the main job on ResNet-50: prune, verify, export, build, measure"
    )
    p.add_argument(
        "--out",
        default="fxprune-demo",
        help="output folder; an earlier demo result there is replaced, other files never",
    )
    p.add_argument("--model", default="torchvision:resnet50")
    p.add_argument("--rounds", type=_count, default=12)
    return parser


# -- progress, interruption ------------------------------------------------------------------


class _Progress:
    """One spinner line on a terminal (stderr) naming the current step; silent when piped."""

    def __init__(self, enabled: bool) -> None:
        self._status = None
        if enabled:
            from rich.console import Console

            self._status = Console(stderr=True).status("starting ...")

    def __enter__(self) -> _Progress:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Clear the spinner before printing results."""
        if self._status is not None:
            self._status.stop()

    def step(self, text: str) -> None:
        logger.info("%s", text)
        if self._status is not None:
            self._status.update(f"{text} ...")


class _PassProgress(Instrument):
    """Names each pass of the pipeline in the progress line."""

    def __init__(self, progress: _Progress, prefix: str) -> None:
        self.progress, self.prefix = progress, prefix

    def before_pass(self, p, gm, index: int) -> None:
        self.progress.step(f"{self.prefix}: {getattr(p, 'name', type(p).__name__)}")


class _Run:
    """What the running command has written so far: said in one line on Ctrl-C."""

    def __init__(self) -> None:
        self.kept = "nothing was written"


_run = _Run()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # run the same clean-up as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 0
    _run.kept = "nothing was written"
    show_warning = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(
        f"fxprune {args.command}: warning: {message}", file=sys.stderr
    )
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # not the main thread: keep the default handler
        signal.signal(signal.SIGTERM, _on_sigterm)
    progress = _Progress(sys.stderr.isatty() and not args.verbose)
    try:
        with progress:
            return COMMANDS[args.command](args, progress)
    except FxpruneError as exc:
        if args.verbose:
            logger.exception("fxprune %s failed", args.command)
        progress.stop()
        notes = "".join(f" ({n})" for n in getattr(exc, "__notes__", ()))
        print(f"fxprune {args.command}: error: {exc}{notes}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.stop()
        print(f"fxprune {args.command}: interrupted; {_run.kept}.", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()
        print(
            f"fxprune {args.command}: error: {type(exc).__name__}: {first[0] if first else ''} "
            f"(run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.showwarning = show_warning
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def _load(args: argparse.Namespace, progress: _Progress):
    shape = parse_shape(getattr(args, "input_shape", None))
    progress.step(f"loading {args.model}")
    return load_model(
        args.model,
        shape,
        trust_pickle=getattr(args, "trust_pickle", False),
        original=getattr(args, "original", None),
    )


def _model_spec(args: argparse.Namespace) -> str | None:
    """The spec recorded in a saved plan (a result folder records its own original)."""
    if Path(args.model).is_dir():
        return None
    return args.model


@contextlib.contextmanager
def _result_folder(out: str, force: bool, what: str) -> Iterator[ResultFolder]:
    _run.kept = _unchanged(out)
    with ResultFolder(out, force=force) as rf:
        yield rf
    if rf.committed:
        _run.kept = f"the {what} in {out} is complete"


def _write_result(out: str, force: bool, files: dict[str, bytes], what: str) -> Path:
    _run.kept = _unchanged(out)
    written = write_result(out, files, force=force)
    _run.kept = f"the {what} in {out} is complete"
    return written


def _unchanged(out: str) -> str:
    """What an interrupt leaves before the new result is swapped in."""
    earlier = Path(out).is_dir() and any(Path(out).iterdir())
    return "nothing was written" + (
        f"; the earlier result in {out} is unchanged" if earlier else ""
    )


def cmd_inspect(args: argparse.Namespace, progress: _Progress) -> int:
    model, inputs = _load(args, progress)
    progress.step("tracing and analysing channels")
    analysis = fxprune.analyze(model, inputs, frontend=args.frontend)
    progress.stop()
    print_graph(analysis.gm, title=f"{args.model} ({analysis.frontend} frontend)")
    if args.groups:
        print(analysis.table())
    return 0


def _do_prune(args: argparse.Namespace, model, inputs, progress: _Progress):
    progress.step("tracing")
    return fxprune.prune(
        model,
        inputs,
        ratio=args.ratio,
        importance=args.importance,
        round_to=args.round_to,
        align=args.align,
        global_ranking=args.global_ranking,
        target_macs=args.target_macs,
        verify=not args.no_verify,
        frontend=args.frontend,
        head_mode=args.head_mode,
        instruments=[_PassProgress(progress, "pruning")],
    )


def cmd_prune(args: argparse.Namespace, progress: _Progress) -> int:
    check_output_folder(args.out, args.force)
    model, inputs = _load(args, progress)
    t0 = time.perf_counter()
    res = _do_prune(args, model, inputs, progress)
    elapsed = time.perf_counter() - t0
    progress.step(f"writing {args.out}")
    files = result_files(res, model_spec=_model_spec(args))
    files["report.txt"] = (str(res.report) + "\n").encode()
    files["report.json"] = (res.report.to_json() + "\n").encode()
    out = _write_result(args.out, args.force, files, "new result")
    progress.stop()
    print(res.report)
    print(
        f"\npruned in {elapsed:.1f} s; wrote {out}/ (safetensors weights + plan; load with "
        f"fxprune.load({str(args.out)!r}, model=original) or `fxprune export {args.out}`), "
        f"report.txt, report.json"
    )
    return 0


def cmd_sparsify(args: argparse.Namespace, progress: _Progress) -> int:
    check_output_folder(args.out, args.force)
    model, inputs = _load(args, progress)
    progress.step(f"sparsifying ({args.pattern}, permutation search)")
    res = fxprune.sparsify(
        model,
        inputs,
        pattern=args.pattern,
        permute=not args.no_permute,
        time_budget=args.time_budget,
    )
    progress.step(f"writing {args.out}")
    files = result_files(res, model_spec=_model_spec(args), example_inputs=inputs)
    files["report.txt"] = (str(res.report) + "\n").encode()
    out = _write_result(args.out, args.force, files, "new result")
    progress.stop()
    print(res.report)
    print(f"\nwrote {out}/ (safetensors weights + plan) and report.txt")
    return 0


def cmd_export(args: argparse.Namespace, progress: _Progress) -> int:
    check_output_file(args.out, args.force, "--out", ".onnx")
    if args.engine:
        check_output_file(args.engine, args.force, "--engine", ".engine")
    model, inputs = _load(args, progress)
    progress.step(f"exporting to {args.out} and checking it with ONNX Runtime")
    res = to_onnx(model, inputs, args.out, fp16=args.fp16)
    _run.kept = f"{args.out} is complete"
    print(
        f"wrote {res.path} (opset {res.opset}); ONNX Runtime vs PyTorch max abs error "
        f"{res.max_abs_err:.2e}, rel {res.max_rel_err:.2e}"
    )
    if args.engine:
        progress.step(f"building the engine {args.engine}")
        eng = build_engine(args.out, args.engine, sparse=args.sparse)
        _run.kept = f"{args.out} and {args.engine} are complete"
        print(eng)
    return 0


def cmd_bench(args: argparse.Namespace, progress: _Progress) -> int:
    check_output_folder(args.out, args.force)
    model, inputs = _load(args, progress)
    res = _do_prune(args, model, inputs, progress)
    print(res.report)
    with (
        _result_folder(args.out, args.force, "benchmark result") as rf,
        temp_dir_beside(rf.target) as work,
    ):
        progress.step(f"timing original vs pruned ({', '.join(args.backends)})")
        report = compare_latency(
            {"original": model, "fxprune": res.module},
            inputs_by_batch(inputs),
            backends=args.backends,
            batch_sizes=args.batch_sizes,
            rounds=args.rounds,
            workdir=work,
        )
        report.save_json(rf.path / "report.json")
        report.plot(rf.path / "speedup.png")
        out = rf.commit()
    progress.stop()
    print(report.table())
    print(f"wrote {out}/report.json and {out}/speedup.png")
    return 0


def cmd_demo(args: argparse.Namespace, progress: _Progress) -> int:
    """Prune ResNet-50 (random init) 50% with alignment, verify, export, build, measure."""
    check_output_folder(args.out, force=True)
    with _result_folder(args.out, True, "demo result") as rf, temp_dir_beside(rf.target) as work:
        progress.stop()  # the demo prints its own steps
        summary_text = _demo_steps(args, rf.path, work)
        out = rf.commit()
    print(summary_text)
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir() if p.name[0] != '.'))}")
    return 0


def _demo_steps(args: argparse.Namespace, out: Path, work: Path) -> str:
    model, inputs = load_model(args.model)
    print(f"[1/5] pruning {args.model} (random init) at ratio 0.5, round_to=8 ...", flush=True)
    t0 = time.perf_counter()
    res = fxprune.prune(model, inputs, ratio=0.5, round_to=8, verify=True)
    print(f"      done in {time.perf_counter() - t0:.1f} s; {res.report.verified}")
    print("[2/5] exporting to ONNX and checking with ONNX Runtime ...", flush=True)
    onnx_orig = to_onnx(model, inputs, out / "original.onnx")
    onnx_pruned = to_onnx(res.module, inputs, out / "pruned.onnx")
    print(f"      pruned.onnx: max abs error vs PyTorch {onnx_pruned.max_abs_err:.2e}")
    print("[3/5] building a TensorRT engine ...", flush=True)
    engine_note = "no TensorRT runtime installed"
    if available_runtimes():
        try:
            eng = build_engine(out / "pruned.onnx", out / "pruned.engine", sparse=False)
            engine_note = (
                f"{eng.runtime} engine pruned.engine built in {eng.build_seconds:.1f} s"
                + ("" if eng.runnable else f" (not runnable here: {eng.runnable_reason})")
            )
        except FxpruneError as exc:
            engine_note = f"engine build failed: {exc}"
    print(f"      {engine_note}")
    print(
        f"[4/5] timing original vs pruned in ONNX Runtime (CPU), interleaved, {args.rounds} rounds ...",
        flush=True,
    )
    bench = compare_latency(
        {"original": model, "pruned": res.module},
        inputs_by_batch(inputs),
        backends=("ort",),
        batch_sizes=(1,),
        rounds=args.rounds,
        workdir=work,
    )
    m = bench.find("ort", 1, "pruned")
    print("[5/5] results\n")
    print(res.report)
    print()
    print(bench.table())
    summary = {
        "model": args.model,
        "macs_ratio": res.report.macs_ratio,
        "params_ratio": res.report.params_ratio,
        "ort_cpu_speedup_batch1": m.speedup,
        "speedup_iqr": [m.speedup_q1, m.speedup_q3],
        "verified": res.report.verified,
        "engine": engine_note,
        "onnx": [Path(onnx_orig.path).name, Path(onnx_pruned.path).name],
    }
    write_text_atomic(out / "report.txt", str(res.report) + "\n\n" + bench.table() + "\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    bench.save_json(out / "bench.json")
    bench.plot(out / "speedup.png")
    write_bytes_atomic(out / KEPT, kept_bytes(res.kept))
    return (
        f"\nMACs {res.report.macs_ratio:.2f}x fewer; ONNX Runtime CPU batch 1: "
        f"{m.speedup:.2f}x faster (median of {args.rounds} interleaved rounds, IQR "
        f"{m.speedup_q1:.2f}-{m.speedup_q3:.2f})."
    )


def cmd_run(args: argparse.Namespace, progress: _Progress) -> int:
    recipe = load_recipe(args.recipe)  # every mistake reported before anything is loaded
    check_output_folder(args.out, args.force)
    progress.stop()  # each step prints its own line
    _run.kept = _unchanged(args.out)
    res = run_recipe(recipe_source(recipe), args.out, force=args.force, echo=print)
    _run.kept = f"the recipe result in {args.out} is complete"
    print(
        f"wrote {res.out}/: "
        + ", ".join(sorted(p.name for p in res.out.iterdir() if p.name[0] != "."))
    )
    return 0


COMMANDS = {
    "inspect": cmd_inspect,
    "prune": cmd_prune,
    "sparsify": cmd_sparsify,
    "export": cmd_export,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "run": cmd_run,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
