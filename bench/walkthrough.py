"""The iterative prune -> fine-tune walkthrough, fxprune and Torch-Pruning side by side.

Torch-Pruning's headline example prunes a CIFAR ResNet-18 (3x3 stride-1 stem, no
max-pool) a little more at every step and fine-tunes in between. This reproduces that
recipe on scikit-learn's digits (1797 8x8 grayscale images, 10 classes, no download;
fixed stratified 80/20 split, seed 0), at native size with a one-channel stem:

1. train the dense model from a fixed seed and report its test accuracy;
2. from those same weights, prune with both tools in ``--steps`` steps reaching
   ``--ratio`` of each group's channels removed (linear schedule on the original widths):
   - fxprune: ``fxprune.Pruner(model, x, ratio=..., steps=..., round_to=..., ignore=[model.fc])``
   - Torch-Pruning: ``tp.pruner.MagnitudePruner(model, x, importance=MagnitudeImportance(p=2),
     iterative_steps=..., pruning_ratio=..., ignored_layers=[model.fc])`` (its documented usage)
   and after every step fine-tune both the same way (same optimizer, epochs, data order);
   per step record MACs and params (``fxprune.count_macs`` / parameter count, the same
   counter for both tools), test accuracy before and after the fine-tune, the wall time of
   the pruning call, the conv widths, and ONNX Runtime CPU latency of both pruned models
   against the dense one at batch 1 and 64, measured in ONE interleaved
   ``fxprune.export.compare_latency`` call per step (median of per-round ratios, IQR);
3. a final recovery fine-tune of both;
4. write ``docs/walkthrough.json``, ``docs/walkthrough.png`` and ``docs/walkthrough.md``.

    python bench/walkthrough.py                 # the full run (about 12 minutes on 2 cores)
    python bench/walkthrough.py --quick --out /tmp/wt.json   # 3 steps, tiny; for tests
    python bench/walkthrough.py --from-json docs/walkthrough.json   # only rewrite .md / .png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxprune  # noqa: E402
from bench.compare_torch_pruning import git_state, summarise  # noqa: E402
from fxprune.export.latency import compare_latency  # noqa: E402

logger = logging.getLogger(__name__)

TOOLS = ("fxprune", "torch-pruning")  # the names compare_torch_pruning.summarise reads
BASELINE = "original"
NUM_CLASSES = 10


# --------------------------------------------------------------------------- configuration


@dataclass
class Config:
    steps: int = 20
    # The walkthrough's own schedule goes to ratio=1.0 (at least one channel per layer);
    # both tools accept it, and 0.95 is used so that neither ends at a single channel.
    ratio: float = 0.95
    # Torch-Pruning's walkthrough does not align, but ONNX Runtime's CPU convs do: with
    # widths that are not multiples of 8 its NCHWc layout is lost and a ResNet-18 pruned
    # by 60% ran 3.6x faster at batch 1 instead of 14x (round_to=8). --round-to 1 to compare.
    round_to: int = 8
    width: int = 64  # channels of the first stage (ResNet-18: 64, 128, 256, 512)
    dense_epochs: int = 15
    epochs: int = 2  # fine-tune epochs after each pruning step
    final_epochs: int = 5  # recovery fine-tune after the last step
    lr: float = 0.05  # dense training (cosine); fine-tunes use lr_finetune
    lr_finetune: float = 0.01
    batch_size: int = 64
    train_subset: int | None = None  # first N training images only (quick runs)
    rounds: int = 15
    min_time: float = 0.05
    threads: int = 1  # ONNX Runtime intra-op threads for the latency
    # torch threads for training: on 2 shared cores, 2 OpenMP threads ran epochs 3-60x
    # slower and erratically (spinning against other processes); 1 thread is steady.
    train_threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 64)
    seed: int = 0
    quick: bool = False


QUICK = dict(
    steps=3,
    ratio=0.5,  # 95% in 3 steps leaves nothing to fine-tune: the test checks accuracy
    width=16,
    dense_epochs=4,
    epochs=1,
    final_epochs=1,
    train_subset=512,
    rounds=3,
    min_time=0.005,
)


# --------------------------------------------------------------------------- data and model


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits as N x 1 x 8 x 8 floats, standardised with the training split's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return {
        "x_train": (x_train - mean) / std,
        "y_train": y[idx_train],
        "x_test": (x_test - mean) / std,
        "y_test": y[idx_test],
    }


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), one input channel."""

    def __init__(self, width: int = 64, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(width: int, seed: int) -> CifarResNet18:
    torch.manual_seed(seed)
    return CifarResNet18(width=width, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    data: dict[str, torch.Tensor],
    epochs: int,
    lr: float,
    seed: int,
    cfg: Config,
    cosine: bool = False,
) -> float:
    """SGD (momentum 0.9, wd 5e-4); the data order depends only on ``seed``. Returns seconds.

    The optimizer is built here, on every call: pruning replaces parameter tensors.
    """
    x, y = data["x_train"], data["y_train"]
    if cfg.train_subset:
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    batches = epochs * -(-len(y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, batches) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(xb).argmax(1) == yb).sum())
        for xb, yb in zip(data["x_test"].split(256), data["y_test"].split(256))
    )
    model.train(was_training)
    return correct / len(data["y_test"])


