"""`benchmarks/reproduce.py --seeds`: per-seed results aggregated into mean ± 95% t intervals,
paired by seed, on fixed numbers."""

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
import seed_stats  # noqa: E402

T_975_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)
T_975_3 = 3.182446305284263


def result(overall: float, **domains: float) -> dict:
    return {"overall": {"ppl": overall}, "domains": {d: {"ppl": p} for d, p in domains.items()}}


# dense and lory per seed; lory's overall change: -5%, -3%, -4%; domain a: +2%, -1%, +2%
BY_SEED = {
    "dense": {0: result(100, a=50, b=200), 1: result(200, a=100, b=400), 2: result(100, a=100, b=100)},
    "lory": {0: result(95, a=51, b=180), 1: result(194, a=99, b=380), 2: result(96, a=102, b=95),
             3: result(1, a=1, b=1)},  # no dense seed 3: not paired, left out
}


def test_mean_ci_is_the_t_interval():
    mean, half, n = seed_stats.mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(T_975_2 * 1.0 / math.sqrt(3), rel=1e-9)  # sd 1
    mean, half, n = seed_stats.mean_ci([-5.0, -3.0, -4.0, -4.0])
    assert mean == -4.0 and half == pytest.approx(T_975_3 * math.sqrt(2 / 3) / 2, rel=1e-9)
    assert seed_stats.mean_ci([7.0])[0] == 7.0 and math.isnan(seed_stats.mean_ci([7.0])[1])
    assert seed_stats.mean_ci([])[2] == 0


def test_relative_changes_are_paired_by_seed():
    changes = seed_stats.relative_changes(BY_SEED, "lory", "dense")
    assert changes["overall"] == pytest.approx([-5.0, -3.0, -4.0])
    assert changes["a"] == pytest.approx([2.0, -1.0, 2.0])
    assert changes["b"] == pytest.approx([-10.0, -5.0, -5.0])


def test_ci_table_reports_mean_interval_and_not_significant():
    table = seed_stats.ci_table(BY_SEED, {"dense": "dense", "lory": "dense"})
    header, _, row = table.splitlines()
    assert header == "| model vs dense | seeds | a | b | overall |"
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["lory vs dense", "3"]
    # a: mean +1, sd sqrt(3) → ± 4.3, spans 0; b: mean -6.67, sd 2.89 → ± 7.2, spans 0; overall: -4 ± 2.5
    assert cells[2] == f"+1.0 ± {T_975_2:.1f}% n.s."
    assert cells[3] == f"-6.7 ± {T_975_2 * math.sqrt(25 / 3) / math.sqrt(3):.1f}% n.s."
    assert cells[4] == f"-4.0 ± {T_975_2 / math.sqrt(3):.1f}%"
    assert "dense vs" not in table


def test_single_seed_cells_say_so():
    one = {"dense": {0: BY_SEED["dense"][0]}, "lory": {0: BY_SEED["lory"][0]}}
    row = seed_stats.ci_table(one, {"lory": "dense"}).splitlines()[-1]
    assert "-5.0% (1 seed)" in row and "±" not in row


def test_seed_table_of_absolute_perplexity():
    runs = [("dense", "similarity", "dense", "dense"), ("lory", "similarity", "lory", "dense")]
    table = seed_stats.seed_table(BY_SEED, runs)
    row = table.splitlines()[-1]
    dense_half = T_975_2 * 57.735026918962575 / math.sqrt(3)  # sd of 100, 200, 100
    assert f"133.33 ± {dense_half:.2f} (3 seeds)" in row
    assert "(4 seeds)" in row  # lory's absolute perplexity uses every seed it has


