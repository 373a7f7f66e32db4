"""False-positive rate at 5% of each paired test (``t``, ``randomization``, ``wilcoxon``) on this
project's own per-user metrics, under a null that holds for the mean while keeping the shape.

    python benchmarks/bench_significance.py [--warehouse DIR] [--draws 1000] [--sizes 100 943 5000]

The per-user values come from real pipeline runs' ``user_metrics`` tables (read with delta-rs):
``<warehouse>/ml100k`` (``vlm4rec pipeline --conf experiments/ml100k.yaml``) and
``<warehouse>/synthetic`` (``vlm4rec synth`` then ``experiments/synthetic.yaml``); a warehouse
without them is filled first by running those commands (about 5-10 minutes for ml100k on two
cores). For each dataset, pair of representations and metric@K:

- the null: the users' differences a - b with the non-zero ones shifted so that their mean is
  exactly 0 (the zeros, most users, are kept): the mean is 0, the skew and the zero mass stay;
- per size n (default 100, 943, 5,000): ``--draws`` samples of n users drawn with replacement,
  each tested by every test; the rate is the share with p < 0.05 (binomial standard error at
  1,000 draws: 0.7 percentage points);
- an A/A sanity check (at ``--aa-sizes``, default 943): the same absolute differences with random
  signs (a symmetric null, where every test holds its rate by construction).

The randomisation test runs here with ``--flips`` sign flips (default 2,000, not the job's
20,000): p = (1 + extreme) / (1 + flips) keeps the test's level for any number of flips, fewer
flips only blur p near 0.05; the draws of one case share the sign matrix (one matrix product).

Also reads the run's ``comparisons`` and recomputes the known true difference (``als`` against
``random``) under each test with Holm over the run's pairs of that metric@K. Prints a table and
writes JSON (machine, versions, rates) to ``benchmarks/results/significance.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)

from udfs.evaluate import significance

REPO = Path(__file__).resolve().parents[1]

# (a, b) pairs; "lvlm" stands for the run's LVLM representation.
PAIRS = [("title", "lvlm"), ("als", "popularity"), ("naive", "visual"), ("text", "title"), ("lvlm", "random")]
DATASETS = {"ml100k": "experiments/ml100k.yaml", "synthetic": "experiments/synthetic.yaml"}
ALPHA = 0.05


def ensure_run(warehouse: Path, dataset: str, ml100k: Path) -> None:
    """Run the dataset's pipeline into ``warehouse`` unless its ``user_metrics`` exist."""
    if (warehouse / "user_metrics" / "_delta_log").is_dir():
        return
    cli = [sys.executable, "-m", "jobs.cli"]
    overrides = ["--set", f"warehouse={warehouse}", "--set", "log_level=WARNING"]
    if dataset == "ml100k":
        overrides += ["--set", f"dataset.paths.root={ml100k.resolve()}"]
    else:
        data = warehouse.parent / "synthetic-data"
        if not data.is_dir():
            subprocess.run([*cli, "synth", "--out", str(data)], cwd=REPO, check=True)
        overrides += ["--set", f"dataset.paths.root={data}"]
    print(f"running the {dataset} pipeline into {warehouse} ...", flush=True)
    subprocess.run([*cli, "pipeline", "--conf", DATASETS[dataset], *overrides], cwd=REPO, check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def read_table(warehouse: Path, name: str) -> pd.DataFrame:
    from deltalake import DeltaTable

    return DeltaTable(str(warehouse / name)).to_pandas()


def latest_run(user_metrics: pd.DataFrame) -> str:
    return sorted(user_metrics["run_id"].unique())[-1]


def resolve(name: str, present: list[str]) -> str | None:
    if name == "lvlm":
        return next((r for r in present if r.startswith("lvlm:")), None)
    return name if name in present else None


def null_differences(d: np.ndarray) -> np.ndarray:
    """``d`` with its non-zero values shifted so that the mean is exactly 0; zeros kept."""
    nonzero = d != 0
    out = d.copy()
    if nonzero.any():
        out[nonzero] -= d.sum() / nonzero.sum()
    return out


def rejection_rates(pool: np.ndarray, n: int, draws: int, flips: int, seed: int,
                    random_signs: bool = False) -> dict[str, float]:
    """Share of ``draws`` samples of ``n`` values of ``pool`` (with replacement) that each test
    rejects at ``ALPHA``; ``random_signs``: each drawn value gets a fair random sign (the A/A)."""
    rng = np.random.default_rng(seed)
    samples = pool[rng.integers(0, len(pool), size=(n, draws))]
    if random_signs:
        samples = samples * np.where(rng.random(samples.shape) < 0.5, -1.0, 1.0)
    p = {"t": significance.paired_t_ps(samples),
         "randomization": significance.sign_flip_ps(samples, flips, seed=seed + 1),
         "wilcoxon": significance.paired_p_values("wilcoxon", samples)}
    return {test: float(np.mean(values < ALPHA)) for test, values in p.items()}


def known_difference(warehouse: Path, run_id: str, values: pd.DataFrame, metric: str, k: int) -> dict:
    """p_holm of als vs random under each test, Holm over all the run's pairs of metric@k."""
    part = values[(values["metric"] == metric) & (values["k"] == k)]
    wide = part.pivot(index="user_id", columns="representation", values="value").dropna()
    if not {"als", "random"} <= set(wide.columns):
        return {}
    pairs = list(itertools.combinations(sorted(wide.columns), 2))
    differences = np.column_stack([wide[a] - wide[b] for a, b in pairs])
    target = pairs.index(("als", "random"))
    out = {}
    for test in significance.TESTS:
        p = significance.paired_p_values(test, differences, seed=42)
        out[test] = {"p": float(p[target]), "p_holm": float(significance.holm(p)[target])}
    stored = read_table(warehouse, "comparisons")
    row = stored[(stored["run_id"] == run_id) & (stored["metric"] == metric) & (stored["k"] == k)
                 & (stored[["representation_a", "representation_b"]].apply(frozenset, axis=1)
                    == frozenset({"als", "random"}))]
    if len(row):
        out["stored"] = {c: (row.iloc[0][c] if c in row.columns else None)
                         for c in ("test", "mean_diff", "effect_size", "p_value", "p_holm")}
        out["stored"] = {c: (v.item() if hasattr(v, "item") else v) for c, v in out["stored"].items()}
    out["pairs_in_family"] = len(pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", type=Path, default=REPO / "benchmarks" / "results" / "significance-warehouse",
                        help="holds ml100k/ and synthetic/ warehouses (filled by running the pipelines if empty)")
    parser.add_argument("--ml100k", type=Path, default=REPO.parent / "shared" / "data" / "ml100k")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--flips", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 943, 5000])
    parser.add_argument("--metrics", nargs="+", default=["recall@10", "ndcg@10"])
    parser.add_argument("--aa-sizes", type=int, nargs="+", default=[943])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "significance.json")
    args = parser.parse_args()

    started = time.perf_counter()
    cases, sanity, known = [], [], {}
    for dataset in args.datasets:
        warehouse = (args.warehouse / dataset).resolve()
        ensure_run(warehouse, dataset, args.ml100k)
        user_metrics = read_table(warehouse, "user_metrics")
        run_id = latest_run(user_metrics)
        values = user_metrics[user_metrics["run_id"] == run_id]
        present = sorted(values["representation"].unique())
        known[dataset] = known_difference(warehouse, run_id, values, "ndcg", 10)
        for (a_name, b_name), metric_k in itertools.product(PAIRS, args.metrics):
            a, b = resolve(a_name, present), resolve(b_name, present)
            if a is None or b is None:
                continue
            metric, k = metric_k.split("@")
            part = values[(values["metric"] == metric) & (values["k"] == int(k))]
            wide = part.pivot(index="user_id", columns="representation", values="value")[[a, b]].dropna()
            d = (wide[a] - wide[b]).to_numpy(np.float64)
            pool, aa = null_differences(d), np.abs(d)
            for n in args.sizes:
                seed = len(cases) * 7919 + n
                case = {"dataset": dataset, "pair": f"{a_name}-{b_name}", "metric": metric_k, "n": n,
                        "users": len(d), "zero_share": float(np.mean(d == 0)),
                        "skew": float(pd.Series(d[d != 0]).skew()) if (d != 0).sum() > 2 else None,
                        "rates": rejection_rates(pool, n, args.draws, args.flips, seed)}
                cases.append(case)
                if n in args.aa_sizes:
                    # The A/A: every drawn user's absolute difference gets a fair random sign.
                    sanity.append({**{k_: case[k_] for k_ in ("dataset", "pair", "metric", "n")},
                                   "rates": rejection_rates(aa, n, args.draws, args.flips, seed + 3,
                                                            random_signs=True)})
                print(f"{dataset:<9} {case['pair']:<17} {metric_k:<9} n={n:<5} zeros={case['zero_share']:.2f}  "
                      + "  ".join(f"{t}={r:.3f}" for t, r in case["rates"].items()), flush=True)

    header = f"{'dataset':<9}  {'pair':<17}  {'metric':<9}  {'n':>5}  {'zeros':>5}  " + "  ".join(
        f"{t:>13}" for t in significance.TESTS)
    lines = ["false-positive rate at 5% under a mean-zero null that keeps the shape "
             f"({args.draws} draws per case; randomization with {args.flips} flips):", header, "-" * len(header)]
    for case in cases:
        lines.append(f"{case['dataset']:<9}  {case['pair']:<17}  {case['metric']:<9}  {case['n']:>5}  "
                     f"{case['zero_share']:>5.2f}  " + "  ".join(f"{case['rates'][t]:>13.3f}" for t in significance.TESTS))
    lines.append("")
    lines.append("range over all cases: " + ", ".join(
        f"{t} {min(c['rates'][t] for c in cases):.3f}-{max(c['rates'][t] for c in cases):.3f}"
        for t in significance.TESTS))
    if sanity:
        lines.append(f"A/A sign-flip sanity check (symmetric null, n = {args.aa_sizes}), range: " + ", ".join(
            f"{t} {min(c['rates'][t] for c in sanity):.3f}-{max(c['rates'][t] for c in sanity):.3f}"
            for t in significance.TESTS))
    for dataset, found in known.items():
        if found:
            lines.append(f"{dataset}: als vs random NDCG@10, Holm over {found['pairs_in_family']} pairs: " + ", ".join(
                f"{t} p_holm={found[t]['p_holm']:.2g}" for t in significance.TESTS)
                + (f"; stored row: {found['stored']}" if "stored" in found else ""))
    print("\n".join(lines))
    result = {"benchmark": "significance", "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                                        "python": platform.python_version(),
                                                        "numpy": np.__version__},
              "alpha": ALPHA, "draws": args.draws, "flips": args.flips, "sizes": args.sizes,
              "cases": cases, "aa_sanity": sanity, "known_difference": known,
              "seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
