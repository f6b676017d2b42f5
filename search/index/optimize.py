"""`clipdex optimize`: rebuild the index for the library's size, tune it, measure it.

The search breadth (nprobe for IVF, efSearch for HNSW) is tuned per query kind, because
the kinds lie at very different distances from the stored vectors:

- image-like queries (an image, a stored item, a raw vector) are stored vectors drawn at
  random and kept out of the quantizer's training sample, each query's own item left out
  of both result lists;
- text-like queries come from the sources of `clipdex.search.index.query_sample` (a queries
  file, the query cache, text items, prompts), filled up with generated queries as far
  from their best match as CLIP's modality gap puts a text when too few real ones exist.

- the user's own query vectors (`--queries FILE.npy`), when given, are a kind of their own.

For each kind, half of its queries tune the breadth to the smallest value reaching the
target plus a small margin (a kind that misses the target even searching every list, as far
queries do over codes with too few candidates, to where its recall stops growing: it is
reported as missed, with what would meet it, and its queries are not sent to every list). The breadth a search uses is then chosen per query from the
query itself, by a rule fitted on the tuning halves of every kind together
(`clipdex.search.index.breadth`): a backend's vectors are searched as wide as they need
whatever their kind. The other halves measure the recall that is reported, with the
rule's breadths, so the figure is not the one tuned on. The overall recall is the lower
of the kinds'.

The target may differ by kind (`RecallTargets`, `--target-recall 0.95,text=0.9`): a backend
that must find near duplicates but can live with 0.90 for captions tunes each to its own, and
the rule gives the bands where text-like queries fall their kind's narrower breadth.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from clipdex.search.errors import ClipdexError
from clipdex.search.index.breadth import BreadthRule, best_scores, tune_rule
from clipdex.search.index.choice import build_index, choose_spec, list_count, training_rows, training_size
from clipdex.search.index.corpus import ArrayCorpus, CatalogCorpus, Corpus
from clipdex.search.index.query_sample import GENERATED, MIN_TEXT_QUERIES, QuerySample, gap_queries, load_query_file, text_query_sample
from clipdex.search.index.vectors import IndexSpec, VectorIndex, exact_top_k, faiss_module

if TYPE_CHECKING:
    from clipdex.search.index.parts import IndexedLibrary

RECALL_K = 10
HELD_OUT_QUERIES = 400  # split in two halves: tuning and reporting
TUNING_MARGIN = 0.01
TUNING_ERRORS = 3.0  # standard errors of the tuning sample's mean recall added to the margin
MEASURE_SECONDS = 1.0  # time spent timing each throughput (approximate, exact)
QUERY_KIND_NAMES = ("image", "text", "queries")  # the kinds `optimize` tunes (see the module docstring)


@dataclass(frozen=True)
class RecallTargets:
    """The recall@10 each query kind is tuned to: `default`, or its own in `by_kind`."""

    default: float = 0.95
    by_kind: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, value in {"every kind": self.default, **self.by_kind}.items():
            if not 0.0 < value <= 1.0:
                raise ClipdexError(f"the target recall must be in (0, 1], not {value} ({kind})")
        unknown = sorted(set(self.by_kind) - set(QUERY_KIND_NAMES))
        if unknown:
            raise ClipdexError(f"no query kind {', '.join(map(repr, unknown))}: the kinds are {', '.join(QUERY_KIND_NAMES)}")

    @classmethod
    def of(cls, target: "float | RecallTargets") -> "RecallTargets":
        return target if isinstance(target, RecallTargets) else cls(float(target))

    @classmethod
    def parse(cls, text: str) -> "RecallTargets":
        """From "0.95" (every kind), "0.95,text=0.9" or "image=0.95,text=0.9" (unnamed kinds: 0.95)."""
        default, by_kind = 0.95, {}
        for part in (piece.strip() for piece in text.split(",")):
            kind, _, value = part.rpartition("=")
            try:
                number = float(value)
            except ValueError:
                raise ClipdexError(f"cannot read {part!r} in --target-recall {text!r}: give e.g. 0.95 or 0.95,text=0.9") from None
            if kind:
                by_kind[kind.strip()] = number
            else:
                default = number
        return cls(default, by_kind)

    def __call__(self, kind: str) -> float:
        return float(self.by_kind.get(kind, self.default))


def describe_targets(default: float, by_kind: Mapping[str, float]) -> str:
    """A report's targets in words: "0.95", or "0.95, text 0.90" where a kind has its own."""
    return f"{default:.2f}" + "".join(f", {kind} {value:.2f}" for kind, value in by_kind.items())


