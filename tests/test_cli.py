"""The knn-classifier command line, run as a subprocess against the real server."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from knn_classifier.client import Client, ExemplarInput
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_open_set_api import FAR_TEXT, foreign_texts, topical_texts

CLI = [sys.executable, "-m", "knn_classifier.client.cli"]
CSV_ROWS = [
    ["text", "category", "source"],
    ["my card has not arrived", "card_arrival", "app"],
    ["when will my new card arrive", "card_arrival", "app"],
    ["", "top_up", "web"],  # line 4: no text
    ["I want to top up my account", "top_up", "web"],
    ["top up failed twice", "top_up"],  # line 6: a field short
    ["x" * 9000, "top_up", "web"],  # line 7: over the server's 8192 characters
    ["how do I top up with a bank transfer", "top_up", "email"],
    ["my card has not arrived", "card_arrival", "email"],  # line 9: repeats line 2's text
]


def run(
    server: ServerThread, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--target", server.address, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str], status: int = 0) -> str:
    assert result.returncode == status, result.stderr
    return result.stdout


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    return path


def exemplars(client: Client, name: str) -> list[tuple[str, str, str, dict[str, str]]]:
    page = client.list_exemplars(name, page_size=1000)
    assert not page.next_page_token
    items = [(e.id, e.text, e.label, dict(e.metadata)) for e in page.exemplars]
    return sorted(items)


@pytest.fixture
def rows_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "rows.csv", CSV_ROWS)


@pytest.fixture
def created(server: ServerThread) -> Iterator[Client]:
    ok(run(server, "create", "intents", "--k", "3"))
    with server.client() as client:
        yield client


def import_rows(server: ServerThread, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        server, "import", "intents", str(path), "--label-column", "category",
        "--metadata-columns", "source", "--json", *extra,
    )  # fmt: skip


def test_import_reports_added_duplicate_and_rejected_rows_and_writes_them_out(
    server: ServerThread, created: Client, rows_csv: Path
) -> None:
    summary = json.loads(ok(import_rows(server, rows_csv), status=3))
    assert summary["added"] == 4
    assert (summary["updated"], summary["unchanged"], summary["duplicates"]) == (0, 0, 1)
    assert summary["rejected"] == 3
    assert summary["reasons"] == {
        "'text' is empty": 1,
        "has 2 fields; the header has 3": 1,
        "INVALID_ARGUMENT: text has 9000 characters; the limit is 8192": 1,
    }
    rejected = list(csv.reader((rows_csv.parent / "rows.rejected.csv").read_text().splitlines()))
    assert rejected[0] == ["line", "error", "text", "category", "source"]
    assert [(r[0], r[2:]) for r in rejected[1:]] == [
        ("4", CSV_ROWS[3]), ("6", CSV_ROWS[5]), ("7", CSV_ROWS[6]),
    ]  # fmt: skip
    assert created.list_labels("intents") == {"card_arrival": 2, "top_up": 2}
    # The later of the two rows with the same text won.
    stored = {text: metadata for _, text, _, metadata in exemplars(created, "intents")}
    assert stored["my card has not arrived"] == {"source": "email"}


def test_import_resumes_without_duplicates_or_embedding_again(
    server: ServerThread, created: Client, rows_csv: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    # An import cut short after its first rows, then the whole file: the rest is added.
    first_rows = write_csv(rows_csv.parent / "first.csv", CSV_ROWS[:3])
    assert json.loads(ok(import_rows(server, first_rows)))["added"] == 2
    summary = json.loads(ok(import_rows(server, rows_csv), status=3))
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (2, 1, 1)
    before = exemplars(created, "intents")
    assert len(before) == 4

    calls = fake_embedder.behaviour.calls
    summary = json.loads(ok(import_rows(server, rows_csv), status=3))
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 0, 4)
    assert fake_embedder.behaviour.calls == calls, "unchanged rows were sent again"
    assert exemplars(created, "intents") == before

    relabelled = [row[:] for row in CSV_ROWS]
    relabelled[4][1] = "deposit"
    summary = json.loads(ok(import_rows(server, write_csv(rows_csv, relabelled)), status=3))
    assert (summary["added"], summary["updated"], summary["unchanged"]) == (0, 1, 3)
    assert created.list_labels("intents") == {"card_arrival": 2, "top_up": 1, "deposit": 1}


def test_import_text_summary_and_progress_bar(
    server: ServerThread, created: Client, rows_csv: Path
) -> None:
    result = run(
        server, "import", "intents", str(rows_csv), "--label-column", "category",
        "--rejected", str(rows_csv.parent / "bad.csv"), "--progress", "--batch-size", "2",
    )  # fmt: skip
    out = ok(result, status=3)
    assert "  added             4\n" in out
    assert "  rejected          3\n" in out
    assert f"rejected rows written to {rows_csv.parent / 'bad.csv'}" in out
    assert "5/5" in result.stderr  # 4 written, 1 rejected by the server
    assert "rows/s" in result.stderr


def test_import_of_jsonl_with_ids_metadata_and_bad_lines(
    server: ServerThread, created: Client, tmp_path: Path
) -> None:
    lines = [
        json.dumps({"text": "card lost", "label": "lost", "id": "a1", "metadata": {"n": 1}}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "found it", "label": "found", "src": "mail"}),
        json.dumps({"text": "no label here"}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run(server, "import", "intents", str(path), "--metadata-columns", "src", "--json")
    summary = json.loads(ok(result, status=3))
    assert (summary["added"], summary["rejected"]) == (2, 3)
    stored = exemplars(created, "intents")
    assert ("a1", "card lost", "lost", {"n": "1"}) in stored
    assert any(e[1:] == ("found it", "found", {"src": "mail"}) for e in stored)
    rejected = [
        json.loads(line) for line in (tmp_path / "rows.rejected.jsonl").read_text().splitlines()
    ]
    assert [(r["line"], r["row"]) for r in rejected] == [
        (2, "{not json"), (3, '["a", "list"]'), (5, {"text": "no label here"}),
    ]  # fmt: skip
    assert rejected[2]["error"] == "no 'label'"


def test_import_retries_an_unavailable_server_and_stops_when_it_stays_down(
    server: ServerThread, created: Client, rows_csv: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    # The server retries the embedder once: two failures make one UNAVAILABLE answer.
    fake_embedder.reset(fail_status=503, fail_times=2)
    assert json.loads(ok(import_rows(server, rows_csv), status=3))["added"] == 4

    fake_embedder.reset(fail_status=503, fail_times=1000)
    other = write_csv(rows_csv.parent / "other.csv", [CSV_ROWS[0], ["a new text", "x", "s"]])
    result = import_rows(server, other)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("knn-classifier: error: UNAVAILABLE: ")
    assert "run the same command to resume" in result.stderr
    assert json.loads(result.stdout)["added"] == 0


def test_import_into_a_missing_classifier_says_how_to_create_it(
    server: ServerThread, rows_csv: Path
) -> None:
    result = run(server, "import", "nope", str(rows_csv), "--label-column", "category")
    assert result.returncode == 1
    assert result.stderr.startswith("knn-classifier: error: NOT_FOUND: classifier 'nope'")
    assert "knn-classifier create nope" in result.stderr


def test_import_names_missing_columns(
    server: ServerThread, created: Client, rows_csv: Path
) -> None:
    result = run(server, "import", "intents", str(rows_csv))
    assert result.returncode == 1
    assert "column(s) 'label' not in the header (text, category, source)" in result.stderr


def test_export_then_import_into_another_classifier(
    either_store: ServerThread, tmp_path: Path
) -> None:
    server = either_store
    with server.client() as client:
        client.create_classifier(
            "source", instruction="Sort it", k=3, voting="softmax", temperature=0.03,
            min_similarity=0.1,
        )  # fmt: skip
        client.add_exemplars(
            "source",
            [
                ExemplarInput(text="card has not arrived", label="card", id="c1"),
                ExemplarInput(text="top up failed", label="top_up", metadata={"k": "v"}),
                ("top up by transfer", "top_up"),
                ("where is my card", "card"),
            ],
        )
        export = tmp_path / "source.jsonl"
        ok(run(server, "export", "source", "-o", str(export), "--page-size", "3"))
        header = json.loads(export.read_text().splitlines()[0])
        assert header["format"] == "knn-classifier-export"
        assert header["version"] == 2
        settings = header["classifier"]
        assert (settings["k"], settings["voting"], settings["temperature"]) == (3, "softmax", 0.03)
        assert (settings["min_similarity"], settings["instruction"]) == (0.1, "Sort it")
        assert (
            ok(run(server, "export", "source")).splitlines()[1:]
            == (export.read_text().splitlines()[1:])
        )

        summary = json.loads(ok(run(server, "import", "copy", str(export), "--json")))
        assert summary["added"] == 4
        assert exemplars(client, "copy") == exemplars(client, "source")
        copy, source = client.get_classifier("copy"), client.get_classifier("source")
        for field in ("instruction", "k", "voting", "min_similarity", "temperature"):
            assert getattr(copy, field) == getattr(source, field), field

        again = json.loads(ok(run(server, "import", "copy", str(export), "--json")))
        assert (again["added"], again["unchanged"]) == (0, 4)
        # The export's settings are a create with exist_ok: a different classifier is refused.
        client.create_classifier("other", k=5)
        result = run(server, "import", "other", str(export))
        assert result.returncode == 1
        assert "ALREADY_EXISTS: classifier 'other' exists with other settings" in result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", "5", 'classifier.k is "5", not an integer'),
        ("k", 2**40, "classifier.k is 1099511627776, not an integer"),
        ("voting", "sofmax", 'classifier.voting is "sofmax", not one of majority'),
        ("min_similarity", [0.1], "classifier.min_similarity is [0.1], not a number"),
        # A JSON integer past a double's range: OverflowError building the request.
        pytest.param(
            "temperature", 10**400, "classifier.temperature is 100000000000", id="temperature-huge"
        ),
        (
            "calibration",
            {
                "dimension": 64,
                "shares": [0.5],
                "probabilities": [0.5],
                "label_temperature": 10**400,
            },
            "classifier.calibration.label_temperature is 1000000",
        ),
        pytest.param(
            "out_of_scope_rule",
            {"dimension": 64, "threshold": 10**400},
            "out_of_scope_rule is malformed: int too large to convert to float",
            id="rule-threshold-huge",
        ),
        ("instruction", 7, "classifier.instruction is 7, not a string"),
        ("calibration", [0.5], "classifier.calibration is [0.5], not an object"),
        ("calibration", {"dimension": 64, "shares": "0.5"}, "calibration.shares is"),
        ("calibration", {"dimension": 64}, "calibration must have 1 to 64 shares"),  # server
        ("embedder", "fake", 'embedder is "fake", not an object'),
        ("vector_dimensions", "64", 'vector_dimensions is "64", not a list of integers'),
    ],
)
def test_an_export_header_of_the_wrong_types_stops_the_import_with_a_line_naming_the_field(
    server: ServerThread, created: Client, tmp_path: Path, field: str, value: object, message: str
) -> None:
    """The header is a line anyone can edit; a field of the wrong type made the import die with
    a Python traceback (TypeError, AttributeError, ValueError) from building the request."""
    created.add_exemplars("intents", [("card has not arrived", "card"), ("top up", "top_up")])
    export = tmp_path / "intents.jsonl"
    ok(run(server, "export", "intents", "-o", str(export)))
    header, *lines = export.read_text().splitlines()
    head = json.loads(header)
    if field in ("embedder", "vector_dimensions"):
        head[field] = value
    else:
        head["classifier"][field] = value
    export.write_text("\n".join([json.dumps(head), *lines]) + "\n")
    result = run(server, "import", "copy", str(export))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("knn-classifier: error: ")
    assert message in result.stderr
    assert [c.name for c in created.list_classifiers()] == ["intents"]


def test_files_that_cannot_be_written_are_named_without_a_traceback(
    server: ServerThread, created: Client, rows_csv: Path, tmp_path: Path
) -> None:
    """An export to a missing directory or onto a directory, and an import whose rejected rows
    cannot be written where --rejected says, died with a Python traceback (the import's also
    without its summary, though its rows were written)."""
    missing = tmp_path / "missing" / "out.jsonl"
    result = run(server, "export", "intents", "-o", str(missing))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"knn-classifier: error: cannot write {str(missing)!r}: No such file" in result.stderr
    result = run(server, "export", "intents", "-o", str(tmp_path))
    assert result.returncode == 1
    assert f"cannot write {str(tmp_path)!r}: Is a directory" in result.stderr
    assert not Path(f"{tmp_path}.partial").exists()

    result = import_rows(server, rows_csv, "--rejected", str(tmp_path / "missing" / "r.csv"))
    assert result.returncode == 3  # rows rejected
    assert "Traceback" not in result.stderr
    assert "cannot write the rejected rows to" in result.stderr
    assert "name a writable file with --rejected" in result.stderr
    assert json.loads(result.stdout)["added"] == 4
    assert json.loads(result.stdout)["rejected_file"] is None
    assert len(exemplars(created, "intents")) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "intents", "--max-items", "99999999999"], "--max-items: expected a whole"),
        (["evaluate", "intents", "--k", "5,99999999999"], "--k: 99999999999 is out of range"),
        (["classify", "intents", "x", "--dimension", "4294967360"], "--dimension: 4294967360"),
        (["check", "intents", "--min-label-exemplars", "-3000000000"], "-3000000000 is out"),
        (["create", "other", "--k", "2147483648"], "--k: 2147483648 is out of range"),
    ],
)
def test_numbers_too_large_for_the_request_are_refused_as_arguments(
    server: ServerThread, created: Client, args: list[str], message: str
) -> None:
    """Numbers past int32 passed argparse and failed building the request: a traceback
    (ValueError: Value out of range)."""
    result = run(server, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_a_held_out_or_out_of_scope_file_without_rows_is_refused(
    server: ServerThread, created: Client, tmp_path: Path
) -> None:
    """A held-out file of a header alone sent no texts, so Evaluate quietly ran leave-one-out
    and printed its table as if it were the file's; an out-of-scope file without rows quietly
    measured nothing of out of scope."""
    created.add_exemplars("intents", [("card has not arrived", "card"), ("top up", "top_up")])
    created.add_exemplars("intents", [("where is my card", "card"), ("top up failed", "top_up")])
    empty = write_csv(tmp_path / "empty.csv", [["text", "label"]])
    held = write_csv(tmp_path / "held.csv", [["text", "label"], ["my card", "card"]])
    for args in (
        ["--held-out", str(empty)],
        ["--held-out", str(held), "--out-of-scope", str(empty)],
    ):
        result = run(server, "evaluate", "intents", *args)
        assert result.returncode == 1, result.stdout
        assert f"knn-classifier: error: {empty} has no rows: give it a text" in result.stderr
    assert ok(run(server, "evaluate", "intents", "--held-out", str(held)))


@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-5"])
def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused(
    server: ServerThread, timeout: str
) -> None:
    """--timeout nan or inf failed every call at once with DEADLINE_EXCEEDED and the advice to
    give it more seconds; 0 or a negative one with UNAVAILABLE."""
    for result in (
        run(server, "--timeout", timeout, "list"),
        run(server, "list", env={"KNN_TIMEOUT": timeout}),
    ):
        assert result.returncode == 1
        assert f"the timeout {timeout} is not a positive number of seconds" in result.stderr


def test_input_that_is_not_unicode_text_is_refused_or_rejected_by_row(
    server: ServerThread, created: Client, tmp_path: Path
) -> None:
    """Bytes that are not UTF-8 on stdin or in an argument, and JSONL rows with a lone surrogate
    escape, nesting deeper than the JSON parser's recursion or an integer of 5,000 digits, each
    ended the CLI with a traceback (the import after printing a summary of nothing written)."""
    cli: list[str | bytes] = [*CLI, "--target", server.address]
    runs: list[tuple[list[str | bytes], bytes]] = [
        ([*cli, "classify", "intents"], b"fine\n\xff\xfe not utf-8\n"),
        ([*cli, "exemplars", "intents", "--label", b"\xff"], b""),
    ]
    for args, stdin in runs:
        done = subprocess.run(args, input=stdin, capture_output=True, timeout=120, check=False)
        stderr = done.stderr.decode()
        assert done.returncode == 1
        assert "Traceback" not in stderr
        assert "is not UTF-8 text" in stderr

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"text": "lone \\ud800 surrogate", "label": "card"}\n'
        + '{"text": '
        + "[" * 100_000
        + "]" * 100_000
        + ', "label": "card"}\n'
        + '{"text": "long number", "label": '
        + "9" * 5000
        + "}\n"
        + '{"text": "my card has not arrived", "label": "card"}\n'
    )
    result = run(server, "import", "intents", str(rows), "--json")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["added"], summary["rejected"]) == (1, 3)
    reasons = " ".join(summary["reasons"])
    assert "lone surrogate" in reasons
    assert "not valid JSON" in reasons
    rejected = (tmp_path / "rows.rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["line"] for line in rejected] == [1, 2, 3]
    assert json.loads(rejected[0])["row"]["text"] == "lone \ud800 surrogate"
    assert [e.text for e in created.iter_exemplars("intents")] == ["my card has not arrived"]


def test_import_of_a_calibrated_export_says_how_to_calibrate_again(
    server: ServerThread, tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Into a server of another embedder the calibration cannot hold: the import says how to
    fit it there (tests/test_transfer.py: into the same embedder it is restored)."""
    with server.client() as client:
        client.create_classifier("tuned")
        client.add_exemplars(
            "tuned",
            [("card not here", "card"), ("card missing", "card"), ("top up", "top_up"),
             ("top up failed", "top_up")],
        )  # fmt: skip
    out = ok(run(server, "evaluate", "tuned", "--k", "1,3", "--apply-best"))
    assert "calibrated=True" in out
    export = tmp_path / "tuned.jsonl"
    ok(run(server, "export", "tuned", "-o", str(export)))
    settings = make_settings(tmp_path / "other", fake_embedder.base_url, embedding={"model": "v2"})
    other = ServerThread(settings).start()
    try:
        result = run(other, "import", "restored", str(export))
    finally:
        other.stop()
    ok(result)
    assert "run `knn-classifier evaluate restored --apply-best`" in result.stderr


