"""The printed results table: the paper's row order and the paired differences against lvlm."""
from __future__ import annotations

from udfs.report.results_table import against_reference, differences_against, paper_order, results_table

LVLM = "lvlm:tags:efficientnet-lite0:abc"


def test_paper_order_puts_the_papers_rows_first_and_the_others_after_sorted():
    names = ["random", "text", "naive:text+visual", "popularity", f"naive:{LVLM}+visual", "concat", "visual",
             "smore", "title", "als", LVLM, f"attention:{LVLM}+visual", "naive", "gating"]
    assert paper_order(names) == [
        LVLM, "title", "text", "visual",  # text-only baselines beside each other
        "naive", "concat", "gating", "smore",  # title + vision, in the paper's fusion order
        f"naive:{LVLM}+visual", f"attention:{LVLM}+visual",  # lvlm + vision
        "als", "popularity", "random",
        "naive:text+visual",  # not in the paper: after, by name
    ]
    assert paper_order(reversed(names)) == paper_order(names)


def test_differences_are_representation_minus_lvlm_whichever_way_they_were_stored():
    rows = [dict(representation_a=LVLM, representation_b="title", metric="ndcg", k=10, mean_diff=0.02,
                 ci_low=0.01, ci_high=0.03, p_value=0.01, p_holm=0.02),
            dict(representation_a="random", representation_b=LVLM, metric="ndcg", k=10, mean_diff=-0.05,
                 ci_low=-0.06, ci_high=-0.04, p_value=0.01, p_holm=0.03),
            dict(representation_a="title", representation_b="random", metric="ndcg", k=10, mean_diff=0.1,
                 ci_low=0.0, ci_high=0.2, p_value=0.5, p_holm=0.5)]
    diffs = differences_against(rows, LVLM)
    assert diffs == {("title", "ndcg", 10): (-0.02, -0.03, -0.01, 0.02),
                     ("random", "ndcg", 10): (-0.05, -0.06, -0.04, 0.03)}


def test_results_table_prints_metrics_in_paper_order_then_differences_against_lvlm():
    names = ["random", "als", "title", LVLM]
    metrics = [dict(representation=n, metric="ndcg", k=10, value=0.1 * (i + 1), n_users=7, ci_low=0.0, ci_high=1.0)
               for i, n in enumerate(names)]
    comparisons = [dict(representation_a=LVLM, representation_b="als", metric="ndcg", k=10, mean_diff=0.25,
                        ci_low=0.125, ci_high=0.375, p_value=0.001, p_holm=float("nan"))]
    text = results_table(metrics, comparisons, names, [10])
    lines = text.splitlines()
    first = [line.split()[0] for line in lines[2:6]]
    assert first == [LVLM, "title", "als", "random"]
    assert "0.2000 [0.0000,1.0000]" in lines[4]  # als's own row
    block = lines.index(next(line for line in lines if line.startswith("paired differences against " + LVLM)))
    als_row = next(line for line in lines[block:] if line.startswith("als"))
    assert "-0.2500 [-0.3750,-0.1250] n/a" in als_row
    assert "no lvlm representation" in results_table(metrics[:1], [], ["random"], [10])


def test_results_table_marks_a_representation_with_a_note_and_prints_the_note_under_the_metrics():
    names = ["title", LVLM]
    metrics = [dict(representation=n, metric="ndcg", k=10, value=0.1, n_users=7, ci_low=0.0, ci_high=1.0)
               for n in names]
    text = results_table(metrics, [], names, [10], notes={LVLM: "no signal in its descriptions"})
    lines = text.splitlines()
    assert [line for line in lines if line.endswith("(!) see the warning below")][0].startswith(f"{LVLM} ")
    assert not any(line.startswith("title ") and "(!)" in line for line in lines)
    assert f"WARNING {LVLM}: no signal in its descriptions" in lines


def test_against_reference_turns_the_row_round_with_its_effect_size_and_keeps_the_test():
    stored = dict(representation_a=LVLM, representation_b="title", metric="ndcg", k=10, mean_diff=0.02,
                  ci_low=0.01, ci_high=0.03, effect_size=0.4, test="t", p_value=0.01, p_holm=0.02)
    assert against_reference(stored, LVLM) == {
        "other": "title", "mean_diff": -0.02, "ci_low": -0.03, "ci_high": -0.01, "effect_size": -0.4,
        "test": "t", "p_value": 0.01, "p_holm": 0.02}
    older = {k: v for k, v in stored.items() if k not in ("effect_size", "test")}
    assert against_reference(older, "title")["effect_size"] is None and against_reference(older, "title")["test"] is None
    assert against_reference(stored, "random") is None


def test_the_printed_differences_name_the_runs_test():
    names = ["title", LVLM]
    row = dict(representation_a=LVLM, representation_b="title", metric="ndcg", k=10, mean_diff=0.02,
               ci_low=0.01, ci_high=0.03, p_value=0.01, p_holm=0.02)
    assert "Holm-corrected randomization p" in results_table([], [{**row, "test": "randomization"}], names, [10])
    # Rows written before the test was stored were Wilcoxon's.
    assert "Holm-corrected wilcoxon p" in results_table([], [row], names, [10])
