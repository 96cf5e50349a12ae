"""One function per command: call the client, print the result (stdout) and notes (stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from knn_classifier.v1 import classifier_pb2 as pb

from .._client import Client
from .._errors import KnnClassifierError, NotFoundError
from .._requests import voting_name
from . import _archive, _progress
from ._errors import CliError
from ._importer import Importer, Summary
from ._rows import Columns, Table, file_format, is_unicode, read, write_rejected

REJECTED_ROWS = 3


def _note(message: str) -> None:
    print(f"knn-classifier: {message}", file=sys.stderr)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _proto_json(message: Message) -> dict[str, Any]:
    """A response in proto3's JSON mapping, field names as in the proto."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# Line breaks and tabs in a cell (an exemplar's text may hold them) would break the table's rows.
_CELL_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned; one line per row."""
    cells = [[str(c).translate(_CELL_ESCAPES) for c in line] for line in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


# Classifiers -----------------------------------------------------------------------------------


def create(args: argparse.Namespace, client: Client) -> int:
    classifier = client.create_classifier(
        args.name,
        instruction=args.instruction,
        k=args.k,
        voting=args.voting,
        min_similarity=args.min_similarity,
        min_confidence=args.min_confidence,
        temperature=args.temperature,
        exist_ok=not args.fail_if_exists,
    )
    print(_json(_archive.describe(classifier), indent=2))
    return 0


def list_classifiers(args: argparse.Namespace, client: Client) -> int:
    classifiers = [_archive.describe(c) for c in client.list_classifiers()]
    if args.json:
        for item in classifiers:
            print(_json(item))
        return 0
    columns = ["name", "exemplar_count", "k", "voting", "temperature", "calibrated"]
    print(_table(columns, [[item[c] for c in columns] for item in classifiers]))
    return 0


def show(args: argparse.Namespace, client: Client) -> int:
    print(_json(_archive.describe(client.get_classifier(args.name)), indent=2))
    return 0


def delete(args: argparse.Namespace, client: Client) -> int:
    deleted = client.delete_classifier(args.name)
    print(f"deleted classifier {args.name!r} and its {deleted} exemplar(s)")
    return 0


def list_exemplars(args: argparse.Namespace, client: Client) -> int:
    for exemplar in client.iter_exemplars(args.name, label=args.label, scope=args.scope):
        sys.stdout.write(_archive.exemplar_line(exemplar))
    return 0


def delete_exemplars(args: argparse.Namespace, client: Client) -> int:
    if args.ids and args.label:
        raise CliError("give --ids or --label, not both")
    deleted = client.delete_exemplars(args.name, ids=args.ids, label=args.label, scope=args.scope)
    print(f"deleted {deleted} exemplar(s) of classifier {args.name!r}")
    return 0


def labels(args: argparse.Namespace, client: Client) -> int:
    counts = client.list_labels(args.name)
    negatives = client.count_out_of_scope(args.name)
    if args.json:
        print(_json(counts))
    else:
        print(_table(["count", "label"], [[count, label] for label, count in counts.items()]))
        if negatives:
            print(f"\nand {negatives} out-of-scope example(s), in no label")
    return 0


# Import and export -------------------------------------------------------------------------


def _read_table(
    args: argparse.Namespace,
    path: Path,
    id_column: str | None = None,
    metadata: Sequence[str] = (),
) -> Table:
    columns = Columns(
        text=args.text_column,
        label=args.label_column,
        id=id_column or "id",
        id_required=id_column is not None,
        metadata=metadata,
        all_out_of_scope=getattr(args, "out_of_scope", False),
    )
    return read(path, file_format(path, args.format), columns)


def _rejected_path(args: argparse.Namespace, path: Path) -> Path:
    if args.rejected:
        return Path(args.rejected)
    return path.with_name(f"{path.stem}.rejected{path.suffix}")


def _write_rejected(
    args: argparse.Namespace, path: Path, table: Table, summary: Summary
) -> Path | None:
    """Writes the rejected rows out for fixing; where it cannot, says so (the summary still
    counts them) and returns None."""
    rejected_to = _rejected_path(args, path)
    ordered = sorted(summary.rejected, key=lambda item: item.line)
    try:
        write_rejected(rejected_to, table, ordered)
    except OSError as error:
        _note(
            f"cannot write the rejected rows to {str(rejected_to)!r}: {error.strerror}; "
            "name a writable file with --rejected"
        )
        return None
    return rejected_to


def _prepare(client: Client, name: str, table: Table) -> str:
    """Creates the classifier from an export's header, or checks that it exists; returns the
    embedder fingerprint to send the export's vectors with ("": embed the texts)."""
    if table.header is not None:
        restore = _archive.plan_restore(table.header, name, client.get_service_info())
        client.create_classifier(name, exist_ok=True, **restore.settings)
        for note in restore.notes:
            _note(note)
        return restore.vectors_fingerprint
    try:
        client.get_classifier(name)
    except NotFoundError as error:
        hint = f"; create it first: knn-classifier create {name} --instruction '...'"
        raise NotFoundError(error.code, error.details + hint) from None
    return ""