def test_classifier_commands(server: ServerThread) -> None:
    shown = json.loads(ok(run(server, "create", "c", "--k", "5", "--voting", "softmax")))
    assert (shown["name"], shown["k"], shown["voting"]) == ("c", 5, "softmax")
    assert json.loads(ok(run(server, "create", "c", "--k", "5"))) == shown
    result = run(server, "create", "c", "--k", "7")
    assert result.returncode == 1
    assert result.stderr == (
        "knn-classifier: error: ALREADY_EXISTS: classifier 'c' exists with other settings: "
        "k is 5, not 7. Create it with the settings it has, or delete it first\n"
    )
    result = run(server, "create", "c", "--fail-if-exists")
    assert result.returncode == 1
    assert "ALREADY_EXISTS: classifier 'c' already exists" in result.stderr

    with server.client() as client:
        client.add_exemplars("c", [("a b", "x"), ("c d", "y"), ("e f", "y")])
    assert json.loads(ok(run(server, "show", "c")))["exemplar_count"] == 3
    listed = ok(run(server, "list")).splitlines()
    assert listed[0].split() == [
        "name",
        "exemplar_count",
        "k",
        "voting",
        "temperature",
        "calibrated",
    ]
    assert listed[1].split() == ["c", "3", "5", "softmax", "0.05", "False"]
    assert [
        json.loads(line)["name"] for line in ok(run(server, "list", "--json")).splitlines()
    ] == ["c"]
    assert json.loads(ok(run(server, "labels", "c", "--json"))) == {"y": 2, "x": 1}
    assert ok(run(server, "labels", "c")).splitlines() == ["count  label", "    2  y", "    1  x"]
    assert ok(run(server, "delete", "c")) == "deleted classifier 'c' and its 3 exemplar(s)\n"
    result = run(server, "show", "c")
    assert result.returncode == 1
    assert result.stderr == "knn-classifier: error: NOT_FOUND: classifier 'c' does not exist\n"


