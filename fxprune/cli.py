"""Command line: ``fxprune inspect | prune | sparsify | export | bench | demo``.

Models: ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` (``hf:minilm``),
``path/to/file.py:factory`` or a saved module file.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fxprune._version import __version__
from fxprune.errors import FxpruneError

logger = logging.getLogger(__name__)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", help="torchvision:NAME, timm:NAME, hf:PATH, file.py:factory or a saved module"
    )
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
    p.add_argument("--frontend", default="auto", choices=("auto", "fx", "export"))


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of channels to remove (default 0.5)"
    )
    p.add_argument(
        "--round-to", default="8", help="keep multiples of N channels (8 fp16, 4 tf32) or 'heads'"
    )
    p.add_argument("--align", default="round", choices=("round", "pad"))
    p.add_argument("--importance", default="l2", choices=("l1", "l2", "bn_scale", "fpgm", "random"))
    p.add_argument("--global-ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--target-macs", type=float, help="prune until MACs reach this fraction")
    p.add_argument("--head-mode", choices=("auto", "heads", "head_dim"))
    p.add_argument("--no-verify", action="store_true", help="skip the correctness oracle")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what fxprune does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the graph, one row per node, with channel groups")
    _model_args(p)
    p.add_argument("--groups", action="store_true", help="also print the prune groups")

    p = sub.add_parser("prune", help="prune a model, verify it, write the module and a report")
    _model_args(p)
    _prune_args(p)
    p.add_argument("--out", default="fxprune-out", help="output folder (default fxprune-out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")

    p = sub.add_parser("sparsify", help="apply 2:4 (N:M) masks with channel permutation")
    _model_args(p)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--no-permute", action="store_true")
    p.add_argument(
        "--time-budget", type=float, default=1.0, help="seconds of permutation search per layer"
    )
    p.add_argument("--out", default="fxprune-sparse")
    p.add_argument("--force", action="store_true")

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

    p = sub.add_parser("bench", help="prune, then time original vs pruned side by side")
    _model_args(p)
    _prune_args(p)
    p.add_argument("--backends", default="torch,ort")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default="fxprune-bench", help="folder for report.json and speedup.png")

    p = sub.add_parser(
        "demo", help="the main job on ResNet-50: prune, verify, export, build, measure"
    )
    p.add_argument("--out", default="fxprune-demo", help="output folder (replaced on each run)")
    p.add_argument("--model", default="torchvision:resnet50")
    p.add_argument("--rounds", type=int, default=12)
    return parser


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
    try:
        return {
            "inspect": cmd_inspect,
            "prune": cmd_prune,
            "sparsify": cmd_sparsify,
            "export": cmd_export,
            "bench": cmd_bench,
            "demo": cmd_demo,
        }[args.command](args)
    except FxpruneError as exc:
        print(f"fxprune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace):
    from fxprune.models import load_model, parse_shape

    return load_model(args.model, parse_shape(getattr(args, "input_shape", None)))


def _round_to(text: str) -> int | str:
    if text == "heads":
        return "heads"
    try:
        return int(text)
    except ValueError:
        raise FxpruneError(f"--round-to must be a number or 'heads', got {text!r}.") from None


def _fresh_dir(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FxpruneError(f"{out} exists and is not empty; pass --force to overwrite it.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.debug import print_graph

    model, inputs = _load(args)
    analysis = fxprune.analyze(model, inputs, frontend=args.frontend)
    print_graph(analysis.gm, title=f"{args.model} ({analysis.frontend} frontend)")
    if args.groups:
        print(analysis.table())
    return 0


def _do_prune(args: argparse.Namespace, model, inputs):
    import fxprune

    return fxprune.prune(
        model,
        inputs,
        ratio=args.ratio,
        importance=args.importance,
        round_to=_round_to(args.round_to),
        align=args.align,
        global_ranking=args.global_ranking,
        target_macs=args.target_macs,
        verify=not args.no_verify,
        frontend=args.frontend,
        head_mode=args.head_mode,
    )


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import fxprune
    from fxprune.files import write_text_atomic

    model, inputs = _load(args)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FxpruneError(f"{out} exists and is not empty; pass --force to overwrite it.")
    t0 = time.perf_counter()
    res = _do_prune(args, model, inputs)
    elapsed = time.perf_counter() - t0
    out = _fresh_dir(args.out, True)
    fxprune.save(res.module, out / "model.pt")
    torch.save(res.kept, out / "kept.pt")
    write_text_atomic(out / "report.txt", str(res.report) + "\n")
    write_text_atomic(out / "report.json", res.report.to_json() + "\n")
    print(res.report)
    print(
        f"\npruned in {elapsed:.1f} s; wrote {out}/model.pt (load with fxprune.load), kept.pt, "
        f"report.txt, report.json"
    )
    return 0


def cmd_sparsify(args: argparse.Namespace) -> int:
    import fxprune
    from fxprune.files import write_text_atomic

    if not hasattr(fxprune, "sparsify"):
        raise FxpruneError("sparsify is not available in this build.")
    model, inputs = _load(args)
    out = _fresh_dir(args.out, args.force)
    res = fxprune.sparsify(
        model,
        inputs,
        pattern=args.pattern,
        permute=not args.no_permute,
        time_budget=args.time_budget,
    )
    fxprune.save(res.module, out / "model.pt")
    write_text_atomic(out / "report.txt", str(res.report) + "\n")
    print(res.report)
    print(f"\nwrote {out}/model.pt and report.txt")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fxprune.export import build_engine, to_onnx

    model, inputs = _load(args)
    res = to_onnx(model, inputs, args.out, fp16=args.fp16)
    print(
        f"wrote {res.path} (opset {res.opset}); ONNX Runtime vs PyTorch max abs error "
        f"{res.max_abs_err:.2e}, rel {res.max_rel_err:.2e}"
    )
    if args.engine:
        eng = build_engine(args.out, args.engine, sparse=args.sparse)
        print(eng)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fxprune.bench import compare_latency

    model, inputs = _load(args)
    res = _do_prune(args, model, inputs)
    print(res.report)
    out = Path(args.out)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    report = compare_latency(
        {"original": model, "fxprune": res.module},
        _batcher(inputs),
        backends=tuple(args.backends.split(",")),
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        rounds=args.rounds,
        workdir=out / "onnx",
    )
    print(report.table())
    report.save_json(out / "report.json")
    report.plot(out / "speedup.png")
    print(f"wrote {out}/report.json and {out}/speedup.png")
    return 0


def _batcher(inputs: Any):
    """Example inputs at another batch size (batch is dim 0 of every tensor input)."""
    import torch

    def at(batch: int) -> Any:
        def grow(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                return t[:1].expand(batch, *t.shape[1:]).clone() if t.shape[0] == 1 else t
            return t

        if isinstance(inputs, dict):
            return {k: grow(v) for k, v in inputs.items()}
        if isinstance(inputs, (tuple, list)):
            return tuple(grow(v) for v in inputs)
        return grow(inputs)

    return at


def cmd_demo(args: argparse.Namespace) -> int:
    """Prune ResNet-50 (random init) 50% with alignment, verify, export, build, measure."""
    import torch

    import fxprune
    from fxprune.bench import compare_latency
    from fxprune.export import available_runtimes, build_engine, to_onnx
    from fxprune.files import write_text_atomic
    from fxprune.models import load_model

    out = _fresh_dir(args.out, True)
    model, inputs = load_model(args.model)
    print(f"[1/5] pruning {args.model} (random init) at ratio 0.5, round_to=8 ...", flush=True)
    t0 = time.perf_counter()
    res = fxprune.prune(model, inputs, ratio=0.5, round_to=8, verify=True)
    print(f"      done in {time.perf_counter() - t0:.1f} s; {res.report.verified}")
    print("[2/5] exporting to ONNX and checking with ONNX Runtime ...", flush=True)
    onnx_orig = to_onnx(model, inputs, out / "original.onnx")
    onnx_pruned = to_onnx(res.module, inputs, out / "pruned.onnx")
    print(f"      {onnx_pruned.path}: max abs error vs PyTorch {onnx_pruned.max_abs_err:.2e}")
    print("[3/5] building a TensorRT engine ...", flush=True)
    engine_note = "no TensorRT runtime installed"
    if available_runtimes():
        try:
            eng = build_engine(out / "pruned.onnx", out / "pruned.engine", sparse=False)
            engine_note = (
                f"{eng.runtime} engine {eng.engine_path} built in {eng.build_seconds:.1f} s"
                + ("" if eng.runnable else f" (not runnable here: {eng.runnable_reason})")
            )
        except FxpruneError as exc:
            engine_note = f"engine build failed: {exc}"
    print(f"      {engine_note}")
    print(
        f"[4/5] timing original vs pruned in ONNX Runtime (CPU), interleaved, {args.rounds} rounds ...",
        flush=True,
    )
    (out / "bench").mkdir(exist_ok=True)
    bench = compare_latency(
        {"original": model, "pruned": res.module},
        _batcher(inputs),
        backends=("ort",),
        batch_sizes=(1,),
        rounds=args.rounds,
        workdir=out / "bench",
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
        "onnx": [str(onnx_orig.path), str(onnx_pruned.path)],
    }
    write_text_atomic(out / "report.txt", str(res.report) + "\n\n" + bench.table() + "\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    bench.save_json(out / "bench.json")
    bench.plot(out / "speedup.png")
    torch.save(res.kept, out / "kept.pt")
    print(
        f"\nMACs {res.report.macs_ratio:.2f}x fewer; ONNX Runtime CPU batch 1: "
        f"{m.speedup:.2f}x faster (median of {args.rounds} interleaved rounds, IQR "
        f"{m.speedup_q1:.2f}-{m.speedup_q3:.2f})."
    )
    print(
        f"wrote {out}/: original.onnx, pruned.onnx, report.txt, summary.json, bench.json, speedup.png"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