# --------------------------------------------------------------------------- measuring


def size_of(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """MACs (fxprune.count_macs, one image), params and conv widths: the same code for both tools."""
    return {
        "macs": int(fxprune.count_macs(model, x)),
        "params": sum(p.numel() for p in model.parameters()),
        "widths": {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)},
    }


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def latency(
    models: dict[str, nn.Module], macs: dict[str, int], cfg: Config
) -> tuple[dict, list[dict]]:
    """One interleaved compare_latency call: dense, fxprune, Torch-Pruning, ORT CPU."""
    g = torch.Generator().manual_seed(cfg.seed)
    fixed = {b: torch.randn(b, 1, 8, 8, generator=g) for b in cfg.batch_sizes}
    report = compare_latency(
        models,
        fixed,
        backends=("ort",),
        batch_sizes=cfg.batch_sizes,
        rounds=cfg.rounds,
        min_time=cfg.min_time,
        num_threads=cfg.threads,
        macs=macs,
    )
    bench = json.loads(report.to_json())
    rows = summarise(report)
    for row in rows:  # the full spread too, beside summarise's IQR
        for tool in TOOLS:
            if row.get(tool):
                m = report.find(row["backend"], row["batch"], tool)
                row[tool]["speedup_min"], row[tool]["speedup_max"] = m.speedup_min, m.speedup_max
    return bench, rows


# --------------------------------------------------------------------------- the walkthrough