def test_specialisation_record_and_table():
    diagnostics = [
        {"expert_spread": [0.1, 0.3], "expert_cosine": [0.99, 0.97], "routing_entropy": [1.0, 2.0],
         "top1_off_mode": [0.2, 0.4], "log_experts": 2.0},
        {"expert_spread": [0.2, 0.4], "expert_cosine": [0.98, 0.96], "routing_entropy": [1.0, 1.0],
         "top1_off_mode": [0.0, 0.2], "log_experts": 2.0},
    ]
    analysis = {"layers": [{"divergence": {"js_excess": 0.01}, "specialisation": {"mi_excess": 0.2}},
                           {"divergence": {"js_excess": 0.03}, "specialisation": {"mi_excess": 0.4}}]}
    record = seed_stats.specialisation_record(diagnostics, analysis)
    assert record == pytest.approx({"expert_spread": 0.3, "expert_cosine": 0.97, "entropy_ratio": 1.25 / 2,
                                    "top1_off_mode": 0.2, "js_excess": 0.02, "mi_excess": 0.3})
    table = seed_stats.specialisation_table({"lory": {0: record, 1: {**record, "expert_spread": 0.5}}})
    row = table.splitlines()[-1]
    # spreads 0.3 and 0.5: sd 0.2 / sqrt(2), two seeds → t with 1 degree of freedom (12.706)
    assert row.startswith(f"| lory | 2 | 0.4000 ± {12.706204736 * 0.1:.4f} | 0.970000 ± 0.000000 |")


def test_set_values_split_into_model_and_training_options():
    model, train = reproduce.split_overrides({"upcycle_noise": 0.01, "router_init_std": 0.2, "dense_warmup": 0.2,
                                              "segment_len": 32, "lr": 1e-3})
    assert model == {"upcycle_noise": 0.01, "router_init_std": 0.2}
    assert train == {"dense_warmup": 0.2, "segment_len": 32, "lr": 1e-3}
    assert reproduce.seed_name("lory-8E+noise", 2) == "lory-8E+noise-s2"


def test_references_follow_the_run_names():
    assert seed_stats.reference_of("lory-8E") == "dense"
    assert seed_stats.reference_of("lory-8E-random-dedup") == "dense-random-dedup"
    assert seed_stats.reference_of("lory-8E+noise") == "dense"
    assert seed_stats.reference_of("ec-token-8E") == "dense"
    assert seed_stats.reference_of("dense-random") == "dense-random"


def test_tables_from_a_results_json_with_string_seeds():
    names = {"dense": "dense", "lory": "lory-8E"}
    results = {"eval_by_seed": {"heldout-similarity": {  # JSON keys are strings
        names[name]: {str(seed): found for seed, found in seeds.items()} for name, seeds in BY_SEED.items()}}}
    text = seed_stats.tables_from_results(results)
    assert text.startswith("heldout-similarity: % change in perplexity, mean ± 95% CI over seeds [0, 1, 2, 3]")
    assert f"| lory-8E vs dense | 3 | +1.0 ± {T_975_2:.1f}% n.s." in text
    other = seed_stats.tables_from_results(results, [("dense", "lory-8E")])
    assert "| dense vs lory-8E | 3 |" in other and "| lory-8E vs dense |" not in other


def test_per_seed_records_gather_into_results():
    records = [{"run": name, "seed": seed, "eval": {"heldout-similarity": found},
                "specialisation": {"expert_spread": 0.1 * seed} if name == "lory" else None}
               for name, seeds in BY_SEED.items() for seed, found in seeds.items()]
    results = seed_stats.results_from_per_seed(records[::-1])
    assert list(results["eval_by_seed"]["heldout-similarity"]) == ["dense", "lory"]
    assert results["eval_by_seed"]["heldout-similarity"]["lory"][3] == BY_SEED["lory"][3]
    assert results["specialisation"] == {"lory": {s: {"expert_spread": 0.1 * s} for s in range(4)}}
    assert "| lory vs dense | 3 |" in seed_stats.tables_from_results(results, [("lory", "dense")])


def test_per_seed_table_lists_each_paired_seed():
    table = seed_stats.per_seed_table(BY_SEED, {"dense": "dense", "lory": "dense"})
    header, _, row = table.splitlines()
    assert header == "| model vs dense | seed 0 | seed 1 | seed 2 | seed 3 | mean ± 95% CI |"
    assert row == f"| lory vs dense | -5.0% | -3.0% | -4.0% | — | -4.0 ± {T_975_2 / math.sqrt(3):.1f}% |"
    assert "| +2.0% | -1.0% | +2.0% |" in seed_stats.per_seed_table(BY_SEED, {"lory": "dense"}, domain="a")
