"""``recommend``: top-K lists of a run for users or ad-hoc histories, with explanations (no Spark).

One representation of one run, read from the Delta tables WITHOUT Spark (``udfs.recommender``).

    vlm4rec recommend --run-id RUN --user 42 --user 7 --k 10
    vlm4rec recommend --run-id RUN --representation title --history 12,40,77 --format table

``--user`` (repeatable, or comma-separated) names users of the run; ``--history ITEM,ITEM,...``
(repeatable) is one ad-hoc history each, for a user the tables have never seen. The
representation defaults to ``lvlm`` (the run's LVLM representation, spelt out). Output: one
JSON line per query (``--format jsonl``, default) or a plain table; ``--no-explain`` drops the
explanations. This is the online path: it only reads, so it records no row in ``runs`` (a
write per query would need a Delta writer on the serving path). Exit codes: 0 done, 2 a bad
request (unknown run, user, item or representation: the message names the fix), 3 the
``deltalake`` package is missing.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import json
import sys

from .config import ConfigError, load_config
from .job_run import EXIT_CONFIG, EXIT_INSTALL, EXIT_OK, base_parser, comma_list, run_id_argument, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", required=True, type=run_id_argument, help="the run whose lists to serve")
    parser.add_argument("--representation", default="lvlm",
                        help="one of the run's representations (default lvlm: the run's LVLM representation)")
    parser.add_argument("--user", action="append", default=[], type=comma_list, metavar="USER[,USER]",
                        help="user id(s) of the run (repeatable)")
    parser.add_argument("--history", action="append", default=[], type=comma_list, metavar="ITEM,ITEM",
                        help="one ad-hoc history of item ids, for a user the tables have never seen (repeatable)")
    parser.add_argument("--k", type=int, default=10, help="list length (default 10)")
    parser.add_argument("--format", choices=["jsonl", "table"], default="jsonl", help="output format")
    parser.add_argument("--no-explain", action="store_true", help="leave out the explanations")
    parser.add_argument("--contributors", type=int, default=3, help="history items per explanation (default 3)")


def warehouse_of(config) -> str:
    if hasattr(config, "warehouse_uri"):
        return config.warehouse_uri()
    return str(config.warehouse_path())


def table_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        who = record["user_id"] if record["user_id"] is not None else "(history)"
        lines.append(f"{who}  [{record['representation']}, run {record['run_id']}]")
        for entry in record["items"]:
            title = f"  {entry['title']}" if entry.get("title") else ""
            lines.append(f"  {entry['rank']:>3}  {entry['item_id']:<16} {entry['score']:.4f}{title}")
            if entry.get("because"):
                exact = entry["shares_exact"]
                because = ", ".join(f"{c['item_id']} ({c['share' if exact else 'similarity']:+.3f})"
                                    for c in entry["because"])
                lines.append(f"       because: {because}" + (" (share of the score)" if exact else " (cosine)"))
            if entry.get("shared_phrases"):
                lines.append(f"       shared: {', '.join(entry['shared_phrases'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("recommend", __doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    users = [u for group in args.user for u in group]
    if bool(users) == bool(args.history):
        parser.error("pass --user (users of the run) or --history (ad-hoc histories), one of the two")
    try:
        config = load_config(args.conf, args.overrides)
    except ConfigError as exc:
        print(f"vlm4rec recommend: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    try:
        from udfs.recommender import RecommendError, Recommender
        from udfs.warehouse_reader import TableMissing
    except ModuleNotFoundError as exc:
        print(f"vlm4rec recommend: {exc.name} is not installed: pip install -e . (it needs the deltalake package)",
              file=sys.stderr)
        return EXIT_INSTALL
    try:
        recommender = Recommender.load(warehouse_of(config), args.run_id, args.representation)
        result = recommender.recommend(users=users or None, histories=args.history or None, k=args.k,
                                       explain=not args.no_explain, n_contributors=args.contributors)
    except (RecommendError, TableMissing) as exc:
        print(f"vlm4rec recommend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    records = result.records()
    if args.format == "jsonl":
        for record in records:
            print(json.dumps(record, sort_keys=True))
    else:
        print("\n".join(table_lines(records)))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