def fxprune_step_proxies(
    module: nn.Module, x: torch.Tensor, step_ratio: float, cfg: Config
) -> dict[str, Any]:
    """Wall time of the same step as one-shot ``fxprune.prune`` calls, verify on and off.

    A proxy: the obvious way, stepping a ``copy.deepcopy(pruner)`` with verify=False,
    fails from the second step on (the copy's surgery reports a BatchNorm whose
    running_mean has the previous width), so the same step ratio is applied by
    ``fxprune.prune`` to the current module, which retraces it.
    """
    out: dict[str, Any] = {}
    for verify in (True, False):
        try:
            _, seconds = timed(
                fxprune.prune,
                module,
                x,
                ratio=step_ratio,
                round_to=cfg.round_to,
                ignore=[module.fc],
                verify=verify,
            )
            out["prune_oneshot_verify_s" if verify else "prune_oneshot_noverify_s"] = seconds
        except Exception as exc:  # a proxy failing must not lose the walkthrough
            out["prune_oneshot_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def run(cfg: Config) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train_threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict[str, Any]:
    import torch_pruning as tp
    from tqdm.auto import tqdm

    data = load_data(cfg.seed)
    x = data["x_test"][:1]  # example input for tracing, MACs (per image) and the oracle
    dense = build_model(cfg.width, cfg.seed)
    dense_s = train(dense, data, cfg.dense_epochs, cfg.lr, cfg.seed, cfg, cosine=True)
    record: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "environment": environment(cfg),
        "dense": {
            "accuracy": accuracy(dense, data),
            "train_s": dense_s,
            **size_of(dense, x),
        },
        "steps": [],
    }
    tqdm.write(
        f"dense: test accuracy {record['dense']['accuracy']:.4f} after {cfg.dense_epochs} "
        f"epochs ({dense_s:.1f} s), {record['dense']['params'] / 1e6:.2f}M params"
    )

    # Both tools start from the same trained weights.
    fx_pruner = fxprune.Pruner(
        dense, x, ratio=cfg.ratio, steps=cfg.steps, round_to=cfg.round_to, ignore=[dense.fc]
    )
    tp_model = copy.deepcopy(dense)
    tp_pruner = tp.pruner.MagnitudePruner(
        tp_model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        iterative_steps=cfg.steps,
        pruning_ratio=cfg.ratio,
        ignored_layers=[tp_model.fc],
        round_to=cfg.round_to if cfg.round_to > 1 else None,
    )

    bar = tqdm(range(1, cfg.steps + 1), desc="walkthrough", unit="step")
    for i in bar:
        keep_before = 1.0 - cfg.ratio * (i - 1) / cfg.steps
        keep = 1.0 - cfg.ratio * i / cfg.steps
        step: dict[str, Any] = {"step": i, "target_kept": keep}
        seed = cfg.seed * 1000 + i  # same data order for both tools at this step

        # fxprune: the proxies run first, on the module before this step.
        proxies = fxprune_step_proxies(fx_pruner.module, x, 1.0 - keep / keep_before, cfg)
        res, fx_s = timed(fx_pruner.step)
        fx = step["fxprune"] = {"prune_s": fx_s, **proxies}
        fx["verified"] = res.report.verified
        fx["max_error"] = res.report.max_error
        fx["accuracy_before_ft"] = accuracy(fx_pruner.module, data)
        fx["finetune_s"] = train(fx_pruner.module, data, cfg.epochs, cfg.lr_finetune, seed, cfg)
        fx["accuracy_after_ft"] = accuracy(fx_pruner.module, data)
        fx.update(size_of(fx_pruner.module, x))

        _, tp_s = timed(tp_pruner.step)
        tpr = step["torch-pruning"] = {"prune_s": tp_s}
        tpr["accuracy_before_ft"] = accuracy(tp_model, data)
        tpr["finetune_s"] = train(tp_model, data, cfg.epochs, cfg.lr_finetune, seed, cfg)
        tpr["accuracy_after_ft"] = accuracy(tp_model, data)
        tpr.update(size_of(tp_model, x))

        models = {BASELINE: dense, "fxprune": fx_pruner.module, "torch-pruning": tp_model}
        macs = {
            BASELINE: record["dense"]["macs"],
            "fxprune": fx["macs"],
            "torch-pruning": tpr["macs"],
        }
        (step["bench"], step["latency"]), step["latency_s"] = timed(latency, models, macs, cfg)
        record["steps"].append(step)
        bar.set_postfix_str(
            f"acc fx {fx['accuracy_after_ft']:.3f} tp {tpr['accuracy_after_ft']:.3f}, "
            f"params fx {fx['params'] / 1e6:.2f}M tp {tpr['params'] / 1e6:.2f}M"
        )

    final: dict[str, Any] = {"epochs": cfg.final_epochs}
    seed = cfg.seed * 1000 + 999
    for tool, model in (("fxprune", fx_pruner.module), ("torch-pruning", tp_model)):
        seconds = train(model, data, cfg.final_epochs, cfg.lr_finetune, seed, cfg, cosine=True)
        final[tool] = {"accuracy": accuracy(model, data), "finetune_s": seconds}
    record["final"] = final
    record["environment"]["date_end"] = _now()
    record["environment"]["loadavg_1m_at_end"] = _loadavg()
    record["environment"]["fxprune_git_at_end"] = git_state()
    return record


# --------------------------------------------------------------------------- environment


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(cfg: Config) -> dict[str, Any]:
    import onnxruntime
    import sklearn
    import torch_pruning as tp

    return {
        "date": _now(),
        "command": " ".join(["python", *sys.argv]) if sys.argv else "",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m_at_start": _loadavg(),
        "torch_threads_training": torch.get_num_threads(),
        "ort_threads_latency": cfg.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_pruning": getattr(tp, "__version__", "?"),
        "scikit_learn": sklearn.__version__,
        "fxprune": fxprune.__version__,
        "fxprune_git": git_state(),
    }