def test_classify_from_arguments_and_stdin(server: ServerThread, created: Client) -> None:
    created.add_exemplars("intents", [("card not here", "card"), ("top up failed", "top_up")])
    lines = ok(run(server, "classify", "intents", "top up please", "my card", "--neighbours"))
    answers = [json.loads(line) for line in lines.splitlines()]
    assert [(a["text"], a["label"]) for a in answers] == [
        ("top up please", "top_up"), ("my card", "card"),
    ]  # fmt: skip
    assert answers[0]["neighbours"][0]["text"] == "top up failed"

    out = ok(run(server, "classify", "intents", "--batch-size", "2", stdin="top up\n\ncard\n"))
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["text"] for a in answers] == ["top up", "", "card"]
    assert answers[1]["error"]["code"] == "INVALID_ARGUMENT"
    assert answers[2]["label"] == "card"


def test_evaluate_table_and_json(server: ServerThread, created: Client, tmp_path: Path) -> None:
    created.add_exemplars(
        "intents",
        [("card not here", "card"), ("card missing", "card"), ("top up", "top_up"),
         ("top up failed", "top_up")],
    )  # fmt: skip
    out = ok(run(server, "evaluate", "intents", "--k", "1,3", "--voting", "majority,softmax"))
    lines = out.splitlines()
    assert lines[0].split() == [
        "#", "k", "voting", "dim", "T", "accuracy", "macro_f1", "coverage", "acc_covered",
        "ECE", "texts", "acc_with_twins",
    ]  # fmt: skip
    assert len([line for line in lines[1:] if line[:1].isdigit()]) == 4
    plain = ok(run(server, "evaluate", "intents", "--k", "1", "--keep-twins")).splitlines()
    assert plain[0].split()[-1] == "acc_no_twins"
    assert "accuracy leaves each exemplar out alone" in plain[-1]
    held_out = write_csv(tmp_path / "held.csv", [["text", "label"], ["card gone", "card"]])
    response = json.loads(
        ok(run(server, "evaluate", "intents", "--held-out", str(held_out), "--json"))
    )
    assert response["results"][0]["evaluated"] == "1"
    assert response["classifier"]["name"] == "intents"
    bad = write_csv(tmp_path / "bad.csv", [["text", "label"], ["", "card"]])
    result = run(server, "evaluate", "intents", "--held-out", str(bad))
    assert result.returncode == 1
    assert "1 row(s) without a usable text and label (line 2: 'text' is empty)" in result.stderr


