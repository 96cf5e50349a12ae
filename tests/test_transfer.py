"""Whole-classifier export and import: settings, calibration, thresholds, exemplars and vectors.

Two real servers (the source and the target) on the same store kind, both stores; the CLI runs
as a subprocess between them. The fake embedder's call counter shows whether the import embedded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.client import (
    Client,
    ExemplarInput,
    FailedPreconditionError,
    InvalidArgumentError,
)
from knn_classifier.client.cli._errors import CliError
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_cli import ok, run
from .test_evaluate_api import topical_texts

EXEMPLARS = [
    ExemplarInput(text=text, label=label, id=f"x{i}", metadata={"n": str(i)})
    for i, (text, label) in enumerate(
        [
            ("my card has not arrived", "card"),
            ("where is my new card", "card"),
            ("card still missing after a week", "card"),
            ("the card never came", "card"),
            ("top up failed", "top_up"),
            ("how do I top up by transfer", "top_up"),
            ("my top up is pending", "top_up"),
            ("top up did not go through", "top_up"),
            ("I lost my phone", "phone"),
            ("my phone was stolen", "phone"),
            ("phone gone, block the app", "phone"),
            ("someone took my phone", "phone"),
        ]
    )
]
QUERIES = [
    "card not here yet", "top up pending", "stolen phone", "zebra quantum", "card top up",
    "weather rain storm",  # out of scope, by the source's fitted threshold
]  # fmt: skip


class Servers:
    """Starts servers of one store kind, each on its own data directory (or Qdrant)."""

    def __init__(self, kind: str, tmp_path: Path, base_url: str) -> None:
        self._kind = kind
        self._tmp_path = tmp_path
        self._base_url = base_url
        self._running: list[ServerThread] = []

    def start(self, name: str, **overrides: Any) -> ServerThread:
        settings = make_settings(self._tmp_path / name, self._base_url, **overrides)
        store = None
        if self._kind == "qdrant-server":
            store = QdrantServerStore(AsyncQdrantClient(location=":memory:"), "knn")
        server = ServerThread(settings, store).start()
        self._running.append(server)
        return server

    def stop(self) -> None:
        for server in self._running:
            server.stop()


@pytest.fixture(params=["embedded", "qdrant-server"])
def servers(
    request: pytest.FixtureRequest, tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> Iterator[Servers]:
    started = Servers(request.param, tmp_path, fake_embedder.base_url)
    yield started
    started.stop()


def tuned_source(servers: Servers) -> ServerThread:
    """A source server with classifier "intents": defaults tuned, calibrated, thresholds."""
    source = servers.start("source")
    with source.client() as client:
        client.create_classifier("intents", instruction="Sort it", k=3, voting="softmax")
        client.add_exemplars("intents", EXEMPLARS)
        tune(client)
        client.update_classifier("intents", min_similarity=0.2)
        assert client.get_classifier("intents").calibrated
    return source


def tune(client: Client) -> None:
    """12 exemplars: at target_coverage 0.9 the fitted threshold rejects texts; at 0.98 it keeps
    every text (with 12 scores no threshold can promise more than 12 / 13: out_of_scope.fit)."""
    client.evaluate("intents", k=[1, 3], temperature=[0.05], apply_best=True, target_coverage=0.9)


OUT_OF_SCOPE_NOTE = "its out-of-scope threshold was fitted for another embedder"


def answers(client: Client) -> list[pb.Prediction | str]:
    return [
        p if isinstance(p, pb.Prediction) else str(p)
        for p in client.classify_batch("intents", QUERIES, include_neighbours=True)
    ]


def answered_out_of_scope(predictions: list[pb.Prediction | str]) -> list[str]:
    return [
        query
        for query, p in zip(QUERIES, predictions, strict=True)
        if isinstance(p, pb.Prediction) and p.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    ]


def stored(client: Client) -> list[tuple[str, str, str, dict[str, str]]]:
    return sorted(
        (e.id, e.text, e.label, dict(e.metadata)) for e in client.iter_exemplars("intents")
    )


def settings_of(classifier: pb.Classifier) -> tuple[Any, ...]:
    fields = ("instruction", "k", "voting", "temperature", "min_similarity", "min_confidence")
    return (*(getattr(classifier, f) for f in fields), classifier.calibrated)


def test_an_export_with_vectors_imports_into_the_same_embedder_without_embedding(
    servers: Servers, fake_embedder: FakeEmbeddingServer, tmp_path: Path
) -> None:
    source = tuned_source(servers)
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export), "--vectors", "--page-size", "5"))
    head, *lines = (json.loads(line) for line in export.read_text().splitlines())
    assert head["version"] == 2
    assert head["vector_dimensions"] == [16, 64]
    assert head["classifier"]["calibration"]["dimension"] == 64
    assert sorted(lines[0]["vectors"]) == ["16", "64"]

    target = servers.start("target")
    before = fake_embedder.behaviour.calls
    result = run(target, "import", "intents", str(export), "--json", "--batch-size", "5")
    assert fake_embedder.behaviour.calls == before, "the import embedded texts"
    assert json.loads(ok(result))["added"] == len(EXEMPLARS)
    assert result.stderr == ""  # nothing left out
    rule = head["classifier"]["out_of_scope_rule"]
    assert rule["dimension"] == 64
    assert len(rule["similarity_references"]) == len(EXEMPLARS)
    assert len(rule["agreement_references"]) == len(EXEMPLARS)
    assert int(rule["reference_size"]) == len(EXEMPLARS)

    with source.client() as original, target.client() as copy:
        restored = copy.get_classifier("intents")
        assert settings_of(restored) == settings_of(original.get_classifier("intents"))
        assert restored.calibration == original.get_classifier("intents").calibration
        assert restored.dimension == 64  # the calibration's, made explicit
        fitted = original.get_classifier("intents").out_of_scope_threshold
        assert restored.out_of_scope_threshold == fitted  # exactly, references and all
        assert stored(copy) == stored(original)
        expected = answers(original)
        assert answered_out_of_scope(expected) == ["weather rain storm"]
        assert answers(copy) == expected  # no Evaluate run on the copy


def test_a_mixture_classifier_imports_with_the_label_temperature_it_was_calibrated_at(
    servers: Servers, tmp_path: Path
) -> None:
    """Mixture voting's label-model shares use the temperature Evaluate fitted (not the default
    0.01); its calibration maps those shares, so both travel together. Before, the import
    restored the calibration at 0.01: other scores and confidences on the copy."""
    source = servers.start("source")
    with source.client() as client:
        client.create_classifier("intents", k=3, voting="mixture")
        client.add_exemplars("intents", topical_texts(60, seed=0))
        client.evaluate("intents", voting=["mixture"], k=[3], apply_best=True)
        fitted = client.get_classifier("intents").calibration.label_temperature
    assert fitted > 0
    assert fitted != pytest.approx(0.01)
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export), "--vectors"))
    head = json.loads(export.read_text().splitlines()[0])
    assert head["classifier"]["calibration"]["label_temperature"] == fitted

    target = servers.start("target")
    ok(run(target, "import", "intents", str(export), "--json"))
    with source.client() as original, target.client() as copy:
        assert copy.get_classifier("intents").calibration.label_temperature == fitted
        for restored, answer in zip(answers(copy), answers(original), strict=True):
            assert isinstance(restored, pb.Prediction)
            assert isinstance(answer, pb.Prediction)
            assert (restored.label, restored.unknown_reason) == (
                answer.label,
                answer.unknown_reason,
            )
            # Equal but for the last bits of the label model's fit (the rows' order differs).
            assert restored.confidence == pytest.approx(answer.confidence, abs=1e-6)
            shares = {s.label: pytest.approx(s.score, abs=1e-6) for s in answer.scores}
            assert {s.label: s.score for s in restored.scores} == shares


def test_a_mixture_classifier_whose_calibration_an_update_dropped_imports_with_its_scores(
    servers: Servers, tmp_path: Path
) -> None:
    """Changing k drops the calibration; the label temperature Evaluate fitted with it went on
    scoring on the source, unseen and not exported, so the import scored at the default 0.01:
    other scores. It is now reset with the calibration, as a migration to other vectors does."""
    source = servers.start("source")
    with source.client() as client:
        client.create_classifier("intents", k=3, voting="mixture")
        client.add_exemplars("intents", topical_texts(60, seed=0))
        client.evaluate("intents", voting=["mixture"], k=[3], apply_best=True)
        assert client.get_classifier("intents").calibration.label_temperature != pytest.approx(0.01)
        client.update_classifier("intents", k=5)
        assert not client.get_classifier("intents").calibrated
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export), "--vectors"))
    target = servers.start("target")
    ok(run(target, "import", "intents", str(export), "--json"))
    with source.client() as original, target.client() as copy:
        for restored, answer in zip(answers(copy), answers(original), strict=True):
            assert isinstance(restored, pb.Prediction)
            assert isinstance(answer, pb.Prediction)
            shares = {s.label: pytest.approx(s.score, abs=1e-6) for s in answer.scores}
            assert {s.label: s.score for s in restored.scores} == shares


def test_an_export_with_the_former_singular_rule_keys_still_imports_its_rule(
    servers: Servers, tmp_path: Path
) -> None:
    """Files exported before OutOfScopeThreshold's references took plural names carry
    ``similarity_reference`` ...: the import reads them when the plural keys are absent."""
    source = tuned_source(servers)
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export), "--vectors"))
    head, *lines = export.read_text().splitlines()
    old_head = json.loads(head)
    rule = old_head["classifier"]["out_of_scope_rule"]
    for kind in ("similarity", "mahalanobis", "agreement"):
        rule[f"{kind}_reference"] = rule.pop(f"{kind}_references")
    old = tmp_path / "old-shape.jsonl"
    old.write_text("\n".join([json.dumps(old_head), *lines]) + "\n")

    target = servers.start("target")
    result = run(target, "import", "intents", str(old), "--json")
    assert json.loads(ok(result))["added"] == len(EXEMPLARS)
    assert result.stderr == ""  # the rule was restored, not left out
    with source.client() as original, target.client() as copy:
        fitted = original.get_classifier("intents").out_of_scope_threshold
        assert len(fitted.agreement_references) == len(EXEMPLARS)
        assert copy.get_classifier("intents").out_of_scope_threshold == fitted


def test_an_import_into_another_embedder_embeds_the_texts_and_leaves_the_calibration(
    servers: Servers, fake_embedder: FakeEmbeddingServer, tmp_path: Path
) -> None:
    source = tuned_source(servers)
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export), "--vectors"))
    other = servers.start("other", embedding={"model": "fake-v2"})  # another fingerprint
    before = fake_embedder.behaviour.calls
    result = run(other, "import", "intents", str(export), "--json")
    assert json.loads(ok(result))["added"] == len(EXEMPLARS)
    assert fake_embedder.behaviour.calls > before
    assert "the texts are embedded here instead" in result.stderr
    assert "run `knn-classifier evaluate intents --apply-best`" in result.stderr
    assert OUT_OF_SCOPE_NOTE in result.stderr
    with source.client() as original, other.client() as copy:
        restored = copy.get_classifier("intents")
        assert not restored.calibrated
        assert not restored.HasField("out_of_scope_threshold")
        assert not answered_out_of_scope(answers(copy))
        assert settings_of(restored)[:-1] == settings_of(original.get_classifier("intents"))[:-1]
        assert stored(copy) == stored(original)


def test_a_plain_export_imports_with_its_calibration_and_embeds_the_texts(
    servers: Servers, fake_embedder: FakeEmbeddingServer, tmp_path: Path
) -> None:
    source = tuned_source(servers)
    export = tmp_path / "intents.jsonl"
    ok(run(source, "export", "intents", "-o", str(export)))
    target = servers.start("target")
    before = fake_embedder.behaviour.calls
    result = run(target, "import", "intents", str(export))
    ok(result)
    assert result.stderr == ""
    assert fake_embedder.behaviour.calls > before
    with source.client() as original, target.client() as copy:
        assert copy.get_classifier("intents").calibrated
        assert copy.get_classifier("intents").HasField("out_of_scope_threshold")
        assert answers(copy) == answers(original)


def test_vectors_and_calibrations_of_another_embedder_are_refused(
    servers: Servers, fake_embedder: FakeEmbeddingServer
) -> None:
    server = servers.start("server", limits={"max_response_bytes": 4096})
    with server.client() as client:
        fingerprint = client.get_service_info().embedder.fingerprint
        assert fingerprint
        client.create_classifier("c")
        client.add_exemplars("c", EXEMPLARS)
        pages, token = [], ""
        while True:
            page = client.list_exemplars("c", page_size=100, page_token=token, with_vectors=True)
            assert page.embedder_fingerprint == fingerprint
            assert page.ByteSize() <= 4096
            pages.append(page.exemplars)
            token = page.next_page_token
            if not token:
                break
        listed = [e for page in pages for e in page]
        assert len(pages) > 1  # 12 exemplars with 80 floats each do not fit 4 KiB at once
        assert sorted(e.id for e in listed) == sorted(e.id for e in EXEMPLARS)
        assert [v.dimension for v in listed[0].vectors] == [16, 64]
        only = client.list_exemplars("c", with_vectors=True, vector_dimensions=[16])
        assert {len(e.vectors) for e in only.exemplars} == {1}

        with_vectors = [
            pb.ExemplarInput(text=e.text, label=e.label, id=e.id, vectors=e.vectors) for e in listed
        ]
        before = fake_embedder.behaviour.calls
        client.create_classifier("copy")
        client.add_exemplars("copy", with_vectors, embedder_fingerprint=fingerprint)
        assert fake_embedder.behaviour.calls == before

        with pytest.raises(FailedPreconditionError) as mismatch:
            client.add_exemplars("copy", with_vectors, embedder_fingerprint="another")
        assert mismatch.value.reason == "EMBEDDER_MISMATCH"
        with pytest.raises(InvalidArgumentError) as missing:
            client.add_exemplars("copy", with_vectors)
        assert missing.value.reason == "FIELD_REQUIRED"
        narrow = [
            pb.ExemplarInput(text=e.text, label=e.label, vectors=e.vectors[:1]) for e in listed
        ]
        with pytest.raises(FailedPreconditionError) as too_narrow:
            client.add_exemplars("copy", narrow, embedder_fingerprint=fingerprint)
        assert too_narrow.value.reason == "VECTORS_TOO_NARROW"
        mixed = [with_vectors[0], pb.ExemplarInput(text="plain", label="card")]
        with pytest.raises(InvalidArgumentError):
            client.add_exemplars("copy", mixed, embedder_fingerprint=fingerprint)
        assert client.get_classifier("copy").exemplar_count == len(EXEMPLARS)

        calibration = pb.Calibration(shares=[0.2, 1.0], probabilities=[0.3, 0.9])
        with pytest.raises(FailedPreconditionError) as other:
            client.create_classifier(
                "cal", calibration=calibration, dimension=64, embedder_fingerprint="another"
            )
        assert other.value.reason == "EMBEDDER_MISMATCH"
        with pytest.raises(InvalidArgumentError):
            client.create_classifier(
                "cal", calibration=calibration, embedder_fingerprint=fingerprint
            )
        restored = client.create_classifier(
            "cal", calibration=calibration, dimension=64, embedder_fingerprint=fingerprint
        )
        assert restored.calibrated
        assert restored.calibration.label_temperature == pytest.approx(0.01)  # 0: the default
        restored.calibration.ClearField("label_temperature")
        assert restored.calibration == calibration
        with pytest.raises(InvalidArgumentError, match="temperature"):
            client.create_classifier(
                "nan", dimension=64, embedder_fingerprint=fingerprint,
                calibration=pb.Calibration(
                    shares=[0.2, 1.0], probabilities=[0.3, 0.9], label_temperature=float("nan")
                ),
            )  # fmt: skip


def test_list_exemplars_refuses_vector_dimensions_without_the_view(
    server: ServerThread, client: Client
) -> None:
    client.create_classifier("c")
    request = pb.ListExemplarsRequest(classifier="c", vector_dimensions=[16])
    with server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(
            "/knn_classifier.v1.ClassifierService/ListExemplars",
            request_serializer=pb.ListExemplarsRequest.SerializeToString,
            response_deserializer=pb.ListExemplarsResponse.FromString,
        )(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_version_1_export_still_plans_a_restore_and_says_what_it_lacks() -> None:
    from knn_classifier.client.cli._archive import plan_restore

    info = pb.ServiceInfo(dimensions=[16, 64], embedder=pb.Embedder(fingerprint="f"))
    head = {
        "format": "knn-classifier-export",
        "version": 1,
        "classifier": {"instruction": "Sort it", "k": 3, "voting": "softmax", "dimension": 16,
                       "calibrated": True},
    }  # fmt: skip
    restore = plan_restore(head, "copy", info)
    assert restore.settings["dimension"] == 16
    assert "calibration" not in restore.settings
    assert not restore.vectors_fingerprint
    assert any("not in this export (version 1)" in note for note in restore.notes)


def test_an_out_of_scope_threshold_to_restore_is_checked_and_a_bad_one_creates_nothing(
    client: Client,
) -> None:
    client.create_classifier("source", k=3, voting="softmax")
    client.add_exemplars("source", EXEMPLARS)
    client.evaluate("source", apply_best=True, target_coverage=0.9)  # see tune()
    rule = client.get_classifier("source").out_of_scope_threshold
    fingerprint = client.get_service_info().embedder.fingerprint

    def changed(**values: Any) -> pb.OutOfScopeThreshold:
        bad = pb.OutOfScopeThreshold()
        bad.CopyFrom(rule)
        for name, value in values.items():
            if isinstance(value, list):
                bad.ClearField(name)  # type: ignore[arg-type]
                getattr(bad, name).extend(value)
            else:
                setattr(bad, name, value)
        return bad

    def create(given: pb.OutOfScopeThreshold, embedder_fingerprint: str = fingerprint) -> None:
        client.create_classifier(
            "copy",
            k=3,
            voting="softmax",
            out_of_scope_threshold=given,
            embedder_fingerprint=embedder_fingerprint,
        )

    with pytest.raises(FailedPreconditionError) as other:
        create(rule, embedder_fingerprint="another")
    assert other.value.reason == "EMBEDDER_MISMATCH"
    with pytest.raises(InvalidArgumentError) as missing:
        create(rule, embedder_fingerprint="")
    assert missing.value.reason == "FIELD_REQUIRED"
    with pytest.raises(InvalidArgumentError) as dimension:
        create(changed(dimension=32))
    assert dimension.value.reason == "DIMENSION_NOT_CONFIGURED"
    assert "out_of_scope_threshold.dimension" in str(dimension.value)
    ascending = list(rule.similarity_references)
    for bad, named in [
        (changed(target_coverage=0.2), "out_of_scope_threshold.target_coverage"),
        (changed(coverage=1.5), "out_of_scope_threshold.coverage"),
        (changed(threshold=0.5), "finite threshold of at most 0"),
        (changed(threshold=float("nan")), "finite threshold of at most 0"),
        (changed(similarity_references=[]), "1 to 256 finite reference values"),
        (changed(similarity_references=ascending[::-1]), "ascending"),
        (changed(mahalanobis_references=[0.0] * 257), "1 to 256 finite reference values"),
        (changed(mahalanobis_references=[0.0, float("inf")]), "finite reference values"),
        (changed(agreement_references=[0.5] * 257), "1 to 256 finite reference values"),
        (changed(agreement_references=[0.9, 0.1]), "ascending"),
        (changed(agreement_references=[0.5, 5.0]), "agreements within"),
        (changed(similarity_references=[-3.0, *ascending]), "similarities within"),
        (changed(reference_size=len(ascending) - 1), "reference_size of 0 or at least"),
        (changed(reference_size=-1), "reference_size of 0 or at least"),
    ]:
        with pytest.raises(InvalidArgumentError, match=named):
            create(bad)
    assert [c.name for c in client.list_classifiers()] == ["source"]  # nothing created

    create(rule)
    assert client.get_classifier("copy").out_of_scope_threshold == rule
    client.add_exemplars("copy", EXEMPLARS)
    for text in QUERIES:  # the source's checks, without an Evaluate on the copy
        copied, original = client.classify("copy", text), client.classify("source", text)
        assert copied.out_of_scope == original.out_of_scope
        assert copied.unknown_reason == original.unknown_reason
    assert client.classify("copy", "weather rain storm").unknown_reason == (
        pb.UNKNOWN_REASON_OUT_OF_SCOPE
    )


def test_an_export_without_the_out_of_scope_rule_says_it_is_not_restored() -> None:
    from knn_classifier.client.cli._archive import plan_restore

    info = pb.ServiceInfo(dimensions=[16, 64], embedder=pb.Embedder(fingerprint="f"))
    classifier = {"instruction": "Sort it", "k": 3, "voting": "softmax",
                  "out_of_scope_threshold": True}  # fmt: skip
    head = {"format": "knn-classifier-export", "version": 2, "classifier": classifier,
            "embedder": {"fingerprint": "f"}}  # fmt: skip
    restore = plan_restore(head, "copy", info)
    assert "out_of_scope_threshold" not in restore.settings
    assert any("out-of-scope threshold is not in this export" in n for n in restore.notes)

    rule = {"threshold": -3.5, "target_coverage": 0.98, "coverage": 1.0, "dimension": 32,
            "similarity_references": [0.1], "mahalanobis_references": [0.2]}  # fmt: skip
    restore = plan_restore({**head, "classifier": {**classifier, "out_of_scope_rule": rule}},
                           "copy", info)  # fmt: skip
    assert "out_of_scope_threshold" not in restore.settings  # 32 is not kept here
    assert any("fitted for another dimension" in n for n in restore.notes)

    kept = {**rule, "dimension": 64}
    restore = plan_restore({**head, "classifier": {**classifier, "out_of_scope_rule": kept}},
                           "copy", info)  # fmt: skip
    expected = pb.OutOfScopeThreshold(
        threshold=-3.5, target_coverage=0.98, coverage=1.0, dimension=64,
        similarity_references=[0.1], mahalanobis_references=[0.2],
    )  # fmt: skip
    assert restore.settings["out_of_scope_threshold"] == expected
    assert restore.settings["embedder_fingerprint"] == "f"
    assert not restore.notes

    with pytest.raises(CliError, match="out_of_scope_rule is malformed"):
        plan_restore({**head, "classifier": {**classifier, "out_of_scope_rule": {
            **kept, "threshold": "low"}}}, "copy", info)  # fmt: skip