@dataclass
class Evaluation:
    """Queries with their exact top-k ids; `own_ids` (one per query, or None) are left out of results."""

    queries: np.ndarray
    truth: np.ndarray
    own_ids: np.ndarray | None = None
    best_cosine: np.ndarray | None = None  # each query's cosine with its best match, when known

    def half(self, second: bool) -> "Evaluation":
        cut = len(self.queries) // 2
        part = slice(cut, None) if second else slice(0, cut)
        own = None if self.own_ids is None else self.own_ids[part]
        best = None if self.best_cosine is None else self.best_cosine[part]
        return Evaluation(self.queries[part], self.truth[part], own, best)


@dataclass
class KindReport:
    """How searches of one query kind fare with the breadth tuned for them."""

    recall_at_10: float  # on the queries held out from tuning
    search_params: dict[str, Any]
    target_met: bool  # against `target_recall`
    queries: int  # tuned on half, measured on the other half
    source: str  # where the queries came from
    best_match_cosine: float | None  # median cosine of a query with its best match: how far queries lie
    queries_per_second: float
    speedup: float  # against exact search's queries/s
    widest_recall_at_10: float | None = None  # at the widest breadth, when the target was missed
    # The breadths the per-query rule gave this kind's held-out queries: {"median", "p90", "max"};
    # `recall_at_10` is measured with them (`search_params`: the breadth tuned for the kind alone).
    breadth_by_query: dict[str, int] | None = None
    target_recall: float | None = None  # the kind's own target

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(self.search_params)  # "nprobe"/"efSearch" next to the recall they give
        return data


@dataclass
class OptimizeReport:
    index_type: str
    factory: str | None
    search_params: dict[str, Any]  # for queries of no known kind: the widest of the kinds'
    target_recall: float  # every kind's, unless `target_recall_by_kind` names another
    recall_at_10: float  # the lower of the kinds'
    target_met: bool  # by every kind, each against its own target
    queries_per_second: float  # single queries, one at a time; the slower kind's
    exact_queries_per_second: float  # the same, by exact flat search
    speedup: float
    bytes_per_vector: float
    vectors: int
    dim: int
    held_out_queries: int
    memory_budget: int | None
    device: str
    build_seconds: float
    seconds: float
    optimized_at: str
    by_query_kind: dict[str, dict[str, Any]] = field(default_factory=dict)  # "image", "text", "queries": KindReport.to_json()
    advice: list[str] = field(default_factory=list)  # what would meet a missed target
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # index types also tried, not kept
    breadth_rule: str | None = None  # how the breadth is chosen per query (`BreadthRule.describe`)
    target_recall_by_kind: dict[str, float] = field(default_factory=dict)  # kinds given a target of their own

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def held_out_evaluation(ids: np.ndarray, vectors: np.ndarray, count: int, exclude_rows: np.ndarray, seed: int = 0) -> Evaluation:
    """`count` stored vectors outside `exclude_rows` (the training sample) as queries."""
    rows = held_out_rows(len(ids), count, exclude_rows, seed)
    return exact_evaluation(np.ascontiguousarray(vectors[rows]), ids, vectors, ids[rows])