def _print_summary(
    name: str, summary: Summary, seconds: float, rejected_to: Path | None, as_json: bool
) -> None:
    written = summary.added + summary.updated
    if as_json:
        result = {**summary.as_dict(), "seconds": round(seconds, 3)}
        result["rejected_file"] = str(rejected_to) if rejected_to else None
        print(_json(result))
        return
    rate = f", {written / seconds:.0f} rows/s" if seconds > 0 and written else ""
    print(f"import into {name!r}: {seconds:.1f} s{rate}")
    for what, count in [
        ("added", summary.added),
        ("updated", summary.updated),
        ("unchanged", summary.unchanged),
        ("duplicates", summary.duplicates),
        ("rejected", len(summary.rejected)),
    ]:
        print(f"  {what:<10} {count:>8}")
    if summary.duplicates:
        print("  (duplicates: rows whose id, or text, a later row repeats; the later row won)")
    for reason, count in summary.reasons()[:10]:
        print(f"  {count:>8}  {reason}")
    if rejected_to:
        print(f"  rejected rows written to {rejected_to}")


def import_rows(args: argparse.Namespace, client: Client) -> int:
    path = Path(args.file)
    table = _read_table(args, path, args.id_column, args.metadata_columns)
    vectors_fingerprint = _prepare(client, args.name, table)
    summary = Summary(rejected=list(table.rejected))
    importer = Importer(
        client,
        args.name,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        page_size=args.page_size,
        vectors_fingerprint=vectors_fingerprint,
    )
    started = time.monotonic()
    to_send, existed = importer.plan(table.rows, summary)
    bar = _progress.bar(len(to_send), "rows", f"import {args.name}", args.progress)
    rejected_to: Path | None = None
    try:
        importer.run(to_send, existed, summary, bar)
    except KnnClassifierError:
        _note("import stopped; what is counted below was written: run the same command to resume")
        raise
    finally:
        bar.close()
        if summary.rejected:
            rejected_to = _write_rejected(args, path, table, summary)
        _print_summary(args.name, summary, time.monotonic() - started, rejected_to, args.json)
    return REJECTED_ROWS if summary.rejected else 0


