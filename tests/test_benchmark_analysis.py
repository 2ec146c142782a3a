"""The forgetting benchmark's analysis decides the README's claims: checked on synthetic runs whose effects are known
(a guard that meets the goal, one that falls short, arms with too few seeds), and its tests against their
definitions."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "forgetting.py"
STEPS = [0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("forgetting_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic(bench, kl_scale: dict[str, float], seed: int = 0) -> dict:
    """Runs whose task gain saturates at `gain` with time constant `tau` and whose KL grows as scale * gain^2,
    with log-normal noise per seed: an arm's KL at matched gain is its scale times the baselines'."""
    rng = np.random.default_rng(seed)
    shapes = {"lora_all@1e-3": (0.57, 3), "lora_all@3e-4": (0.50, 8), "lora_all@1e-4": (0.37, 15),
              "lora_down@1e-3": (0.51, 5), "kl10": (0.56, 3), "kl3": (0.57, 3), "lesion_ica10": (0.50, 5),
              "lesion_top10": (0.50, 5)}
    runs = {}
    for arm, (gain, tau) in shapes.items():
        spec = {"guard": ["kl", 1.0]} if arm.startswith("kl") else {}
        for s in (range(5) if arm in bench.HEADLINE else range(3)):
            noise, gain_noise = math.exp(rng.normal(0, 0.15)), 1 + rng.normal(0, 0.005)
            evals = []
            for t in STEPS:
                g = gain * gain_noise * (1 - math.exp(-t / tau))
                kl = 0.3 * kl_scale.get(arm, 1.0) * noise * g * g
                evals.append({"step": t, "task_nll": 2.0 - g, "reply_match": 1 - kl, "reply_nll": kl,
                              **{f"{m}_{d}": (1 - kl if m == "agreement" else kl)
                                 for d in "ABG" for m in ("kl", "agreement", "nll")}})
            runs[f"{arm}|{s}"] = {"arm": arm, "seed": s, "spec": spec, "evals": evals, "held_rows": 0,
                                  "step_seconds": {"median": 1.0}}
    return {"runs": runs, "arms": list(shapes)}


def test_a_guard_far_below_the_frontier_meets_the_goal_and_one_short_of_it_does_not(bench):
    strong = synthetic(bench, {"kl10": 0.05, "kl3": 0.05})
    summary = bench.summarise(strong, strong["arms"])
    assert summary["goal"]["met_by"] == ["kl10"]  # kl3 is as strong, but ran 3 seeds, not the goal's 5
    assert summary["goal"]["arms"]["kl3"]["point_estimates_meet"] and not summary["goal"]["arms"]["kl3"]["testable"]
    short = synthetic(bench, {"kl10": 0.2})  # 80% less KL: well below the frontier, short of the goal's 85%
    summary = bench.summarise(short, short["arms"])
    assert summary["goal"]["met_by"] == []
    kl10 = summary["goal"]["arms"]["kl10"]
    assert 0.7 < kl10["kl_reduction_A"] < 0.9 and kl10["p_holm"]["kl_reduction_A"] > 0.05
    # The difference itself is real, and found, in the same family.
    found = next(c for c in summary["comparisons"] if c["arm"] == "kl10" and c["metric"] == "kl_A"
                 and c["kind"] == "difference")
    assert found["reference_arm"] == "lora_all@1e-3" and found["n"] == 5 and found["p_holm"] < 0.05


def test_a_mask_no_better_than_its_baseline_is_not_called_better(bench):
    results = synthetic(bench, {}, seed=3)
    summary = bench.summarise(results, results["arms"])
    for c in summary["comparisons"]:
        if c["arm"].startswith("lesion") and c["kind"] == "difference" and c["metric"].startswith("kl_"):
            assert c["p_holm"] > 0.05, c


def test_the_reported_kl_values_agree_with_the_reduction(bench):
    results = synthetic(bench, {"kl10": 0.3})
    for c in bench.summarise(results, results["arms"])["comparisons"]:
        if c["metric"].startswith("kl_") and "reduction" in c:
            assert 1 - c["method"] / c["reference_value"] == pytest.approx(c["reduction"], rel=1e-9)


def test_holm_is_the_step_down_rule(bench):
    rng = np.random.default_rng(1)
    for _ in range(200):
        p = list(rng.uniform(0, 0.2, rng.integers(1, 12)))
        order = np.argsort(p)
        expected, running = [0.0] * len(p), 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (len(p) - rank) * p[i]))
            expected[i] = running
        assert bench.holm(p) == pytest.approx(expected)
    assert bench.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_one_sided_tests_point_the_right_way_even_without_spread(bench):
    assert bench.paired_test([0.90] * 5, 0.95, "greater") == 1.0
    assert bench.paired_test([0.99] * 5, 0.95, "greater") == 0.0
    assert bench.paired_test([0.99] * 5, 0.95, "less") == 1.0
    assert bench.paired_test([0.97, 0.98, 0.99, 0.975, 0.985], 0.95, "greater") < 0.01
    assert bench.paired_test([0.90, 0.91, 0.92, 0.905, 0.915], 0.95, "greater") > 0.99
    assert bench.paired_test([0.5], 0.0, "two-sided") is None


def test_shards_split_the_pending_runs_headline_first_and_merge_back(bench):
    arms = list(bench.arm_specs())
    cfg = bench.FULL
    done = {f"{a}|0": {"evals": []} for a in arms}
    everything = bench.pending(done, arms, cfg)
    shards = [bench.pending(done, arms, cfg, k, 3) for k in (1, 2, 3)]
    assert sorted(x for shard in shards for x in shard) == sorted(everything)
    assert sum(map(len, shards)) == len(everything) == len(set(everything))
    assert all(f"{a}|{s}" not in done for a, s in everything)
    headline = [a in bench.HEADLINE for a, _ in everything]
    assert headline == sorted(headline, reverse=True) and any(headline) and not all(headline)
    assert {s for a, s in everything if a not in bench.HEADLINE} == set(cfg["seeds"][1:bench.OTHER_SEEDS])

    results = {"config_key": "k", "runs": dict(done)}
    bench.merge(results, {"config_key": "k", "runs": {"kl10|3": {"evals": [1]}, f"{arms[0]}|0": {"evals": []}}})
    assert results["runs"]["kl10|3"] == {"evals": [1]} and len(results["runs"]) == len(done) + 1
    with pytest.raises(ValueError, match="another configuration"):
        bench.merge(results, {"config_key": "other", "runs": {}})
    with pytest.raises(ValueError, match="different measurements"):
        bench.merge(results, {"config_key": "k", "runs": {"kl10|3": {"evals": [2]}}})


def test_step_times_leave_out_runs_that_shared_the_machine(bench):
    results = synthetic(bench, {"kl10": 0.05})
    for seed, seconds in enumerate([2.0, 2.0, 9.0, 2.0, 2.0]):
        run = results["runs"][f"kl10|{seed}"]
        run["step_seconds"] = {"median": seconds}
        run["shards"] = 2 if seconds == 9.0 else 1
    for seed in range(5):
        results["runs"][f"lora_all@1e-3|{seed}"]["step_seconds"] = {"median": 1.0}
    out = bench.summarise(results, results["arms"])
    assert out["table"]["kl10"]["step_seconds"] == {"mean": 2.0, "sd": 0.0}
    assert out["step_time_ratio"]["kl10"]["mean"] == 2.0


def run_main(bench, monkeypatch, *argv) -> int:
    monkeypatch.setattr(sys, "argv", ["forgetting.py", *argv])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    return stop.value.code


def test_results_files_that_are_not_this_benchmarks_are_refused_in_one_line(bench, monkeypatch, tmp_path, capsys):
    good = {"config_key": "k", "arms": ["kl10"], "runs": {"kl10|0": {"evals": []}}}
    assert bench.read_results(bench_file(tmp_path / "good.json", good)) == good
    for name, text in {"list.json": "[]", "torn.json": '{"runs": {', "noarms.json": '{"config_key": "k", "runs": {}}',
                       "badrun.json": '{"config_key": "k", "arms": [], "runs": {"a|0": 3}}'}.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match="not a results file|not JSON"):
            bench.read_results(path)
        assert run_main(bench, monkeypatch, "--report", "--json", str(path)) == 2
        assert f"--json {path}: " in capsys.readouterr().err and path.read_text() == text
    assert run_main(bench, monkeypatch, "--report", "--json", str(tmp_path / "good.json"), "--merge",
                    str(tmp_path / "list.json")) == 2
    assert "--merge: " in capsys.readouterr().err


def bench_file(path: Path, results: dict) -> Path:
    import json

    path.write_text(json.dumps(results))
    return path


def test_a_run_never_replaces_another_configurations_runs_nor_shares_its_file(bench, monkeypatch, tmp_path, capsys):
    from functionalnetworkssft.outputs import FolderLock

    full = bench_file(tmp_path / "full.json", {"config_key": "not-quick", "arms": ["kl10"],
                                              "runs": {"kl10|0": {"evals": [1]}}})
    before = full.read_text()
    assert run_main(bench, monkeypatch, "--quick", "--json", str(full)) == 2
    assert "holds 1 runs of another configuration" in capsys.readouterr().err and full.read_text() == before
    with FolderLock(tmp_path / ".full.json.lock", "another forgetting.py", full):
        code = run_main(bench, monkeypatch, "--report", "--json", str(full))
    assert code != 0 and "is being written by another forgetting.py" in str(code)
    assert full.read_text() == before and not (tmp_path / ".full.json.lock").exists()
