"""The ``knn-classifier`` command: arguments, dispatch, and exit statuses.

Exit statuses: 0 done; 1 failed, with one line on stderr naming the gRPC status (or what else
was wrong); 2 bad arguments; 3 an import finished but rejected some rows; 130 interrupted;
141 the reader of its output went away (``| head``), as a shell reports a command that SIGPIPE
ended, but without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .._client import Client
from .._errors import DeadlineExceededError, KnnClassifierError
from .._requests import SCOPE_NAMES, VOTING_NAMES
from . import _commands, _connect
from ._errors import CliError
from ._rows import is_unicode

Command = Callable[[argparse.Namespace, Client], int]
BROKEN_PIPE = 128 + 13  # 128 + SIGPIPE
VOTINGS = list(VOTING_NAMES)


def _list_of(kind: Callable[[str], object]) -> Callable[[str], list[object]]:
    def parse(value: str) -> list[object]:
        return [kind(item) for item in value.split(",") if item.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def _whole(value: str) -> int:
    """A whole number that fits the request's int32 field (the server checks its range; a
    larger one would fail building the request)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}") from None
    if not -(2**31) <= number < 2**31:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use a 32-bit whole number")
    return number


def _positive(value: str) -> int:
    try:
        number = _whole(value)
    except argparse.ArgumentTypeError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of at least 1 (and under 2^31), not {value!r}"
        )
    return number


def _voting_list(value: str) -> list[str]:
    names = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [name for name in names if name not in VOTINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown voting {unknown}; use {', '.join(VOTINGS)}")
    return names


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=_whole, help="neighbours that vote")
    parser.add_argument("--voting", choices=VOTINGS)
    parser.add_argument("--min-similarity", type=float)
    parser.add_argument("--min-confidence", type=float)
    parser.add_argument("--temperature", type=float)


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="default: by suffix")
    parser.add_argument("--text-column", default="text", help="default: text")
    parser.add_argument("--label-column", default="label", help="default: label")