def test_connection_from_environment_and_its_failures(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(
        tmp_path / "data", fake_embedder.base_url, auth={"write_keys": ["s3cret"]}
    )
    server = ServerThread(settings).start()
    try:
        result = run(server, "list")
        assert result.returncode == 1
        assert result.stderr.startswith("knn-classifier: error: UNAUTHENTICATED: ")
        env = {"KNN_TARGET": server.address, "KNN_API_KEY": "s3cret"}
        listing = subprocess.run(
            [*CLI, "list", "--json"], env={**os.environ, **env}, capture_output=True, check=False
        )
        assert listing.returncode == 0
        # Connection flags may also follow the command.
        after = [*CLI, "list", "--target", server.address, "--api-key", "s3cret"]
        assert subprocess.run(after, capture_output=True, check=False).returncode == 0
    finally:
        server.stop()
    result = run(server, "list")  # stopped: nothing listens there now
    assert result.returncode == 1
    assert result.stderr.startswith("knn-classifier: error: UNAVAILABLE: ")
    assert result.stderr.count("\n") == 1
    result = run(server, "--ca-file", str(tmp_path / "missing.pem"), "list")
    assert result.returncode == 1
    assert "cannot read the CA file" in result.stderr


def test_installed_entry_point_and_runs_without_tqdm(
    server: ServerThread, created: Client, rows_csv: Path
) -> None:
    script = Path(sys.executable).with_name("knn-classifier")
    assert script.exists(), "the client distribution installs the knn-classifier script"
    result = subprocess.run(
        [str(script), "--target", server.address, "list", "--json"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert json.loads(ok(result))["name"] == "intents"
    # Without the [cli] extra: no bar, a hint, and the import still works.
    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "from knn_classifier.client.cli import main\n"
        "raise SystemExit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--target", server.address, "import", "intents",
         str(rows_csv), "--label-column", "category", "--progress", "--json"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert json.loads(ok(result, status=3))["added"] == 4
    assert "pip install tqdm" in result.stderr  # not a package name that no index has


def test_check_report_and_json(server: ServerThread, created: Client) -> None:
    created.add_exemplars(
        "intents",
        [("card not here", "card"), ("card lost", "card"), ("card stolen", "card"),
         ("top up", "top_up"), ("top up failed", "top_up"), ("top up please", "top_up"),
         ("Card lost!", "top_up")],
    )  # fmt: skip
    out = ok(run(server, "check", "intents", "--min-label-exemplars", "4"))
    assert out.startswith("checked 7 of 7 exemplars by leave-one-out (k=3, voting=")
    assert "\nlikely mislabelled: " in out
    assert "\nnear-duplicates across labels: 1\n" in out
    assert [
        line
        for line in out.splitlines()
        if line.strip().startswith("1.0") and "Card lost!" in line and "card lost" in line
    ]
    assert "\nlabels with too few exemplars: 1\n" in out
    assert out.splitlines()[-1].split() == ["card", "3"]

    response = json.loads(ok(run(server, "check", "intents", "--max-items", "1", "--json")))
    assert len(response["duplicates"]) == 1
    assert response["duplicates"][0]["similarity"] == pytest.approx(1.0)
    assert {response["duplicates"][0][side]["text"] for side in ("first", "second")} == {
        "card lost", "Card lost!",
    }  # fmt: skip
    assert len(response["likely_mislabelled_exemplars"]) <= 1

    missing = run(server, "check", "nothing")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr


OUT_OF_SCOPE_TITLE = "out of scope: 30 texts marked out of scope, 40 in scope"


def test_evaluate_with_out_of_scope_texts_and_target_coverage(
    server: ServerThread, tmp_path: Path
) -> None:
    with server.client() as client:
        client.create_classifier("topics", k=5)
        client.add_exemplars("topics", topical_texts(150, seed=0))
    labelled = [[text, label] for text, label in topical_texts(40, seed=1)]
    held_out = write_csv(tmp_path / "held.csv", [["text", "label"], *labelled])
    outside = tmp_path / "outside.jsonl"  # another format, and labels that are not read
    outside.write_text(
        "".join(json.dumps({"text": t, "label": "oos"}) + "\n" for t in foreign_texts(30, 2))
    )
    common = ["evaluate", "topics", "--held-out", str(held_out), "--out-of-scope", str(outside)]

    response = json.loads(ok(run(server, *common, "--voting", "softmax,centroid", "--json")))
    measured = [r["out_of_scope"] for r in response["results"]]
    assert [(m["out_of_scope_texts"], m["in_scope_texts"]) for m in measured] == [("30", "40")] * 2
    assert all(m["auroc"] > 0.9 for m in measured)
    # The same texts marked in the held-out file itself (an out_of_scope column, as on import).
    marked = write_csv(
        tmp_path / "marked.csv",
        [
            ["text", "label", "out_of_scope"],
            *[[text, label, ""] for text, label in labelled],
            *[[text, "", "true"] for text in foreign_texts(30, 2)],
        ],
    )
    alone = ["evaluate", "topics", "--held-out", str(marked), "--voting", "softmax,centroid"]
    assert [
        r["out_of_scope"] for r in json.loads(ok(run(server, *alone, "--json")))["results"]
    ] == (measured)

    lines = ok(run(server, *common, "--voting", "softmax,centroid")).splitlines()
    title = lines.index(OUT_OF_SCOPE_TITLE)
    assert lines[title + 1].split() == [
        "#", "recall", "in_coverage", "in_accuracy", "AUROC", "top_sim_AUROC", "threshold",
        "target", "dim", "rule",
    ]  # fmt: skip
    rows = [line.split() for line in lines[title + 2 : title + 4]]
    for row, m in zip(rows, measured, strict=True):
        numbers = [float(cell) for cell in row[1:6]]
        expected = [m[f] for f in ("recall", "in_scope_coverage", "in_scope_accuracy", "auroc")]
        assert numbers == pytest.approx([*expected, m["top_similarity_auroc"]], abs=1e-4)
        assert row[7:] == ["0.98", "64", "not", "fitted"]  # what --apply-best would fit

    # --target-coverage fits the classifier's own rule, which the held-out run then applies.
    out = ok(run(server, "evaluate", "topics", "--apply-best", "--target-coverage", "0.9"))
    assert "out-of-scope rule: threshold " in out
    assert "fitted to keep 0.9 of in-scope texts" in out
    with server.client() as client:
        rule = client.get_classifier("topics").out_of_scope_threshold
        assert rule.target_coverage == pytest.approx(0.9)
        assert client.classify("topics", FAR_TEXT).unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    lines = ok(run(server, *common)).splitlines()
    cells = lines[lines.index(OUT_OF_SCOPE_TITLE) + 2].split()
    assert cells[7:] == ["0.9", "64", "fitted"]
    assert float(cells[6]) == pytest.approx(rule.threshold, rel=1e-3)

    refused = run(server, "evaluate", "topics", "--out-of-scope", str(outside))
    assert refused.returncode == 1
    assert "--out-of-scope needs --held-out" in refused.stderr
    refused = run(server, "evaluate", "topics", "--apply-best", "--target-coverage", "0.2")
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stderr
    assert "target_coverage" in refused.stderr
    empty = write_csv(tmp_path / "empty.csv", [["text"], ["fine text"], [""]])
    refused = run(server, *common[:4], "--out-of-scope", str(empty))
    assert refused.returncode == 1
    assert "1 row(s) without a usable text (line 3: 'text' is empty)" in refused.stderr


def test_output_into_a_closed_pipe_ends_quietly(server: ServerThread, created: Client) -> None:
    """`knn-classifier exemplars NAME | head -1`: the reader leaves; no traceback, status 141."""
    created.add_exemplars("intents", [("card not here", "card"), ("top up failed", "top_up")])
    process = subprocess.Popen(
        [*CLI, "--target", server.address, "exemplars", "intents"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the first line is written
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr) == (141, "")


def test_a_line_break_in_a_text_stays_inside_its_table_row(
    server: ServerThread, created: Client
) -> None:
    created.add_exemplars("intents", [("card lost", "card"), ("card\nlost", "top_up")])
    out = ok(run(server, "check", "intents"))
    assert "near-duplicates across labels: 1\n" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("1.0")]
    assert len(rows) == 1
    assert "card\\nlost" in rows[0]
    assert "lost" not in [line.strip() for line in out.splitlines()]


def test_a_call_past_its_deadline_says_how_to_allow_more(
    server: ServerThread, created: Client, fake_embedder: FakeEmbeddingServer
) -> None:
    created.add_exemplars("intents", [("card not here", "card"), ("top up failed", "top_up")])
    gate = fake_embedder.hold()  # the embedder answers nothing until the test lets it
    try:
        result = run(server, "classify", "intents", "where is my card", "--timeout", "1")
    finally:
        gate.set()
    assert result.returncode == 1
    assert result.stderr.startswith("knn-classifier: error: DEADLINE_EXCEEDED: ")
    assert result.stderr.endswith(
        "; give each call more seconds with --timeout (or KNN_TIMEOUT)\n"
    ), result.stderr
