"""Smoke test of the benchmark suite (`nemotron_diffusion.bench`, `nemotron-diffusion bench`): a tiny random-weight
run completes and writes valid JSON and markdown. No timing is asserted; the speed-of-light check counts forwards,
which are deterministic, so its ratios are."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nemotron_diffusion
from nemotron_diffusion.bench import report
from nemotron_diffusion.cli import main

PACKAGE = Path(nemotron_diffusion.__file__).resolve().parent


def test_tiny_run_writes_valid_json(tmp_path, capsys):
    prefix = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:
        status = main([
            "bench", "--random", "tiny", "--prompts", "2", "--max-prompt-tokens", "160", "--max-new-tokens", "6",
            "--block-sizes", "4", "--batch-sizes", "1,2", "--repeats", "1", "--overhead-repeats", "1",
            "--overhead-tokens", "4", "--sol-max-new-tokens", "8", "--threads", "1", "--no-progress",
            "--out", str(prefix),
        ])
    finally:
        torch.set_flush_denormal(False)
    assert status == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.md").read_text().startswith("# Benchmark")
    runs = {(r["name"], r["block_size"], r["batch_size"]): r for r in result["runs"]}
    expected = {("stock generate", None, 1), ("prompt lookup", None, 1), ("ours ar", None, 1), ("diffusion", 4, 1),
                ("linear_spec", 4, 1), ("quadratic_spec", 4, 1), ("stock generate", None, 2), ("ours ar", None, 2),
                ("diffusion", 4, 2), ("linear_spec", 4, 2), ("quadratic_spec", 4, 2)}
    assert set(runs) == expected
    for row in runs.values():
        assert "error" not in row, row
        assert row["tok_per_s"] > 0 and row["forwards"] > 0 and row["tokens_per_forward"] > 0
        assert "prefill" in row["ms_per_forward"]
    # Greedy self-speculation returns AR's tokens; the stock twin shares the weights.
    for name in ("linear_spec", "quadratic_spec"):
        assert runs[(name, 4, 1)]["same_tokens_as_ours_ar"] == 1.0
        assert runs[(name, 4, 1)]["acceptance_histogram"]
    assert runs[("stock generate", None, 1)]["same_tokens_as_ours_ar"] == 1.0
    assert set(runs[("linear_spec", 4, 1)]["ms_per_forward"]) == {"prefill", "draft", "verify"}
    assert set(runs[("diffusion", 4, 1)]["ms_per_forward"]) <= {"prefill", "draft", "commit"}
    # Perfect drafts reach each mode's tokens-per-forward ceiling (forward counts, not time).
    sol = result["speed_of_light"]
    assert sol["all_pass"] and all(r["perfect"] for r in sol["rows"])
    assert {r["mode"] for r in sol["rows"]} == {"ar", "diffusion", "linear_spec", "quadratic_spec"}
    assert result["ar_overhead"]["same_tokens"] is True
    assert result["machine"]["torch"] == torch.__version__
    if importlib.util.find_spec("matplotlib") is not None:
        for suffix in ("tok_s", "tokens_per_forward"):
            assert (tmp_path / f"bench_{suffix}.png").stat().st_size > 0
    assert torch.get_num_threads() == threads  # restored after --threads 1


def test_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.plots({"runs": []}, str(tmp_path / "x")) == []
    assert "matplotlib is not installed" in capsys.readouterr().err


# Run in a fresh interpreter from a copy of the installed package alone (no source tree beside it), in an empty
# folder: building the command line's parser imports only the bench's flags, and the bench runs and writes its
# results into the current folder.
_OUTSIDE_A_CHECKOUT = """
import sys
import nemotron_diffusion
from nemotron_diffusion.cli import build_parser, main
assert nemotron_diffusion.__file__.startswith(sys.argv[1]), nemotron_diffusion.__file__  # the copy, not a checkout
build_parser()
loaded = sorted(m for m in sys.modules if m.startswith("nemotron_diffusion.bench."))
assert loaded == ["nemotron_diffusion.bench.arguments"], loaded
sys.exit(main(["bench", "--random", "tiny", "--prompts", "1", "--max-prompt-tokens", "160", "--max-new-tokens", "4",
               "--modes", "ar,linear_spec", "--block-sizes", "4", "--batch-sizes", "1", "--baselines", "stock",
               "--repeats", "1", "--no-speed-of-light", "--overhead-repeats", "0", "--threads", "1", "--no-progress"]))
"""


def test_bench_runs_from_an_installed_package_without_the_source_tree(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "nemotron_diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MPLBACKEND": "Agg", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", _OUTSIDE_A_CHECKOUT, str(site)], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((work / "bench.json").read_text())  # the default --out outside a checkout: ./bench
    assert {r["name"] for r in result["runs"]} == {"stock generate", "ours ar", "linear_spec"}
    assert all("error" not in r for r in result["runs"])
    assert (work / "bench.md").read_text().startswith("# Benchmark")


def test_bad_flags_are_one_line(capsys):
    status = main(["bench", "--random", "nosuchshape", "--no-speed-of-light"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "nosuchshape" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--block-sizes", "0"])
    assert exit_info.value.code == 2


def test_module_entry_point_prints_the_flags(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nemotron_diffusion.bench", "--help"], cwd=tmp_path,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "--block-sizes" in out.stdout
    assert out.stdout.startswith("usage: nemotron-diffusion bench")