def _add_exemplar_filter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", default="", help="only the exemplars of this label")
    parser.add_argument(
        "--scope",
        choices=SCOPE_NAMES,
        default="all",
        help="only the in-scope exemplars or only the out-of-scope examples (default: all)",
    )


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"{what} as JSON")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="knn-classifier",
        description="Command line of the knn-classifier service.",
        epilog="Exit status: 0 done, 1 failed (one line on stderr names the gRPC status), "
        "2 bad arguments, 3 import done with rejected rows, 130 interrupted.",
    )
    _connect.add_arguments(top)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        _connect.add_arguments(sub, default=argparse.SUPPRESS)
        return sub

    create = command(
        "create",
        _commands.create,
        "Create a classifier, or check that it exists with these settings; print it as JSON.",
    )
    create.add_argument("name")
    create.add_argument("--instruction", default="", help="default: the server's")
    _add_settings(create)
    create.add_argument(
        "--fail-if-exists", action="store_true", help="fail even if its settings match"
    )

    listing = command("list", _commands.list_classifiers, "List the classifiers.")
    _add_output(listing, "one classifier per line")

    show = command("show", _commands.show, "Print a classifier as JSON.")
    show.add_argument("name")

    delete = command("delete", _commands.delete, "Delete a classifier and all its exemplars.")
    delete.add_argument("name")

    labels = command("labels", _commands.labels, "Labels and their exemplar counts.")
    labels.add_argument("name")
    _add_output(labels, "a {label: count} object")

    listed = command(
        "exemplars", _commands.list_exemplars, "Print exemplars, one JSON object per line."
    )
    listed.add_argument("name")
    _add_exemplar_filter(listed)

    forget = command(
        "delete-exemplars",
        _commands.delete_exemplars,
        "Delete exemplars: by ids or by label, or every one of a scope (in_scope or out_of_scope).",
    )
    forget.add_argument("name")
    forget.add_argument("--ids", type=_list_of(str), default=[], help="comma-separated ids")
    _add_exemplar_filter(forget)

    load = command(
        "import",
        _commands.import_rows,
        "Add the labelled rows of a CSV, TSV or JSONL file (or an export) to a classifier.",
    )
    load.add_argument("name", help="the classifier; an export's header creates it")
    load.add_argument("file")
    _add_columns(load)
    load.add_argument("--id-column", help="default: id, if the file has it; else ids from text")
    load.add_argument(
        "--metadata-columns",
        type=_list_of(str),
        default=[],
        help="comma-separated columns copied into metadata (JSONL: also a 'metadata' object)",
    )
    load.add_argument(
        "--batch-size", type=_positive, default=128, help="rows per call (default 128)"
    )
    load.add_argument(
        "--concurrency", type=_positive, default=4, help="calls in flight (default 4)"
    )
    load.add_argument(
        "--page-size", type=_positive, default=1000, help="exemplars per call when listing first"
    )
    load.add_argument(
        "--out-of-scope",
        action="store_true",
        help="every row is an out-of-scope example (a text to answer unknown to; its label, "
        "optional, names the topic); without it, rows whose out_of_scope column is true are",
    )
    load.add_argument("--rejected", help="rejected rows go here (default: FILE.rejected.EXT)")
    load.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bar on stderr (default: if stderr is a terminal)",
    )
    _add_output(load, "the summary")

    export = command(
        "export",
        _commands.export,
        "Write a classifier (settings, calibration, thresholds, out-of-scope threshold and "
        "exemplars) as JSONL.",
    )
    export.add_argument("name")
    export.add_argument("-o", "--output", help="file (default: standard output)")
    export.add_argument(
        "--vectors",
        action="store_true",
        help="with the stored vectors: an import into a server of the same embedder then "
        "embeds nothing (several KiB per exemplar)",
    )
    export.add_argument("--page-size", type=_positive, default=1000, help="exemplars per call")
    export.add_argument("--progress", action=argparse.BooleanOptionalAction)

    classify = command(
        "classify",
        _commands.classify,
        "Classify texts (arguments, else one per line of stdin); one JSON line each.",
    )
    classify.add_argument("name")
    classify.add_argument("texts", nargs="*")
    _add_settings(classify)
    classify.add_argument("--dimension", type=_whole)
    classify.add_argument("--neighbours", action="store_true", help="include the neighbours")
    classify.add_argument("--batch-size", type=_positive, default=64, help="texts per call")

    evaluate = command(
        "evaluate",
        _commands.evaluate,
        "Score a sweep of settings (leave-one-out, or on a held-out file); print a table.",
    )
    evaluate.add_argument("name")
    evaluate.add_argument(
        "--held-out",
        help="CSV, TSV or JSONL file of texts and true labels; rows whose out_of_scope column is "
        "true are texts that belong to no label (their label may be empty)",
    )
    evaluate.add_argument(
        "--out-of-scope",
        metavar="FILE",
        dest="out_of_scope_file",  # not import's --out-of-scope flag, which _read_table reads
        help="with --held-out: texts that belong to no label (the right answer is unknown), a "
        "file like --held-out's whose labels, if any, are ignored; adds how they are told apart",
    )
    _add_columns(evaluate)
    evaluate.add_argument("--k", type=_list_of(_whole), default=[], help="e.g. 5,10,20")
    evaluate.add_argument("--voting", type=_voting_list, default=[], help="e.g. softmax,centroid")
    evaluate.add_argument("--dimension", type=_list_of(_whole), default=[])
    evaluate.add_argument("--temperature", type=_list_of(float), default=[], help="e.g. 0.01,0.05")
    evaluate.add_argument(
        "--apply-best", action="store_true", help="make the best setting the defaults, calibrate"
    )
    evaluate.add_argument("--target-precision", type=float, help="with --apply-best: thresholds")
    evaluate.add_argument(
        "--target-coverage",
        type=float,
        help="with --apply-best: the out-of-scope threshold keeps this share of in-scope texts "
        "(0.5 to 1; default 0.98)",
    )
    evaluate.add_argument(
        "--keep-twins",
        action="store_true",
        help="leave-one-out: leave each exemplar out alone, its near-duplicates kept (by "
        "default they are left out with it, and the plain figure is shown as acc_with_twins)",
    )
    _add_output(evaluate, "the whole response")

    check = command(
        "check",
        _commands.check,
        "Report exemplars that look mislabelled, near-duplicates across labels, overlapping "
        "labels and labels with too few exemplars.",
    )
    check.add_argument("name")
    check.add_argument(
        "--min-confidence", type=float, help="leave-one-out confidence in another label"
    )
    check.add_argument("--min-duplicate-similarity", type=float, help="cosine similarity")
    check.add_argument("--min-label-exemplars", type=_whole, help="smaller labels are listed")
    check.add_argument("--max-items", type=_positive, help="items per list")
    _add_output(check, "the whole response")
    return top


def _check_unicode(args: argparse.Namespace) -> None:
    """Arguments holding bytes that are not UTF-8 (decoded with surrogateescape) cannot go in a
    request: refused naming the argument, rather than failing to build it."""
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(item, str) and not is_unicode(item) for item in values):
            raise CliError(f"the argument {name!r} is not UTF-8 text")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _check_unicode(args)
        with _connect.client(args) as client:
            status: int = args.run(args, client)
            return status
    except (KnnClassifierError, CliError) as error:
        message = " ".join(str(error).split())
        if isinstance(error, DeadlineExceededError):
            message += "; give each call more seconds with --timeout (or KNN_TIMEOUT)"
        print(f"knn-classifier: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("knn-classifier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that this does not
        # raise too (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
