"""bench/zoo.py, the model-zoo conformance sweep: records, resume, and failures kept as results.

One small sweep (a torchvision ResNet-18 at 32x32, a tiny random BERT and a model name
that does not exist) runs in a subprocess, as the sweep itself runs each model; the
other tests make a child time out or run out of memory and check that the sweep records
it and goes on.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "zoo.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("torch_pruning") is None,
    reason="the zoo sweep needs transformers and torch-pruning (pip install '.[dev]')",
)


def run_zoo(options: str, **paths: Path) -> subprocess.CompletedProcess:
    """``python bench/zoo.py OPTIONS --out PATH ...``: options split at spaces, paths whole."""
    named = [a for key, path in paths.items() for a in (f"--{key.replace('_', '-')}", str(path))]
    return subprocess.run(
        [sys.executable, str(SCRIPT), *options.split(), *named],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def load_zoo():
    spec = importlib.util.spec_from_file_location("bench_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "zoo.json"
    models = "torchvision:resnet18,transformers:bert,torchvision:no_such_model"
    options = f"--zoo torchvision,transformers --models {models} --input-size 32 --timeout 90"
    proc = run_zoo(options, out=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(out.read_text())


def by_model(data):
    return {r["model"]: r for r in data["results"]}


def test_each_model_gets_a_record_with_both_tools_and_onnx(sweep):
    _, data = sweep
    results = by_model(data)
    assert list(results) == [
        "torchvision:resnet18",
        "transformers:bert",
        "torchvision:no_such_model",
    ]
    resnet = results["torchvision:resnet18"]
    assert resnet["status"] == "ok" and resnet["input"] == "1x3x32x32"
    fx, tp = resnet["fxprune"], resnet["torch_pruning"]
    assert fx["status"] == "ok" and fx["exact"] is True and fx["max_error"] < 1e-4
    assert fx["macs_before"] > fx["macs_after"] > 0 and fx["macs_reduction"] > 2.5
    assert fx["params_before"] > fx["params_after"] > 0 and fx["prune_s"] > 0
    assert tp["status"] == "ok" and tp["macs_counter"] == "fxprune" and tp["shapes_equal"]
    assert tp["macs_before"] == fx["macs_before"]  # one counter for both tools
    assert resnet["onnx"]["status"] == "ok" and resnet["onnx"]["ort_max_abs_err"] < 1e-3
    bert = results["transformers:bert"]
    assert bert["fxprune"]["status"] == "ok" and bert["heads"] == [
        "BertPooler",
        "Linear",
    ]  # pooler, classifier
    assert bert["fxprune"]["frontend"].startswith("export")
    assert "num_heads given" in bert["torch_pruning"]["notes"][0]


def test_a_model_that_cannot_be_built_is_recorded_and_the_sweep_goes_on(sweep):
    _, data = sweep
    missing = by_model(data)["torchvision:no_such_model"]
    assert missing["status"] == "error" and missing["stage"] == "build"
    assert "no_such_model" in missing["error"]
    assert data["environment"]["versions"]["torch"]


def test_the_markdown_report_has_totals_rows_and_failures(sweep):
    out, _ = sweep
    text = out.with_suffix(".md").read_text()
    assert "| torchvision | 2 | 1/2 |" in text
    assert "| resnet18 | classification | 1x3x32x32 | ok (fx) | exact |" in text
    assert "## fxprune failures" in text and "`torchvision:no_such_model`: ValueError" in text
    again = run_zoo("", from_json=out, md=out.with_name("again.md"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert out.with_name("again.md").read_text() == text


def test_resume_skips_models_already_measured(sweep, tmp_path):
    _, data = sweep
    copy = tmp_path / "zoo.json"
    copy.write_text(json.dumps(data))
    proc = run_zoo("--zoo torchvision --models torchvision:resnet18 --resume", out=copy)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads(copy.read_text())
    assert resumed["results"] == data["results"]
    assert len(resumed["environment"]["resumed"]) == 1


def test_a_child_past_its_time_limit_is_recorded_as_a_timeout(tmp_path):
    out = tmp_path / "zoo.json"
    proc = run_zoo("--zoo torchvision --models torchvision:resnet18 --timeout 0.5", out=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = json.loads(out.read_text())["results"]
    assert record["status"] == "timeout" and "no result within" in record["error"]
    assert "| resnet18 |" in out.with_suffix(".md").read_text()


def test_a_child_out_of_memory_is_recorded_not_raised(tmp_path):
    out = tmp_path / "zoo.json"
    proc = run_zoo("--zoo torchvision --models torchvision:resnet18 --memory-gb 0.3", out=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = json.loads(out.read_text())["results"]
    assert record["status"] == "oom", record
    assert "exited with code" in record["error"]


def test_models_are_chosen_by_name_or_zoo_and_name():
    zoo = load_zoo()
    assert len(zoo.zoo_models("timm")) >= 80
    assert zoo.select(["transformers"], "bert,transformers:llama", None) == [
        "transformers:bert",
        "transformers:llama",
    ]
    assert zoo.select(["transformers", "yolo"], "nope", None) == ["transformers:nope"]
    assert zoo.select(["yolo"], None, 1) == ["yolo:yolov8n"]


def test_the_report_names_each_failure_where_it_happened():
    zoo = load_zoo()
    pruned = {"status": "ok", "frontend": "fx", "exact": True, "max_error": 3e-7}
    pruned |= {"macs_reduction": 3.0, "params_reduction": 3.5, "prune_s": 1.0}
    tp_timeout = {"status": "timeout", "step": "MetaPruner", "error": "no result within 75 s"}
    data = {
        "environment": {
            "date": "today", "fxprune": "0", "platform": "linux", "cpu_count": 2, "threads": 1,
            "timeout_s": 300, "memory_gb": 12, "command": "zoo.py", "ratio": 0.5, "round_to": 8,
        },
        "results": [
            {"model": "timm:a", "zoo": "timm", "status": "ok", "fxprune": pruned,
             "torch_pruning": tp_timeout, "onnx": {"status": "ok"}, "subprocess_s": 90},
            {"model": "timm:b", "zoo": "timm", "status": "oom", "stage": "fxprune",
             "error": "subprocess exited with code 1: out of memory during fxprune",
             "subprocess_s": 20},
        ],
    }  # fmt: skip
    text = zoo.render_markdown(data)
    assert "| a |  |  | ok (fx) | exact | 3.0e-07 | 3.00x |  | 3.50x |  | ok | 1.0 |  | " in text
    assert "timeout in MetaPruner: no result within 75 s |" in text
    assert "| b |  |  | oom |" in text
    assert "- `timm:b`: subprocess exited with code 1: out of memory during fxprune" in text
    assert "| timm | 2 | 1/2 |" in text and "| 55 / 90 / 2 min |" in text