def export(args: argparse.Namespace, client: Client) -> int:
    classifier = client.get_classifier(args.name)
    bar = _progress.bar(
        classifier.exemplar_count, "exemplars", f"export {args.name}", args.progress
    )
    written = 0
    try:
        if args.output is None:
            for count in _archive.export(
                client, classifier, sys.stdout, args.page_size, args.vectors
            ):
                written += count
                bar.update(count)
        else:
            # Written beside and renamed at the end: an interrupted export leaves no short file.
            partial = Path(f"{args.output}.partial")
            try:
                with partial.open("w", encoding="utf-8") as out:
                    for count in _archive.export(
                        client, classifier, out, args.page_size, args.vectors
                    ):
                        written += count
                        bar.update(count)
                os.replace(partial, args.output)
            except OSError as error:
                if partial.is_file():
                    partial.unlink()
                raise CliError(f"cannot write {args.output!r}: {error.strerror}") from None
    finally:
        bar.close()
    _note(f"exported {written} exemplar(s) of {args.name!r} to {args.output or 'stdout'}")
    return 0


# Classify and evaluate -----------------------------------------------------------------------


def _texts(args: argparse.Namespace) -> Iterator[list[str]]:
    """The texts in batches: the arguments, else the lines of stdin as they arrive."""
    source = iter(args.texts) if args.texts else _stdin_lines()
    while batch := list(islice(source, args.batch_size)):
        yield batch


def _stdin_lines() -> Iterator[str]:
    try:
        for number, line in enumerate(sys.stdin, start=1):
            text = line.rstrip("\r\n")
            if not is_unicode(text):  # bytes that are not UTF-8, read with surrogateescape
                raise CliError(f"line {number} of stdin is not UTF-8 text")
            yield text
    except UnicodeDecodeError as error:
        raise CliError(f"stdin is not UTF-8 text: {error.reason} at byte {error.start}") from None


def classify(args: argparse.Namespace, client: Client) -> int:
    for texts in _texts(args):
        predictions = client.classify_batch(
            args.name,
            texts,
            k=args.k,
            dimension=args.dimension,
            voting=args.voting,
            min_similarity=args.min_similarity,
            min_confidence=args.min_confidence,
            temperature=args.temperature,
            include_neighbours=args.neighbours,
        )
        for text, prediction in zip(texts, predictions, strict=True):
            if isinstance(prediction, KnnClassifierError):
                error = {
                    "code": prediction.code.name,
                    "reason": prediction.reason,
                    "message": prediction.details,
                }
                print(_json({"text": text, "error": error}))
            else:
                print(_json({"text": text, **_proto_json(prediction)}))
        sys.stdout.flush()
    return 0


def _usable(path: str, table: Table, what: str) -> Table:
    if table.rejected:
        first = table.rejected[0]
        raise CliError(
            f"{path}: {len(table.rejected)} row(s) without a usable {what} "
            f"(line {first.line}: {first.reason})"
        )
    if not table.rows:  # not quietly leave-one-out, or no out-of-scope measurement
        raise CliError(f"{path} has no rows: give it a {what} per row")
    return table


