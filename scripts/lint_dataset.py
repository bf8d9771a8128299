"""Lint a dataset: every problem by file:line, length histograms; exit 1 when the errors
exceed --max_errors.

  python scripts/lint_dataset.py --data 'data/*.jsonl' --tokenizer /path/to/tokenizer \
      --max_seq_len 4096 --max_errors 0
"""

from __future__ import annotations

import argparse
import sys

from coach_jax import data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, nargs="+", help="files or glob patterns")
    parser.add_argument("--tokenizer", help="a local HF tokenizer folder (enables encoding "
                                            "checks and length histograms)")
    parser.add_argument("--chat_template_file")
    parser.add_argument("--format", default="auto", choices=("auto", *data.FORMATS))
    parser.add_argument("--max_seq_len", type=int)
    parser.add_argument("--train_on", default="all_assistant")
    parser.add_argument("--end_of_turn", default="", help="as data.end_of_turn")
    parser.add_argument("--max_errors", type=int, default=0)
    parser.add_argument("--inspect", type=int, default=0, help="also show N encoded examples")
    args = parser.parse_args(argv)
    tokenizer = (data.load_tokenizer(args.tokenizer, args.chat_template_file)
                 if args.tokenizer else None)
    report = data.lint(args.data, tokenizer, args.format, args.max_seq_len, args.train_on,
                       args.end_of_turn)
    print(report.format())
    if args.inspect and tokenizer is not None:
        print(data.template_report(tokenizer, args.end_of_turn))
        print(data.inspect(args.data, tokenizer, args.inspect, args.format, args.train_on,
                           color=sys.stdout.isatty(), end_of_turn=args.end_of_turn))
    if not report.ok(args.max_errors):
        print(f"lint failed: {report.errors} errors > --max_errors={args.max_errors}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