def held_out_rows(total: int, count: int, exclude_rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """`count` random rows outside `exclude_rows` (all rows when that leaves none)."""
    rng = np.random.default_rng(seed + 1)
    candidates = np.setdiff1d(np.arange(total), exclude_rows) if len(exclude_rows) < total else np.arange(total)
    return rng.choice(candidates, size=min(count, len(candidates)), replace=False)


def exact_evaluation(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, own_ids: np.ndarray | None = None) -> Evaluation:
    """Queries with their exact top-k and best-match cosine; `own_ids` (-1: none) left out of both."""
    return exact_evaluations({"": (queries, own_ids)}, ArrayCorpus(ids, vectors).chunks())[""]


def exact_evaluations(queries: dict[str, tuple[np.ndarray, np.ndarray | None]],
                      chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> dict[str, Evaluation]:
    """`exact_evaluation` of several query sets at once, in one pass over the chunks of vectors."""
    names = list(queries)
    everything = np.concatenate([np.asarray(queries[name][0], dtype=np.float32).reshape(len(queries[name][0]), -1) for name in names])
    scores, found = exact_top_k(everything, RECALL_K + 1, chunks)
    evaluations, start = {}, 0
    for name in names:
        own_ids = queries[name][1]
        part = slice(start, start + len(queries[name][0]))
        start = part.stop
        these, hits = scores[part], found[part]
        if own_ids is None:
            best, hits = these[:, 0], hits[:, :RECALL_K]
        else:
            best = np.where(hits[:, 0] == own_ids, these[:, 1], these[:, 0])
        evaluations[name] = Evaluation(everything[part], _drop_own(hits, own_ids, RECALL_K), own_ids, best)
    return evaluations


def exact_neighbours(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int, own_ids: np.ndarray | None = None) -> np.ndarray:
    """The exact top-k ids of each query by inner product (FAISS brute force, in blocks)."""
    faiss = faiss_module()
    extra = 0 if own_ids is None else 1
    _, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), k + extra, metric=faiss.METRIC_INNER_PRODUCT)
    return _drop_own(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), own_ids, k)


def recall_at_k(found: np.ndarray, evaluation: Evaluation, k: int = RECALL_K) -> float:
    """The mean share of each query's exact top-k found in its approximate top-k."""
    return float(np.mean(recalls_per_query(found, evaluation, k)))


def recalls_per_query(found: np.ndarray, evaluation: Evaluation, k: int = RECALL_K) -> np.ndarray:
    """Each query's share of its exact top-k found in its approximate top-k."""
    found = _drop_own(found, evaluation.own_ids, k)
    hits = [len(np.intersect1d(row[row >= 0], truth)) for row, truth in zip(found, evaluation.truth[:, :k])]
    return np.asarray(hits, dtype=np.float64) / k


def _drop_own(rows: np.ndarray, own_ids: np.ndarray | None, k: int) -> np.ndarray:
    if own_ids is None:
        return rows[:, :k]
    kept = [row[row != own][:k] for row, own in zip(rows, own_ids)]
    return np.stack([np.pad(row, (0, k - len(row)), constant_values=-1) for row in kept])


def evaluate(index: VectorIndex, evaluation: Evaluation, breadth: int) -> float:
    return float(np.mean(evaluate_per_query(index, evaluation, breadth)))


def evaluate_per_query(index: VectorIndex, evaluation: Evaluation, breadth: int) -> np.ndarray:
    extra = 0 if evaluation.own_ids is None else 1
    _, found = index.search_with(evaluation.queries, RECALL_K + extra, breadth)
    return recalls_per_query(found, evaluation)


def tuning_target(index: VectorIndex, tuning: Evaluation, target: float) -> tuple[int, float]:
    """The breadth tuned on `tuning` and the recall it gave, with a margin that covers the
    sampling error of the tuning queries: the recall must clear `target` by
    `TUNING_MARGIN`, and by `TUNING_ERRORS` standard errors of the mean per-query recall
    (far, text-like queries vary much more from one query to the next)."""
    breadth, recall = tune(index, tuning, min(1.0, target + TUNING_MARGIN))
    spread = float(np.std(evaluate_per_query(index, tuning, breadth))) / math.sqrt(max(1, len(tuning.queries)))
    if TUNING_ERRORS * spread > TUNING_MARGIN:
        breadth, recall = tune(index, tuning, min(1.0, target + TUNING_ERRORS * spread))
    return breadth, recall