def _held_out(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``--held-out`` texts with their labels, and apart those of its rows marked out of
    scope (an ``out_of_scope`` column, as in an import file)."""
    if not args.held_out:
        return [], []
    table = _usable(args.held_out, _read_table(args, Path(args.held_out)), "text and label")
    labelled = [(row.text, row.label) for row in table.rows if not row.out_of_scope]
    return labelled, [row.text for row in table.rows if row.out_of_scope]


def _out_of_scope(args: argparse.Namespace) -> list[str]:
    """The texts of ``--out-of-scope``: the file's text column; any label is not read."""
    if not args.out_of_scope_file:
        return []
    if not args.held_out:
        raise CliError(
            "--out-of-scope needs --held-out: texts with labels to tell the out-of-scope ones from"
        )
    path = Path(args.out_of_scope_file)
    # The text column stands in for the label so that a file without labels reads.
    columns = Columns(text=args.text_column, label=args.text_column)
    table = read(path, file_format(path, args.format), columns)
    return [row.text for row in _usable(args.out_of_scope_file, table, "text").rows]


def _result_row(rank: int, result: pb.EvaluationResult) -> list[object]:
    return [
        rank,
        result.k,
        voting_name(result.voting),
        result.dimension,
        _archive.float32(result.temperature),
        round(result.accuracy, 4),
        round(result.macro_f1, 4),
        round(result.coverage, 4),
        round(result.accuracy_on_covered, 4),
        round(result.expected_calibration_error, 4),
        result.evaluated,
    ]


def _rule(rule: pb.OutOfScopeThreshold) -> str:
    return (
        f"threshold {rule.threshold:.4g} at dimension {rule.dimension}, fitted to keep "
        f"{rule.target_coverage:.3g} of in-scope texts (keeps {rule.coverage:.4f} of "
        "leave-one-out)"
    )


def _print_out_of_scope(response: pb.EvaluateResponse) -> None:
    """How each setting told the texts marked out of scope from the in-scope ones, and the
    out-of-scope rule it applied: the classifier's, or the one apply_best would fit."""
    measured = [
        (rank, r.out_of_scope)
        for rank, r in enumerate(response.results, start=1)
        if r.HasField("out_of_scope")
    ]
    if not measured:
        return
    first = measured[0][1]
    print(
        f"\nout of scope: {first.out_of_scope_texts} texts marked out of scope, "
        f"{first.in_scope_texts} in scope"
    )
    own = response.classifier.out_of_scope_threshold
    fitted = response.classifier.HasField("out_of_scope_threshold")
    rows = [
        [
            rank,
            round(m.recall, 4),
            round(m.in_scope_coverage, 4),
            round(m.in_scope_accuracy, 4),
            round(m.auroc, 4),
            round(m.top_similarity_auroc, 4),
            float(f"{m.threshold.threshold:.4g}"),
            round(m.threshold.target_coverage, 4),
            m.threshold.dimension,
            "fitted" if fitted and m.threshold.dimension == own.dimension else "not fitted",
        ]
        for rank, m in measured
    ]
    header = ["#", "recall", "in_coverage", "in_accuracy", "AUROC", "top_sim_AUROC"]
    print(_table([*header, "threshold", "target", "dim", "rule"], rows))
    print(
        "(recall: share of the out-of-scope texts answered unknown; AUROC: of the out-of-scope\n"
        " score, top_sim_AUROC: of the top similarity alone; rule: the classifier's fitted\n"
        " threshold, or not fitted: the one --apply-best would fit, which Classify does not apply)"
    )


def evaluate(args: argparse.Namespace, client: Client) -> int:
    labelled, marked = _held_out(args)
    response = client.evaluate(
        args.name,
        held_out=labelled,
        out_of_scope=marked + _out_of_scope(args),
        k=args.k,
        voting=args.voting,
        dimension=args.dimension,
        temperature=args.temperature,
        apply_best=args.apply_best,
        target_precision=args.target_precision,
        target_coverage=args.target_coverage,
        leave_out_twins=False if args.keep_twins else None,
    )
    if args.json:
        print(_json(_proto_json(response), indent=2))
        return 0
    header = ["#", "k", "voting", "dim", "T", "accuracy", "macro_f1", "coverage"]
    header += ["acc_covered", "ECE", "texts"]
    rows = [_result_row(rank, r) for rank, r in enumerate(response.results, start=1)]
    twins = response.HasField("near_duplicates")
    if twins:  # leave-one-out: the other accuracy beside the one that ranks the settings
        header.append("acc_no_twins" if args.keep_twins else "acc_with_twins")
        for row, r in zip(rows, response.results, strict=True):
            other = r.accuracy_without_twins if args.keep_twins else r.accuracy_with_twins
            row.append(round(other, 4))
    print(_table(header, rows))
    print("(#1 is the recommended setting)")
    if twins:
        near = response.near_duplicates
        how = (
            "accuracy leaves each exemplar out alone; acc_no_twins leaves its twins out too"
            if args.keep_twins
            else "accuracy leaves its twins out with each exemplar; acc_with_twins does not"
        )
        print(
            f"twins: {near.share:.1%} of the {near.sampled} exemplars left out have one (an "
            f"exemplar of their label more similar than {near.similarity:.4f} at dimension "
            f"{near.dimension});\n{how}: near-paraphrases answer for each other, not for new "
            "texts"
        )
    if response.results and response.results[0].top_confusions:
        print("\ntop confusions of #1:")
        confusions = [
            [c.count, c.true_label, c.predicted_label] for c in response.results[0].top_confusions
        ]
        print(_table(["count", "true", "predicted"], confusions))
    _print_out_of_scope(response)
    if response.unknown_labels:
        print(f"\nheld-out labels without exemplars: {', '.join(response.unknown_labels)}")
    if args.apply_best:
        applied = _archive.describe(response.classifier)
        settings = ", ".join(
            f"{key}={applied[key]}"
            for key in (
                "k",
                "voting",
                "temperature",
                "dimension",
                "min_similarity",
                "min_confidence",
            )
        )
        print(f"\napplied to {args.name!r}: {settings}, calibrated={applied['calibrated']}")
        if response.classifier.HasField("out_of_scope_threshold"):
            print(f"out-of-scope rule: {_rule(response.classifier.out_of_scope_threshold)}")
    return 0


def _listed(title: str, shown: int, found: int) -> str:
    more = f" (the first {shown})" if shown < found else ""
    return f"\n{title}: {found}{more}"


def check(args: argparse.Namespace, client: Client) -> int:
    response = client.check_exemplars(
        args.name,
        min_confidence=args.min_confidence,
        min_duplicate_similarity=args.min_duplicate_similarity,
        min_label_exemplars=args.min_label_exemplars,
        max_items=args.max_items or 0,
    )
    if args.json:
        print(_json(_proto_json(response), indent=2))
        return 0
    print(
        f"checked {response.checked} of {response.exemplar_count} exemplars by leave-one-out "
        f"(k={response.k}, voting={voting_name(response.voting)}, "
        f"dimension={response.dimension})"
    )
    mislabelled = response.likely_mislabelled_exemplars
    found = response.likely_mislabelled_exemplars_found
    print(_listed("likely mislabelled", len(mislabelled), found))
    if mislabelled:
        rows = [
            [
                m.exemplar.id,
                m.exemplar.label,
                m.voted_label,
                round(m.confidence, 3),
                m.exemplar.text,
            ]
            for m in mislabelled
        ]
        print(_table(["id", "label", "voted", "confidence", "text"], rows))
    duplicates = response.duplicates
    print(_listed("near-duplicates across labels", len(duplicates), response.duplicates_found))
    if duplicates:
        rows = [
            [round(d.similarity, 3), d.first.label, d.first.text, d.second.label, d.second.text]
            for d in duplicates
        ]
        print(_table(["similarity", "label", "text", "other label", "other text"], rows))
    overlaps = response.overlapping_labels
    print(_listed("overlapping labels", len(overlaps), response.overlapping_labels_found))
    if overlaps:
        rows = [
            [
                o.first_label,
                o.second_label,
                o.first_as_second,
                o.second_as_first,
                round(o.first_errors_share, 3),
                round(o.second_errors_share, 3),
                round(o.centroid_similarity, 3),
            ]
            for o in overlaps
        ]
        header = ["label", "other", "as_other", "other_as", "errors_share", "other_share"]
        print(_table([*header, "centroid_sim"], rows))
    small = response.small_labels
    print(_listed("labels with too few exemplars", len(small), response.small_labels_found))
    if small:
        print(_table(["label", "exemplars"], [[c.label, c.count] for c in small]))
    if response.out_of_scope_exemplars:
        vetoed = response.exemplars_nearest_out_of_scope
        title = "answered unknown: an out-of-scope example is nearest"
        print(_listed(title, len(vetoed), response.exemplars_nearest_out_of_scope_found))
        if vetoed:
            print(_table(["id", "label", "text"], [[e.id, e.label, e.text] for e in vetoed]))
    return 0
