"""The benchmark scripts run end to end in their tiny CPU mode, so they cannot rot between GPU runs.

Each script runs in a subprocess (as a user would run it) with --quick and --out in a temporary
directory; the JSON must hold a timing for every variant asked for, and the variants that compute the
same loss must agree on it.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from helpers import need

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_shared_harness(tmp_path):
    """benchmarks/harness.py: the warm-up is not timed, paired rounds rotate the order, the writer and the
    common options work, and every script uses the harness rather than a timer of its own."""
    sys.path.insert(0, str(BENCH))
    try:
        import harness
    finally:
        sys.path.pop(0)
    calls = []
    timing = harness.timed(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(timing.times) == 3 and timing.median >= 0 and timing.warmup_s >= 0
    order = []
    times = harness.paired({k: (lambda k=k: order.append(k)) for k in "abc"}, 3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(t) for k, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    args = harness.parser("doc").parse_args(["--quick", "--out", str(tmp_path / "x.json")])
    assert args.quick and harness.out_path(args, "a.json", "a_quick.json") == tmp_path / "x.json"
    args = harness.parser("doc").parse_args(["--quick"])
    assert harness.out_path(args, "a.json", "a_quick.json") == harness.RESULTS / "a_quick.json"
    meta = harness.device_meta()
    assert {"torch", "python", "processor", "cpu_count", "threads", "gpu", "device"} <= set(meta)
    path = harness.write_json(tmp_path / "sub" / "r.json", dict(meta=meta, rows=[1]))
    assert json.loads(path.read_text())["rows"] == [1]
    for script in sorted(BENCH.glob("bench_*.py")):
        text = script.read_text()
        assert "import harness" in text and "argparse.ArgumentParser(" not in text, script.name


def test_bench_loss_quick(tmp_path):
    need("triton")
    out = tmp_path / "loss.json"
    _run("bench_loss.py", "--quick", "--shapes", "tiny=300:32:16", "--variants", "triton,eager,floor", "--reps", "1",
         "--out", str(out))
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    for name in ("fused/triton-3h", "fused/onchip-3h", "logits/triton", "eager/torch-3h", "floor/gemm-3h",
                 "score/triton-1h", "score/onchip-1h", "score/torch-1h", "floor/gemm-1h-fwd"):
        assert name in rows and rows[name]["seconds"] > 0, name
    # Implementations of the same thing agree (the fused kernels round the logits less than eager torch).
    assert math.isclose(rows["fused/onchip-3h"]["loss"], rows["fused/triton-3h"]["loss"], rel_tol=1e-4)
    assert math.isclose(rows["score/onchip-1h"]["loss"], rows["score/triton-1h"]["loss"], rel_tol=1e-4)
    assert math.isclose(rows["score/torch-1h"]["loss"], rows["score/triton-1h"]["loss"], rel_tol=1e-2)
    tiles = [r for name, r in rows.items() if name.startswith("score/onchip-1h@")]
    assert len(tiles) == 3 and all(math.isclose(r["loss"], rows["score/triton-1h"]["loss"], rel_tol=1e-4) for r in tiles)
    # The logit-level triton op and eager torch compute the same loss on the same bf16 logits.
    assert math.isclose(rows["logits/triton"]["loss"], rows["eager/torch-3h"]["loss"], rel_tol=1e-4)
    assert data["quick"] is True and "not a performance number" in data["timer"]


def test_bench_cpu_quick(tmp_path):
    out = tmp_path / "cpu.json"
    stdout = _run("bench_cpu.py", "--quick", "--variants", "gopd_cpu", "eager", "gemm", "--n", "64",
                  "--out", str(out))
    data = json.loads(out.read_text())
    got = {(r["variant"], r["mode"]) for r in data["results"] if "error" not in r}
    assert {("gopd_cpu", "full"), ("gopd_cpu", "sampled"), ("eager", "full"), ("gemm", "full")} <= got
    assert all(r["median_s"] > 0 and r["peak_rss_mb"] > 0 for r in data["results"] if "error" not in r)
    assert any("x the GEMM floor" in line for line in data["summary"]), stdout


def test_bench_cpu_paired_quick(tmp_path):
    out = tmp_path / "paired.json"
    stdout = _run("bench_cpu.py", "--quick", "--variants", "gopd_cpu", "eager", "gemm", "gopd_cpu_bf16", "--n", "64",
                  "--modes", "full", "--paired", "3", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["rounds"] == 3 and all(len(t) == 3 for t in row["times_s"].values())
    floor = row["ratios"]["gopd_cpu/full vs gemm_floor"]
    assert len(floor["per_round"]) == 3 and floor["q1"] <= floor["median"] <= floor["q3"], stdout
    assert "gopd_cpu/full vs eager" in row["ratios"] and "gopd_cpu/full vs gopd_cpu_bf16" in row["ratios"]


def test_bench_gemm_chunks_quick(tmp_path):
    out = tmp_path / "chunks.json"
    _run("bench_gemm_chunks.py", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    rows = {r["chunk"]: r for r in data["results"]}
    assert sorted(rows) == [64, 128, 256]
    assert [rows[c]["calls"] for c in (64, 128, 256)] == [12, 6, 3]  # 3 heads x ceil(N / chunk), N = 256
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 3 for r in rows.values())
    assert rows[256]["over_one_call"] == 1.0 and set(data["fit"]) == {"fixed_per_call_s", "per_token_s"}


def test_bench_sharp_logits_quick(tmp_path):
    """The script runs and what it reports is consistent: the CPU backend's gradient has no subnormals at
    any scale while plain torch's has some at the sharpest one (the quick shapes reach that range too)."""
    out = tmp_path / "sharp.json"
    _run("bench_sharp_logits.py", "--quick", "--scales", "1", "20", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["scale"] for r in rows] == [1.0, 20.0]
    assert all(r["subnormal_frac_gopd"] == 0.0 for r in rows)
    assert rows[0]["subnormal_frac_eager"] == 0.0 and rows[1]["subnormal_frac_eager"] > 0.0
    assert all(r["gopd_cpu_s"] > 0 and r["eager_s"] > 0 and len(r["gopd_cpu_times_s"]) == 1 for r in rows)


def test_bench_served_teacher_quick(tmp_path):
    need("aiohttp")
    need("transformers")
    out = tmp_path / "served.json"
    stdout = _run("bench_served_teacher.py", "--quick", "--k", "4", "--steps", "1", "--out", str(out))
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"colocated/full", "served/topk-4"}, stdout
    assert rows["colocated/full"]["bytes_per_step"] == 0 and rows["served/topk-4"]["bytes_per_step"] > 0
    assert all(r["step_s"] > 0 and math.isfinite(r["loss_last"]) for r in rows.values())