def tune(index: VectorIndex, evaluation: Evaluation, target: float) -> tuple[int, float]:
    """The smallest breadth (nprobe/efSearch) whose recall reaches `target`, and that recall.

    Doubles the breadth until the target is met, then bisects between the last miss and
    the first hit. When even the widest search misses, returns the widest."""
    widest = index.max_breadth()
    low, high = 0, 1 if index.spec.type == "ivf" else 16
    recall = evaluate(index, evaluation, high)
    while recall < target and high < widest:
        low, high = high, min(high * 2, widest)
        recall = evaluate(index, evaluation, high)
    while low and high - low > max(1, high // 8) and recall >= target:
        middle = (low + high) // 2
        middle_recall = evaluate(index, evaluation, middle)
        if middle_recall >= target:
            high, recall = middle, middle_recall
        else:
            low = middle
    return high, recall


def queries_per_second(search_one: Callable[[np.ndarray], Any], queries: np.ndarray, min_seconds: float = 1.0, min_queries: int = 20) -> float:
    """Single-query throughput: queries searched one at a time, for at least `min_seconds` and `min_queries`."""
    with one_faiss_thread():
        done, start = 0, time.perf_counter()
        while True:
            search_one(queries[done % len(queries)][None, :])
            done += 1
            elapsed = time.perf_counter() - start
            if (elapsed >= min_seconds and done >= min_queries) or elapsed >= 20 * min_seconds:
                return done / elapsed


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """Time single queries on one FAISS (OpenMP) thread, exact and approximate alike: one
    query is too little work to split, and on a busy machine OpenMP threads waiting for a
    core distort the timing (a server runs concurrent queries on the other cores)."""
    faiss = faiss_module()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def exact_queries_per_second(vectors: np.ndarray, queries: np.ndarray, min_seconds: float = 1.0) -> float:
    """Single-query throughput of exact flat search over `vectors` (FAISS's flat kernel)."""
    faiss = faiss_module()
    return queries_per_second(
        lambda query: faiss.knn(query, vectors, RECALL_K, metric=faiss.METRIC_INNER_PRODUCT), queries, min_seconds, min_queries=5
    )


def optimize_vectors(
    ids: np.ndarray,
    vectors: np.ndarray,
    target_recall: float | RecallTargets = 0.95,
    memory_budget: int | None = None,
    builder: Callable[..., VectorIndex] = build_index,
    **options: Any,
) -> tuple[VectorIndex, OptimizeReport]:
    """`optimize_corpus` (with its keyword `options`) over vectors in memory, the index built by `builder`."""
    return optimize_corpus(ArrayCorpus(ids, vectors, builder), target_recall, memory_budget, **options)


def optimize_corpus(
    corpus: Corpus,
    target_recall: float | RecallTargets = 0.95,
    memory_budget: int | None = None,
    evaluation: Evaluation | None = None,
    spec: IndexSpec | None = None,
    seed: int = 0,
    min_seconds: float | None = None,
    text_queries: QuerySample | None = None,
    text_evaluation: Evaluation | None = None,
    sources: dict[str, str] | None = None,
    user_queries: QuerySample | None = None,
) -> tuple[VectorIndex, OptimizeReport]:
    """Build the chosen index (or `spec`) over the corpus's vectors (`clipdex.search.index.corpus`:
    in memory, or streamed from the catalog), tune it to `target_recall` per query kind (one
    for all, or `RecallTargets`) and measure it.

    Image-like queries: `evaluation`, by default held-out stored vectors (see the module
    docstring). Text-like queries: `text_evaluation`, else `text_queries` (see
    `clipdex.search.index.query_sample`), filled up with generated gap queries when fewer than
    `MIN_TEXT_QUERIES`. `user_queries`: the user's own query vectors (`--queries`), a kind
    of their own ("queries"). `sources` names where given evaluations came from. The
    benchmark passes its own evaluations. The exact top 10 of every kind's queries is found
    in one pass over the vectors.

    The breadth is then chosen per query by a rule tuned on every kind together
    (`clipdex.search.index.breadth`), and each kind's recall is measured with it.

    When the size calls for HNSW (and no `spec` is given), IVF-Flat is built and tuned too:
    a graph search finds far, text-like queries' neighbours only at a very wide efSearch,
    where an inverted file may well be faster. The candidate whose slower kind is fastest,
    among those meeting the target for both kinds, is kept (`alternatives` reports the other)."""
    started = time.perf_counter()
    targets = RecallTargets.of(target_recall)
    ids, dim = corpus.ids, corpus.dim
    candidates = [spec] if spec is not None else candidate_specs(len(ids), dim, memory_budget)
    ivf = next((candidate for candidate in candidates if candidate.type == "ivf"), None)
    trained = training_rows(len(ids), training_size(ivf, len(ids)), seed) if ivf is not None else np.zeros(0, np.int64)
    named = dict(sources or {})
    wanted: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # query sets whose exact top 10 is still to find
    if evaluation is None:
        rows = held_out_rows(len(ids), HELD_OUT_QUERIES, trained, seed)
        wanted["image"] = (corpus.rows(rows), ids[rows])
        named.setdefault("image", f"stored vectors held out from training ({len(rows)})")
    if text_evaluation is None and candidates[0].type != "flat":
        sample = with_gap_queries(text_queries or QuerySample.empty(dim), corpus, trained, seed).shuffled(seed)
        wanted["text"] = (sample.vectors, sample.own_ids if np.any(sample.own_ids >= 0) else None)
        named.setdefault("text", sample.describe())
    if user_queries is not None and len(user_queries) and candidates[0].type != "flat":
        mine = user_queries.shuffled(seed)
        wanted["queries"] = (mine.vectors, mine.own_ids if np.any(mine.own_ids >= 0) else None)
        named.setdefault("queries", mine.describe())
    found = exact_evaluations(wanted, corpus.chunks()) if wanted else {}
    evaluation = evaluation if evaluation is not None else found["image"]
    evaluations = {"image": evaluation, "text": text_evaluation if text_evaluation is not None else found.get("text")}
    if "queries" in found:
        evaluations["queries"] = found["queries"]
    min_seconds = MEASURE_SECONDS if min_seconds is None else min_seconds
    exact_qps = 1.0 / corpus.exact_seconds_per_query(lambda vectors: exact_queries_per_second(vectors, evaluation.queries, min_seconds))
    tried = [_build_and_tune(candidate, corpus, evaluations, named, targets, exact_qps, min_seconds, seed)
             for candidate in candidates]
    index, kinds, build_seconds = max(tried, key=lambda attempt: _preference(attempt[1]))
    recall = min(figures.recall_at_10 for figures in kinds.values())
    slowest = min(figures.queries_per_second for figures in kinds.values())
    report = OptimizeReport(
        index_type=index.spec.type,
        factory=index.spec.factory,
        search_params=dict(index.spec.search_params),
        target_recall=targets.default,
        recall_at_10=recall,
        target_met=all(figures.target_met for figures in kinds.values()),
        queries_per_second=slowest,
        exact_queries_per_second=round(exact_qps, 1),
        speedup=round(slowest / exact_qps, 1),
        bytes_per_vector=round(index.bytes_per_vector(), 1),
        vectors=len(ids),
        dim=dim,
        held_out_queries=sum(figures.queries for figures in kinds.values()),
        memory_budget=memory_budget,
        device=index.device,
        build_seconds=round(build_seconds, 2),
        seconds=round(time.perf_counter() - started, 2),
        optimized_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        by_query_kind={kind: figures.to_json() for kind, figures in kinds.items()},
        advice=advice(index, kinds, targets, len(ids), dim),
        alternatives=[_summary(other, other_kinds) for other, other_kinds, _ in tried if other is not index],
        breadth_rule=None if index.breadth_rule() is None else index.breadth_rule().describe(),  # type: ignore[union-attr]
        target_recall_by_kind=dict(targets.by_kind),
    )
    return index, report


def candidate_specs(count: int, dim: int, memory_budget: int | None) -> list[IndexSpec]:
    """The chosen spec, and IVF-Flat beside it when the choice is HNSW (see `optimize_vectors`)."""
    chosen = choose_spec(count, dim, memory_budget)
    if chosen.type != "hnsw":
        return [chosen]
    return [chosen, IndexSpec("ivf", f"IVF{list_count(count)},Flat", memory_budget=memory_budget)]


def _build_and_tune(
    spec: IndexSpec, corpus: Corpus, evaluations: dict[str, Evaluation | None], named: dict[str, str],
    targets: RecallTargets, exact_qps: float, min_seconds: float, seed: int,
) -> tuple[VectorIndex, dict[str, KindReport], float]:
    started = time.perf_counter()
    index = corpus.build(spec, seed)
    build_seconds = time.perf_counter() - started
    index.rerank_source = corpus.source  # as the catalog serves a library's index
    kinds = tune_kinds(index, evaluations, targets)
    for kind, figures in kinds.items():
        queries = evaluations[kind] or evaluations["image"]
        assert queries is not None
        qps = queries_per_second(lambda query: index.search(query, RECALL_K, query_kind=kind), queries.queries, min_seconds)
        figures.queries_per_second, figures.speedup = round(qps, 1), round(qps / exact_qps, 1)
        figures.source = named.get(kind, "given") if evaluations[kind] is not None else "not needed: exact search"
    return index, kinds, build_seconds


def _preference(kinds: dict[str, KindReport]) -> tuple[bool, float, float]:
    """Meeting the target for every kind first, then the slower kind's speed, then recall."""
    return (all(figures.target_met for figures in kinds.values()),
            min(figures.queries_per_second for figures in kinds.values()),
            min(figures.recall_at_10 for figures in kinds.values()))


def _summary(index: VectorIndex, kinds: dict[str, KindReport]) -> dict[str, Any]:
    return {"factory": index.spec.factory, "by_query_kind": {kind: figures.to_json() for kind, figures in kinds.items()}}


def with_gap_queries(sample: QuerySample, corpus: Corpus, exclude_rows: np.ndarray, seed: int) -> QuerySample:
    """`sample`, filled up to `HELD_OUT_QUERIES` with generated text-like queries (see
    `clipdex.search.index.query_sample.gap_queries`) when it holds fewer than `MIN_TEXT_QUERIES`."""
    if len(sample) >= MIN_TEXT_QUERIES:
        return sample
    rows = held_out_rows(len(corpus.ids), HELD_OUT_QUERIES - len(sample), exclude_rows, seed + 7)
    sample.extend(GENERATED, gap_queries(corpus.rows(rows), seed))
    return sample


def tune_kinds(index: VectorIndex, evaluations: dict[str, Evaluation | None], target_recall: float | RecallTargets) -> dict[str, KindReport]:
    """Tune each kind on the first half of its queries to its target; its recall on the second half.

    The tuned breadths go into `index.spec`: per kind, and the widest as the kind-less one."""
    targets = RecallTargets.of(target_recall)
    reports: dict[str, KindReport] = {}
    plateaus: dict[str, float] = {}  # kinds that miss the target at the widest search: the recall they are tuned to
    name = "nprobe" if index.spec.type == "ivf" else "efSearch"
    for kind, evaluation in evaluations.items():
        best = None if evaluation is None or evaluation.best_cosine is None else round(float(np.median(evaluation.best_cosine)), 3)
        queries = 0 if evaluation is None else len(evaluation.queries)
        target = targets(kind)
        if index.spec.type == "flat" or evaluation is None:
            reports[kind] = KindReport(1.0, {}, True, queries, "", best, 0.0, 0.0, target_recall=target)
            continue
        breadth, tuned_recall = tuning_target(index, evaluation.half(second=False), target)
        if tuned_recall < target and breadth >= index.max_breadth():
            # Out of reach even searching every list (codes that keep too few candidates for far
            # queries): search as wide as the recall still grows, not wider, for this kind's plateau.
            plateaus[kind] = max(0.0, tuned_recall - TUNING_MARGIN)
            breadth, _ = tune(index, evaluation.half(second=False), plateaus[kind])
        recall = evaluate(index, evaluation.half(second=True), breadth)
        widest = None
        if recall < target:
            widest = round(evaluate(index, evaluation.half(second=True), index.max_breadth()), 4)
        reports[kind] = KindReport(round(recall, 4), {name: breadth}, recall >= target, queries, "", best, 0.0, 0.0, widest,
                                   target_recall=target)
    if index.spec.type != "flat":
        index.spec.search_params_by_kind = {kind: dict(report.search_params) for kind, report in reports.items()}
        index.spec.search_params = {name: max(int(report.search_params.get(name, 0)) for report in reports.values())}
        tuned = {kind: evaluation for kind, evaluation in evaluations.items() if evaluation is not None}
        breadths = {kind: int(reports[kind].search_params[name]) for kind in tuned}
        index.spec.breadth_rule = tune_breadth_rule(index, tuned, breadths, targets, plateaus).to_json()
        for kind, evaluation in tuned.items():
            _measure_with_rule(index, reports[kind], evaluation.half(second=True), targets(kind))
    return reports


def tune_breadth_rule(index: VectorIndex, evaluations: dict[str, Evaluation], kind_breadths: dict[str, int],
                      targets: RecallTargets, plateaus: dict[str, float] | None = None) -> BreadthRule:
    """The per-query breadth rule (`clipdex.search.index.breadth`), fitted on the tuning half of
    every kind's queries together; each kind must clear the target with the same margins as
    `tuning_target` asks of a kind's own breadth (each against its own target), or, for a kind that misses it even at the
    widest search, the recall of its plateau (`plateaus`)."""
    parts = [evaluation.half(second=False) for evaluation in evaluations.values()]
    pooled = Evaluation(
        np.concatenate([part.queries for part in parts]),
        np.concatenate([part.truth[:, :RECALL_K] for part in parts]),
        np.concatenate([part.own_ids if part.own_ids is not None else np.full(len(part.queries), -1, np.int64) for part in parts]),
    )
    kinds = np.repeat(np.array(list(evaluations)), [len(part.queries) for part in parts])
    first = min(kind_breadths.values())

    def margin(recalls: np.ndarray) -> float:
        return max(TUNING_MARGIN, TUNING_ERRORS * float(np.std(recalls)) / math.sqrt(max(1, len(recalls))))

    return tune_rule(first, best_other_scores(index, pooled, first), kinds, kind_breadths,
                     lambda breadths: recalls_at_breadths(index, pooled, breadths),
                     {kind: targets(kind) for kind in evaluations}, margin, plateaus or {})


def recalls_at_breadths(index: VectorIndex, evaluation: Evaluation, breadths: np.ndarray) -> np.ndarray:
    """Each query's recall@10 at its own breadth."""
    recalls = np.zeros(len(evaluation.queries), np.float64)
    for breadth in np.unique(breadths):
        rows = np.flatnonzero(breadths == breadth)
        own = None if evaluation.own_ids is None else evaluation.own_ids[rows]
        part = Evaluation(evaluation.queries[rows], evaluation.truth[rows], own)
        recalls[rows] = evaluate_per_query(index, part, int(breadth))
    return recalls


def best_other_scores(index: VectorIndex, evaluation: Evaluation, breadth: int) -> np.ndarray:
    """Each query's best score in a search at `breadth`, as the rule reads it at query time
    (`clipdex.search.index.breadth.best_scores`: the query's own copy left out)."""
    scores, found = index.search_with(evaluation.queries, 2, breadth)
    return best_scores(scores, found)


def evaluate_per_query_with_rule(index: VectorIndex, evaluation: Evaluation) -> np.ndarray:
    """Each query's recall@10 as a search answers it: at the breadth the rule picks for it."""
    extra = 0 if evaluation.own_ids is None else 1
    _, found = index.search(evaluation.queries, RECALL_K + extra)
    return recalls_per_query(found, evaluation)


def _measure_with_rule(index: VectorIndex, report: KindReport, held_out: Evaluation, target_recall: float) -> None:
    """Report a kind's recall on its held-out half with the rule's breadths, and those breadths."""
    rule = index.breadth_rule()
    assert rule is not None
    recall = float(np.mean(evaluate_per_query_with_rule(index, held_out)))
    report.recall_at_10, report.target_met = round(recall, 4), recall >= target_recall
    breadths = rule.breadth_for(best_other_scores(index, held_out, rule.first))
    report.breadth_by_query = {"median": int(np.median(breadths)), "p90": int(np.percentile(breadths, 90)), "max": int(breadths.max())}
    if not report.target_met and report.widest_recall_at_10 is None:
        report.widest_recall_at_10 = round(evaluate(index, held_out, index.max_breadth()), 4)


def tune_spec(index: VectorIndex, evaluation: Evaluation, target_recall: float) -> float:
    """Tune one kind-less breadth on the first half of the queries; the recall on the second half."""
    return tune_kinds(index, {"image": evaluation}, target_recall)["image"].recall_at_10


def advice(index: VectorIndex, kinds: dict[str, KindReport], targets: RecallTargets, count: int, dim: int) -> list[str]:
    """For each kind that missed the target: what would meet it."""
    lines = []
    nlist = faiss_module().extract_index_ivf(index.index).nlist if index.spec.type == "ivf" else 0
    whole_bytes = count * (4 * dim + 8) + nlist * dim * 4
    for kind, report in kinds.items():
        if report.target_met:
            continue
        widest = report.widest_recall_at_10
        target_recall = targets(kind)
        missed = f"{kind}-like queries reach recall@10 {report.recall_at_10:.3f} < {target_recall:.2f}"
        if widest is not None and widest >= target_recall:
            lines.append(f"{missed} on the held-out queries: a wider search reaches it (the widest gives {widest:.3f}); "
                         f"rerun with a higher --target-recall (e.g. {_raised(targets, kind)}) to tune a wider one")
        elif not index.keeps_whole_vectors:
            lines.append(f"{missed}, {widest or 0:.3f} at the widest search of {index.spec.factory}: its quantized codes lose too much; "
                         f"IVF{nlist},Flat keeps whole vectors and reaches any recall, in about {_size(whole_bytes)} "
                         f"(--memory-budget {_size(whole_bytes)} or more)")
        else:
            lines.append(f"{missed}, {widest or 0:.3f} at the widest search of {index.spec.factory}; an IVF,Flat index "
                         f"reaches any recall at a wide enough nprobe (about {_size(whole_bytes)}), exact search always")
    return lines


def _raised(targets: RecallTargets, kind: str) -> str:
    """The `--target-recall` that asks `kind` for 0.02 more."""
    raised = round(min(1.0, targets(kind) + 0.02), 2)
    if not targets.by_kind:
        return f"{raised:.2f}"
    return ",".join([f"{targets.default:g}"] + [f"{name}={raised if name == kind else value:g}" for name, value in {**targets.by_kind, kind: raised}.items()])


def _size(size: int) -> str:
    """Bytes rounded up, in the units `--memory-budget` reads (e.g. 204K, 1953M)."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= 10 * scale or unit == "K":
            return f"{math.ceil(size / scale)}{unit}"
    return f"{size}"


def optimize_library(
    library: "IndexedLibrary",
    target_recall: float | RecallTargets = 0.95,
    memory_budget: int | None = None,
    seed: int = 0,
    queries_file: str | Path | None = None,
    cluster: str | None = None,
) -> OptimizeReport:
    """Rebuild the library's index from its catalog, tuned per query kind and measured, and record the report.

    Text-like queries come from the library itself (see `clipdex.search.index.query_sample`);
    `queries_file` (the first `HELD_OUT_QUERIES` of it) is the user's own kind, "queries". `cluster`: a Ray address; an IVF index is then built in
    shards there (`clipdex.search.index.optimize_cluster`). The index is built from a snapshot while searches (and
    writers) go on; it is then caught up with any commits made meanwhile and saved under
    the write lock."""
    target_recall = RecallTargets.of(target_recall)  # checked before any work
    generation = library.catalog.generation()
    corpus = CatalogCorpus(library.catalog, library.dim, scratch=library.path, rerank_source=library.store.rerank_source)
    if len(corpus.ids) == 0:
        raise ClipdexError(f"library {library.path} is empty: index something before optimizing it")
    spec = choose_spec(len(corpus.ids), library.dim, memory_budget)
    text_queries = user_queries = None
    if queries_file is not None:
        user_queries = QuerySample.empty(library.dim)
        user_queries.extend(f"queries file {queries_file}", load_query_file(queries_file, library.dim)[:HELD_OUT_QUERIES])
    if spec.type != "flat":
        text_queries = text_query_sample(library, HELD_OUT_QUERIES, None, seed)
    if cluster is None:
        index, report = optimize_corpus(corpus, target_recall, memory_budget, seed=seed, text_queries=text_queries,
                                        user_queries=user_queries)
    else:
        from functools import partial

        from clipdex.search.index.optimize_cluster import build_index_on_cluster
        from clipdex.search.ray_cluster import ray_session

        ids, vectors = library.catalog.all_vectors()  # shipped to the cluster's tasks from memory
        with ray_session(cluster) as ray:
            index, report = optimize_corpus(ArrayCorpus(ids, vectors, partial(build_index_on_cluster, ray, scratch=library.path)),
                                            target_recall, memory_budget, seed=seed, text_queries=text_queries,
                                            user_queries=user_queries)
    library.adopt_vectors(index, generation, {"optimized": report.to_json()})  # recorded once the index is saved
    return report
