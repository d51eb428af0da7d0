"""Retrieval: index build and query latency of the embedded BM25 index, beside rank-bm25.

Workload: a generated collection of 10,000 CSV rows (Q&A entries, half English, half Korean, in
10 files) and 200 PDF pages (4 files of 50 pages, English), written to a temporary folder. Both
engines get the same passages and the same tokenizer (English Snowball stems + kiwipiepy
morphemes), so the rows compare the BM25 engines: Stagecast's index (bm25s, sparse matrices)
against rank-bm25's ``BM25Okapi`` (plain Python). Queries: 1,000 generated questions, top 5.

    python bench/bench_retrieval.py            # ~1-2 min (most of it is Korean tokenization)
    python bench/bench_retrieval.py --smoke    # seconds, checks it still runs
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

EN_WORDS = (
    "refund shipping order invoice warranty battery thermostat display schedule heating cooling "
    "install wire network password account discount delivery customs parcel exchange repair "
    "filter sensor humidity app update firmware subscription payment receipt voucher address "
    "courier damage replacement manual warranty claim serial model colour bracket screw"
).split()
KO_WORDS = (
    "환불 배송 주문 영수증 보증 배터리 온도조절기 화면 일정 난방 냉방 설치 "
    "배선 네트워크 비밀번호 계정 할인 택배 관세 교환 수리 필터 센서 습도 "
    "앱 업데이트 구독 결제 쿠폰 주소 파손 교체 설명서 모델 색상"
).split()
KO_TAILS = ("은 언제 가능한가요?", "을 신청하려면 어떻게 하나요?", "이 안 되면 어떻게 하나요?")


def _en_sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(EN_WORDS) for _ in range(n)).capitalize() + "."


def _ko_sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(KO_WORDS) + rng.choice(("을", "는", "에", "의", "")) for _ in range(n)]
    return " ".join(words) + " 처리됩니다."


def make_collection(folder: Path, rows: int, pages: int, seed: int = 7) -> None:
    from fpdf import FPDF

    rng = random.Random(seed)
    files = 10 if rows >= 1000 else 2
    per_file = rows // files
    for f in range(files):
        with (folder / f"faq-{f:02d}.csv").open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["question", "answer"])
            for r in range(per_file):
                if (f * per_file + r) % 2:
                    q = rng.choice(KO_WORDS) + rng.choice(KO_TAILS)
                    a = " ".join(_ko_sentence(rng, 8) for _ in range(3))
                else:
                    q = f"How do I handle {rng.choice(EN_WORDS)} and {rng.choice(EN_WORDS)}?"
                    a = " ".join(_en_sentence(rng, 10) for _ in range(3))
                writer.writerow([q, a])
    pdfs = 4 if pages >= 40 else 1
    for p in range(pdfs):
        pdf = FPDF()
        pdf.set_font("Helvetica", size=11)
        for _ in range(pages // pdfs):
            pdf.add_page()
            text = " ".join(_en_sentence(rng, 12) for _ in range(12))
            pdf.multi_cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
        pdf.output(str(folder / f"manual-{p}.pdf"))


def make_queries(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(f"{rng.choice(KO_WORDS)} {rng.choice(KO_WORDS)}{rng.choice(KO_TAILS)}")
        else:
            out.append(f"how does {rng.choice(EN_WORDS)} {rng.choice(EN_WORDS)} work")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workload, seconds")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1_000)
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.pages, args.queries = 400, 10, 50
    C.header("bench_retrieval: BM25 index build and query latency")

    import numpy as np
    from rank_bm25 import BM25Okapi

    from stagecast.engine import retrieval
    from stagecast.engine.collections import collection_files, load_file
    from stagecast.engine.retrieval import BM25Index, Tokenizer, open_index

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "collection"
        folder.mkdir()
        cache = Path(tmp) / "cache"
        make_collection(folder, args.rows, args.pages)
        queries = make_queries(args.queries)
        tokenizer = Tokenizer()
        tokenizer.tokenize(
            "워밍업 warm up"
        )  # Kiwi's model loads once per process: not a build cost

        # Stagecast: the whole first use (read, chunk, tokenize, index, write the cache)
        started = time.perf_counter()
        index = open_index(folder, tokenizer=tokenizer, cache_dir=cache)
        first_use = time.perf_counter() - started
        stats = index.stats
        assert stats is not None
        retrieval._memory.clear()
        started = time.perf_counter()
        cached = open_index(folder, tokenizer=tokenizer, cache_dir=cache)
        reopen = time.perf_counter() - started
        assert cached.stats is not None and not cached.stats.rebuilt

        # the shared steps, timed once: reading the files and tokenizing the passages
        started = time.perf_counter()
        passages = []
        for path in collection_files(folder):
            passages.extend(load_file(path, path.relative_to(folder).as_posix()).passages)
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        corpus = tokenizer.tokenize_many([p.text for p in passages])
        tokenize_s = time.perf_counter() - started

        # the engines alone, from the same tokens
        import bm25s

        started = time.perf_counter()
        engine = bm25s.BM25()
        engine.index(corpus, show_progress=False)
        bm25s_build = time.perf_counter() - started
        ours = BM25Index(passages, tokenizer, engine)
        started = time.perf_counter()
        okapi = BM25Okapi(corpus)
        okapi_build = time.perf_counter() - started

        def rank_bm25_search(query: str, k: int) -> list[int]:
            scores = okapi.get_scores(tokenizer.tokenize(query))
            top = np.argsort(-scores, kind="stable")[:k]
            return [int(i) for i in top if scores[i] > 0]

        tokenize_ms: list[float] = []
        for query in queries:
            t0 = time.perf_counter()
            tokenizer.tokenize(query)
            tokenize_ms.append((time.perf_counter() - t0) * 1000)

        ours_ms: list[float] = []
        theirs_ms: list[float] = []
        for query in queries:
            t0 = time.perf_counter()
            ours.search_sync(query, 5)
            t1 = time.perf_counter()
            rank_bm25_search(query, 5)
            t2 = time.perf_counter()
            ours_ms.append((t1 - t0) * 1000)
            theirs_ms.append((t2 - t1) * 1000)
        agree = sum(
            {h.id for h in ours.search_sync(q, 1)}
            == {passages[i].id for i in rank_bm25_search(q, 1)}
            for q in queries[:100]
        )
        compared = min(100, len(queries))

    p50, p99 = C.percentile(ours_ms, 50), C.percentile(ours_ms, 99)
    r50, r99 = C.percentile(theirs_ms, 50), C.percentile(theirs_ms, 99)
    t50, t99 = C.percentile(tokenize_ms, 50), C.percentile(tokenize_ms, 99)
    print(
        f"collection: {args.rows:,} CSV rows + {args.pages} PDF pages -> {stats.passages:,} "
        f"passages in {stats.files} files; {len(queries):,} queries, top 5"
    )
    rows = [
        ["read + chunk the files (shared)", C.fmt(read_s), "same passages", "-"],
        ["tokenize the passages (shared)", C.fmt(tokenize_s), "same tokens", "-"],
        [
            "index from tokens, s",
            C.fmt(bm25s_build, 3),
            C.fmt(okapi_build, 3),
            f"{okapi_build / bm25s_build:.2f}x",
        ],
        ["first use: read, tokenize, index, cache, s", C.fmt(first_use), "-", "-"],
        ["reopen from the disk cache, s", C.fmt(reopen, 3), "-", "-"],
        ["query p50, ms (incl. tokenizing it)", C.fmt(p50, 3), C.fmt(r50, 3), f"{r50 / p50:.2f}x"],
        ["query p99, ms", C.fmt(p99, 3), C.fmt(r99, 3), f"{r99 / p99:.2f}x"],
        [
            "of which tokenizing the query, p50 / p99 ms (shared)",
            f"{C.fmt(t50, 3)} / {C.fmt(t99, 3)}",
            "same",
            "-",
        ],
    ]
    print(C.table(["what", "Stagecast (bm25s)", "rank-bm25 BM25Okapi", "rank-bm25 / ours"], rows))
    print(f"same top hit on {agree} of {compared} queries (Lucene and Okapi idf differ)")
    print("target: none set by the issue; the ratio beside rank-bm25 is the figure to report")


if __name__ == "__main__":
    main()