# --------------------------------------------------------------------------- report


def _row(step: dict, batch: int) -> dict | None:
    return next((r for r in step["latency"] if r["batch"] == batch), None)


def _speedup(step: dict, tool: str, batch: int) -> str:
    row = _row(step, batch)
    t = row.get(tool) if row else None
    if not t:
        return "n/a"
    return f"{t['speedup']:.2f}x [{t['speedup_q1']:.2f}-{t['speedup_q3']:.2f}]"


def _stage_widths(widths: dict[str, int]) -> str:
    """Output width of each stage's last conv: stem / layer1..4 (layer4 feeds fc)."""
    names = ["conv1"] + [f"layer{i}.1.conv2" for i in range(1, 5)]
    return "/".join(str(widths.get(n, "?")) for n in names)


def tool_table(data: dict, tool: str) -> list[str]:
    dense = data["dense"]
    batches = data["config"]["batch_sizes"]
    header = [
        "step",
        "target kept",
        "params",
        "MACs",
        "widths stem/l1/l2/l3/l4",
        "acc before FT",
        "acc after FT",
        *[f"speedup bs{b} [IQR]" for b in batches],
        "prune s",
    ]
    if tool == "fxprune":
        header += ["one-shot prune s (verify / no verify)", "oracle"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.append(
        "| 0 (dense) | 100% | "
        + f"{dense['params'] / 1e6:.2f}M | {dense['macs'] / 1e6:.1f}M | "
        + f"{_stage_widths(dense['widths'])} | | {dense['accuracy']:.3f} | "
        + " | ".join("1.00x" for _ in batches)
        + " | |"
        + (" | |" if tool == "fxprune" else "")
    )
    for step in data["steps"]:
        t = step[tool]
        cells = [
            str(step["step"]),
            f"{step['target_kept']:.0%}",
            f"{t['params'] / 1e6:.3f}M ({dense['params'] / t['params']:.1f}x fewer)",
            f"{t['macs'] / 1e6:.2f}M ({dense['macs'] / t['macs']:.1f}x fewer)",
            _stage_widths(t["widths"]),
            f"{t['accuracy_before_ft']:.3f}",
            f"{t['accuracy_after_ft']:.3f}",
            *[_speedup(step, tool, b) for b in batches],
            f"{t['prune_s']:.2f}",
        ]
        if tool == "fxprune":
            on, off = t.get("prune_oneshot_verify_s"), t.get("prune_oneshot_noverify_s")
            cells.append(
                f"{on:.2f} / {off:.2f}" if on is not None and off is not None else "failed"
            )
            cells.append(t["verified"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def headline(data: dict) -> dict[str, dict[str, Any]]:
    """Per tool: params / MACs reduction, speedup at the last step, accuracy vs dense."""
    dense, last = data["dense"], data["steps"][-1]
    out = {}
    for tool in TOOLS:
        t = last[tool]
        out[tool] = {
            "params_reduction": dense["params"] / t["params"],
            "macs_reduction": dense["macs"] / t["macs"],
            "speedup": {
                b: (_row(last, b) or {}).get(tool, {}).get("speedup")
                for b in data["config"]["batch_sizes"]
            },
            "accuracy_last_step": t["accuracy_after_ft"],
            "accuracy_final": data["final"][tool]["accuracy"],
            "accuracy_delta": data["final"][tool]["accuracy"] - dense["accuracy"],
            "prune_s_total": sum(s[tool]["prune_s"] for s in data["steps"]),
        }
    return out


def markdown(data: dict, png_name: str) -> str:
    cfg, env, dense = data["config"], data["environment"], data["dense"]
    head = headline(data)
    lines = ["# Iterative pruning walkthrough: fxprune and Torch-Pruning side by side", ""]
    if cfg["quick"] or cfg["steps"] != Config.steps:
        lines += [
            f"> **Preliminary numbers from a reduced configuration** ({cfg['steps']} steps, "
            f"width {cfg['width']}, {cfg['rounds']} timing rounds). Regenerate with the "
            "command below before drawing conclusions.",
            "",
        ]
    lines += [
        "Torch-Pruning's headline walkthrough prunes a CIFAR ResNet-18 (3x3 stride-1 stem, "
        "no max-pool) a little more at every step, fine-tuning in between. The same recipe, "
        "from the same trained weights, with both tools, on scikit-learn's digits "
        "(1797 8x8 grayscale images, 10 classes; stratified 80/20 split, seed "
        f"{cfg['seed']}; native 8x8 input, one-channel stem, stage widths "
        f"{cfg['width']}/{2 * cfg['width']}/{4 * cfg['width']}/{8 * cfg['width']}).",
        "",
        "```bash",
        ".venv/bin/python bench/walkthrough.py" + ("" if not cfg["quick"] else " --quick"),
        "```",
        "",
        f"Recorded command: `{env.get('command', '')}`.",
        "",
        "## Recipe",
        "",
        f"- dense: {cfg['dense_epochs']} epochs SGD (momentum 0.9, wd 5e-4, lr {cfg['lr']} "
        f"cosine, batch {cfg['batch_size']}), seed {cfg['seed']}: test accuracy "
        f"**{dense['accuracy']:.3f}**, {dense['params'] / 1e6:.2f}M params, "
        f"{dense['macs'] / 1e6:.1f}M MACs per image.",
        f"- {cfg['steps']} pruning steps to {cfg['ratio']:.0%} of each group's channels "
        f"removed (linear in the original widths), round_to={cfg['round_to']}, the classifier "
        "ignored:",
        f"  - fxprune: `fxprune.Pruner(model, x, ratio={cfg['ratio']}, steps={cfg['steps']}, "
        f"round_to={cfg['round_to']}, ignore=[model.fc])`, L2 importance, `verify=True` (the "
        "oracle runs inside every step);",
        "  - Torch-Pruning: `tp.pruner.MagnitudePruner(model, x, "
        f"importance=tp.importance.MagnitudeImportance(p=2), iterative_steps={cfg['steps']}, "
        f"pruning_ratio={cfg['ratio']}, ignored_layers=[model.fc])`.",
        f"- after each step: {cfg['epochs']} fine-tune epoch(s), SGD lr {cfg['lr_finetune']}, the "
        "same data order for both tools; then a recovery fine-tune of "
        f"{cfg['final_epochs']} epoch(s) (cosine).",
        f"- both tools run to a final ratio of {cfg['ratio']} (the walkthrough's own schedule "
        "goes to 1.0, which both accept; 0.95 keeps more than one channel per layer).",
        "- MACs: `fxprune.count_macs` on one 1x1x8x8 image, for both tools. Latency: "
        f"`fxprune.export.compare_latency`, ONNX Runtime CPU, {cfg['threads']} intra-op "
        f"thread(s), {cfg['rounds']} interleaved rounds, dense / fxprune / Torch-Pruning in one "
        "call per step; speedup = median of per-round ratios dense/pruned, [IQR].",
        "",
        "## Result",
        "",
        f"![accuracy vs measured speedup]({png_name})",
        "",
        "| tool | params | MACs | "
        + " | ".join(f"speedup bs{b}" for b in cfg["batch_sizes"])
        + " | acc last step | acc after recovery | vs dense | prune s (all steps) |",
        "|" + "---|" * (7 + len(cfg["batch_sizes"])),
    ]
    for tool, h in head.items():
        speed = " | ".join(
            f"{h['speedup'][b]:.2f}x" if h["speedup"][b] else "n/a" for b in cfg["batch_sizes"]
        )
        lines.append(
            f"| {tool} | {h['params_reduction']:.1f}x fewer | {h['macs_reduction']:.1f}x fewer | "
            f"{speed} | {h['accuracy_last_step']:.3f} | {h['accuracy_final']:.3f} | "
            f"{h['accuracy_delta']:+.3f} | {h['prune_s_total']:.1f} |"
        )
    lines += ["", "## What the results mean", ""]
    lines += interpretation(data, head)
    for tool in TOOLS:
        lines += ["", f"## Per step: {tool}", ""]
        lines += tool_table(data, tool)
    lines += ["", "## fxprune vs Torch-Pruning latency per step", ""]
    lines += [
        "Median of per-round ratios of Torch-Pruning's latency to fxprune's "
        "(> 1: fxprune's model is faster), [IQR].",
        "",
        "| step | " + " | ".join(f"bs{b}" for b in cfg["batch_sizes"]) + " | timing s |",
        "|" + "---|" * (2 + len(cfg["batch_sizes"])),
    ]
    for step in data["steps"]:
        cells = []
        for b in cfg["batch_sizes"]:
            row = _row(step, b)
            if row and "fx_over_tp_speedup" in row:
                cells.append(
                    f"{row['fx_over_tp_speedup']:.2f}x "
                    f"[{row['fx_over_tp_q1']:.2f}-{row['fx_over_tp_q3']:.2f}]"
                )
            else:
                cells.append("n/a")
        lines.append(f"| {step['step']} | " + " | ".join(cells) + f" | {step['latency_s']:.1f} |")
    notes = sorted({n for s in data["steps"] for n in s["bench"].get("notes", [])})
    errors = [
        (s["step"], s["fxprune"]["prune_oneshot_error"])
        for s in data["steps"]
        if "prune_oneshot_error" in s["fxprune"]
    ]
    if notes or errors:
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in notes]
        lines += [f"- step {i}: fxprune one-shot proxy failed: {e}" for i, e in errors]
    lines += ["", "## Environment", ""]
    for key in (
        "date",
        "date_end",
        "python",
        "platform",
        "cpu_count",
        "loadavg_1m_at_start",
        "loadavg_1m_at_end",
        "torch_threads_training",
        "ort_threads_latency",
        "torch",
        "onnxruntime",
        "torch_pruning",
        "scikit_learn",
        "fxprune",
        "fxprune_git",
        "fxprune_git_at_end",
    ):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    lines += [
        f"- wall time: dense training {dense['train_s']:.0f} s; total fine-tune "
        f"{sum(s[t]['finetune_s'] for s in data['steps'] for t in TOOLS):.0f} s; latency "
        f"{sum(s['latency_s'] for s in data['steps']):.0f} s",
        "",
    ]
    return "\n".join(lines)


def interpretation(data: dict, head: dict) -> list[str]:
    """Sentences computed from the numbers, plus the caveats that hold for any run."""
    cfg, dense, last = data["config"], data["dense"], data["steps"][-1]
    fx, tpr = head["fxprune"], head["torch-pruning"]
    b1 = cfg["batch_sizes"][0]
    out = []
    for tool, h in head.items():
        s = h["speedup"][b1]
        out.append(
            f"- **{tool}**: {h['params_reduction']:.1f}x fewer parameters and "
            f"{h['macs_reduction']:.1f}x fewer MACs after {cfg['steps']} steps; measured "
            + (f"{s:.2f}x faster at batch {b1}" if s else "speedup n/a")
            + f"; accuracy {h['accuracy_final']:.3f} after recovery vs {dense['accuracy']:.3f} "
            f"dense ({h['accuracy_delta']:+.3f})."
        )
    fw, tw = last["fxprune"]["widths"], last["torch-pruning"]["widths"]
    l4 = "layer4.1.conv2"
    if fw.get(l4) == dense["widths"].get(l4) and tw.get(l4, 0) < dense["widths"].get(l4, 0):
        out.append(
            f"- The last stage differs: with `ignore=[model.fc]` fxprune keeps all "
            f"{fw[l4]} channels that feed `fc` (the whole residual group of layer4 is frozen), "
            f"while Torch-Pruning's `ignored_layers=[model.fc]` only keeps fc's outputs and "
            f"prunes its inputs to {tw[l4]}. That is most of the parameter gap: a known fxprune "
            "issue being fixed, not a property of the schedule."
        )
    drift = [
        (s["step"], s["target_kept"], s["fxprune"]["widths"], s["torch-pruning"]["widths"])
        for s in data["steps"]
    ]
    stem = [(i, k, f.get("conv1"), t.get("conv1")) for i, k, f, t in drift]
    differing = [(i, k, f, t) for i, k, f, t in stem if f != t]
    if differing:
        i, k, f, t = differing[-1]
        out.append(
            f"- Widths drift apart: at step {i} (target {k:.0%} kept of "
            f"{dense['widths']['conv1']}) the stem keeps {f} channels with fxprune and {t} with "
            "Torch-Pruning."
        )
    same = all(s["fxprune"]["widths"] == s["torch-pruning"]["widths"] for s in data["steps"])
    gap = fx["accuracy_final"] - tpr["accuracy_final"]
    if same and abs(gap) >= 0.02:
        out.append(
            f"- Both tools reach the same widths at every step, yet accuracy differs by "
            f"{gap:+.3f} after recovery (fxprune minus Torch-Pruning) with the same data order "
            "and optimizer: they keep different channels. Both rank by L2 magnitude but "
            "aggregate it over a group's members differently (fxprune: `reduction='mean'`, "
            "`normalize='mean'`; Torch-Pruning: its own group reduction)."
        )
    identical = same and all(
        s["fxprune"][k] == s["torch-pruning"][k]
        for s in data["steps"]
        for k in ("accuracy_before_ft", "accuracy_after_ft")
    )
    if identical:
        prune_fx = sum(s["fxprune"]["prune_s"] for s in data["steps"])
        prune_tp = sum(s["torch-pruning"]["prune_s"] for s in data["steps"])
        out.append(
            "- **Both tools keep the same channels at every step**: identical widths, and "
            "identical accuracy right after each cut and after each fine-tune, so the two "
            "pruned models are the same network. Their latency differences are measurement "
            "noise on one architecture; fxprune adds the correctness proof of every step. "
            f"Pruning time over all steps: fxprune {prune_fx:.1f} s with the oracle on, "
            f"Torch-Pruning {prune_tp:.1f} s."
        )
    if fx["macs_reduction"] and tpr["macs_reduction"]:
        out.append(
            f"- Speedup per MACs reduction at batch {b1}: fxprune "
            f"{(fx['speedup'][b1] or 0) / fx['macs_reduction']:.2f}, Torch-Pruning "
            f"{(tpr['speedup'][b1] or 0) / tpr['macs_reduction']:.2f} (1.0 would be ideal). "
            "At 8x8 inputs most of the network runs on 1x1 to 4x4 feature maps, so batch 1 is "
            "dominated by per-op overhead; batch 64 shows what the saved MACs buy."
        )
    out.append(
        "- Torch-Pruning's published numbers (15x fewer params, 5.5x faster, same accuracy) "
        "are for CIFAR-10 at 32x32 on a GPU; digits at 8x8 is a far smaller task, so accuracy "
        "recovers more easily and latency is less MACs-bound here. Compare the tools with each "
        "other, not with that headline."
    )
    out.append(
        "- Every fxprune step ran the correctness oracle (`verify=True`): "
        + (
            "all steps report that outputs equal the masked original."
            if all("equal" in s["fxprune"]["verified"] for s in data["steps"])
            else "see the `oracle` column below."
        )
    )
    return out


def plot(data: dict, path: Path) -> None:
    """Accuracy vs measured speedup at batch 1 (one point per step), and params vs step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = {"fxprune": "tab:blue", "torch-pruning": "tab:orange"}
    b1 = data["config"]["batch_sizes"][0]
    dense = data["dense"]
    fig = Figure(figsize=(13, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2)
    ax.plot(1.0, dense["accuracy"], "k*", markersize=12, label="dense")
    for tool in TOOLS:
        xs, ys, lo, hi = [], [], [], []
        for step in data["steps"]:
            t = (_row(step, b1) or {}).get(tool)
            if not t:
                continue
            xs.append(t["speedup"])
            ys.append(step[tool]["accuracy_after_ft"])
            lo.append(t["speedup"] - t["speedup_q1"])
            hi.append(t["speedup_q3"] - t["speedup"])
        ax.errorbar(xs, ys, xerr=[lo, hi], marker="o", color=colors[tool], capsize=2, label=tool)
        for j, (sx, sy) in enumerate(zip(xs, ys), start=1):
            if j in (1, len(xs)) or j % 5 == 0:
                ax.annotate(str(j), (sx, sy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if xs:
            ax.plot(
                xs[-1],
                data["final"][tool]["accuracy"],
                marker="*",
                markersize=12,
                color=colors[tool],
                linestyle="none",
                label=f"{tool} after recovery",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"measured speedup vs dense, ONNX Runtime CPU, batch {b1} (x, bars = IQR)")
    ax.set_ylabel("test accuracy after the step's fine-tune")
    ax.set_title("accuracy vs speedup, one point per step (labels: step)")
    ax.legend(fontsize="small")
    steps = [0] + [s["step"] for s in data["steps"]]
    for tool in TOOLS:
        params = [dense["params"]] + [s[tool]["params"] for s in data["steps"]]
        macs = [dense["macs"]] + [s[tool]["macs"] for s in data["steps"]]
        ax2.plot(steps, params, "o-", color=colors[tool], label=f"{tool} params")
        ax2.plot(steps, macs, "s--", color=colors[tool], alpha=0.6, label=f"{tool} MACs")
    ax2.set_yscale("log")
    ax2.set_xlabel("pruning step")
    ax2.set_ylabel("count (log)")
    ax2.set_title("params and MACs (fxprune.count_macs, one image) per step")
    ax2.legend(fontsize="small")
    cfg = data["config"]
    fig.suptitle(
        f"CIFAR ResNet-18 (width {cfg['width']}) on digits: {cfg['steps']} steps to "
        f"{cfg['ratio']:.0%} removed, round_to {cfg['round_to']}, {cfg['threads']} ORT thread(s)",
        fontsize="medium",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def write_outputs(data: dict, out: Path) -> tuple[Path, Path, Path]:
    png, md = out.with_suffix(".png"), out.with_suffix(".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    plot(data, png)
    md.write_text(markdown(data, png.name))
    return out, png, md


# --------------------------------------------------------------------------- CLI


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config(**(QUICK if args.quick else {}), quick=args.quick)
    for name in (
        "steps",
        "epochs",
        "rounds",
        "ratio",
        "round_to",
        "width",
        "threads",
        "dense_epochs",
        "final_epochs",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, help=f"pruning steps (default {Config.steps})")
    parser.add_argument("--epochs", type=int, help=f"fine-tune epochs per step ({Config.epochs})")
    parser.add_argument("--rounds", type=int, help=f"interleaved timing rounds ({Config.rounds})")
    parser.add_argument("--ratio", type=float, help=f"final channel ratio removed ({Config.ratio})")
    parser.add_argument("--round-to", type=int, help=f"channel alignment ({Config.round_to})")
    parser.add_argument("--width", type=int, help=f"first-stage channels ({Config.width})")
    parser.add_argument("--threads", type=int, help=f"ORT threads for latency ({Config.threads})")
    parser.add_argument("--train-threads", type=int, help=f"torch threads ({Config.train_threads})")
    parser.add_argument("--dense-epochs", type=int, help=f"({Config.dense_epochs})")
    parser.add_argument("--final-epochs", type=int, help=f"recovery epochs ({Config.final_epochs})")
    parser.add_argument("--quick", action="store_true", help="3 steps, tiny config (tests)")
    parser.add_argument(
        "--out",
        default=str(ROOT / "docs" / "walkthrough.json"),
        help="JSON path; .png and .md are written beside it",
    )
    parser.add_argument("--from-json", help="only rewrite the .md and .png of an earlier run")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    out = Path(args.out)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
    else:
        data = run(config_from_args(args))
    paths = write_outputs(data, out)
    for tool, h in headline(data).items():
        print(
            f"{tool}: {h['params_reduction']:.1f}x fewer params, {h['macs_reduction']:.1f}x "
            f"fewer MACs, speedup "
            + ", ".join(f"bs{b} {v:.2f}x" for b, v in h["speedup"].items() if v)
            + f", accuracy {h['accuracy_final']:.3f} ({h['accuracy_delta']:+.3f} vs dense)"
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
