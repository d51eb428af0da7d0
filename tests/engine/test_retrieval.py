"""Retrieval: quality on the sample collection, ingestion of every format, the on-disk index cache,
bad collections, and citation markers."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from stagecast.engine import retrieval
from stagecast.engine.citations import find_citations
from stagecast.engine.collections import CollectionError, load_file
from stagecast.engine.events import Citation
from stagecast.engine.retrieval import Tokenizer, open_index
from tests.engine.sample_questions import QUESTIONS
from tests.make_sample_collection import write_docx, write_pdf, write_xlsx

SAMPLE = Path(__file__).resolve().parents[2] / "chains" / "collections" / "docs_qa"


@pytest.fixture(autouse=True)
def _fresh_memory() -> None:
    retrieval._memory.clear()  # every test opens indexes as a new process would


def _rates(mode: str, cache: Path) -> dict[str, tuple[int, int, int, float]]:
    """Per language: (questions, right passage first, in the top 3, mean reciprocal rank@3)."""
    index = open_index(SAMPLE, tokenizer=Tokenizer(mode), cache_dir=cache)
    found: dict[str, list[int]] = {"en": [], "ko": []}
    for language, question, expected in QUESTIONS:
        ranked = [hit.id for hit in index.search_sync(question, 3)]
        found[language].append(ranked.index(expected) + 1 if expected in ranked else 0)
    return {
        language: (
            len(ranks),
            sum(r == 1 for r in ranks),
            sum(r > 0 for r in ranks),
            sum(1 / r for r in ranks if r) / len(ranks),
        )
        for language, ranks in found.items()
    }


def test_the_questions_name_real_passages_half_of_them_korean() -> None:
    ids = {p.id for p in open_index(SAMPLE, cache_dir=None).passages}
    assert [expected for _, _, expected in QUESTIONS if expected not in ids] == []
    languages = [language for language, _, _ in QUESTIONS]
    assert len(QUESTIONS) >= 20
    assert languages.count("ko") * 2 >= len(QUESTIONS)


def test_retrieval_quality_on_the_sample_collection(tmp_path: Path) -> None:
    """The right passage is in the top 3 for >= 90 % of the questions (kiwi, the default)."""
    kiwi = _rates("kiwi", tmp_path / "kiwi")
    ngram = _rates("ngram", tmp_path / "ngram")
    for mode, rates in (("kiwi", kiwi), ("ngram", ngram)):
        for language, (total, first, top3, mrr) in rates.items():
            print(
                f"retrieval {mode:<5} {language}: top-1 {first}/{total}, top-3 {top3}/{total} "
                f"({top3 / total:.0%}), MRR@3 {mrr:.3f}"
            )
    total = sum(r[0] for r in kiwi.values())
    top3 = sum(r[2] for r in kiwi.values())
    print(f"retrieval kiwi overall: top-3 {top3}/{total} = {top3 / total:.1%}")
    assert top3 / total >= 0.9
    assert kiwi["ko"][2] / kiwi["ko"][0] >= 0.9
    assert kiwi["en"][2] / kiwi["en"][0] >= 0.9
    # the measured reason kiwi is the default: it ranks Korean at least as well as bigrams
    assert kiwi["ko"][3] >= ngram["ko"][3]


def test_the_tokenizer_stems_english_and_analyses_korean() -> None:
    tokenizer = Tokenizer()
    assert tokenizer.tokenize("The refunds are running late") == ["refund", "run", "late"]
    assert tokenizer.tokenize("주문을 취소하려면 어떻게 해야 하나요?") == ["주문", "취소"]
    assert Tokenizer("ngram").tokenize("주문을 취소") == ["주문", "문을", "취소"]


# -- ingestion -----------------------------------------------------------------------------------


def _passages(path: Path) -> list[tuple[str, str, str, dict[str, object]]]:
    loaded = load_file(path, path.name)
    assert loaded.skipped is None
    return [(p.id, p.title, p.text, p.metadata) for p in loaded.passages]


def test_markdown_is_split_at_headings(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    path.write_text("# Guide\n\nIntro text.\n\n## Setup\n\nPlug it in.\n\n## Empty\n", "utf-8")
    assert _passages(path) == [
        (
            "guide.md#1",
            "guide: Guide",
            "# Guide\n\nIntro text.",
            {"file": "guide.md", "heading": "Guide"},
        ),
        (
            "guide.md#2",
            "guide: Setup",
            "## Setup\n\nPlug it in.",
            {"file": "guide.md", "heading": "Setup"},
        ),
    ]


def test_long_text_is_chunked_by_the_split_rules(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    sentence = "This sentence is exactly fifty characters long ok. "
    path.write_text(sentence * 100, "utf-8")
    loaded = load_file(path, "long.txt", chunk_size=1000, overlap=100)
    assert len(loaded.passages) == 6
    assert max(len(p.text) for p in loaded.passages) <= 1000
    assert [p.id for p in loaded.passages][:2] == ["long.txt#1", "long.txt#2"]


def test_pdf_gives_passages_per_page(tmp_path: Path) -> None:
    path = tmp_path / "manual.pdf"
    write_pdf(path)
    passages = _passages(path)
    assert [(i, t, m) for i, t, _, m in passages] == [
        ("manual.pdf#p1-1", "manual, page 1", {"file": "manual.pdf", "page": 1}),
        ("manual.pdf#p2-1", "manual, page 2", {"file": "manual.pdf", "page": 2}),
        ("manual.pdf#p3-1", "manual, page 3", {"file": "manual.pdf", "page": 3}),
    ]
    assert passages[1][2].startswith("Wi-Fi setup\nThe Aurora connects to 2.4 GHz Wi-Fi")


def test_docx_is_split_at_headings(tmp_path: Path) -> None:
    path = tmp_path / "w.docx"
    write_docx(path, [("Coverage", "Two years."), ("Claims", "Send the receipt.")], "Warranty")
    assert _passages(path) == [
        (
            "w.docx#1",
            "w: Coverage",
            "Coverage\n\nTwo years.",
            {"file": "w.docx", "heading": "Coverage"},
        ),
        (
            "w.docx#2",
            "w: Claims",
            "Claims\n\nSend the receipt.",
            {"file": "w.docx", "heading": "Claims"},
        ),
    ]


def test_csv_rows_are_passages_with_the_header_as_field_names(tmp_path: Path) -> None:
    path = tmp_path / "faq.csv"
    path.write_text('question,answer\n"Open, today?",Yes\n\n질문,답변\n', "utf-8")
    assert _passages(path) == [
        (
            "faq.csv#row2",
            "faq (row 2): Open, today?",
            "question: Open, today?\nanswer: Yes",
            {"file": "faq.csv", "row": 2, "fields": {"question": "Open, today?", "answer": "Yes"}},
        ),
        (
            "faq.csv#row4",
            "faq (row 4): 질문",
            "question: 질문\nanswer: 답변",
            {"file": "faq.csv", "row": 4, "fields": {"question": "질문", "answer": "답변"}},
        ),
    ]


def test_xlsx_rows_of_every_sheet_are_passages(tmp_path: Path) -> None:
    path = tmp_path / "support.xlsx"
    write_xlsx(path)
    passages = _passages(path)
    assert [(i, m.get("sheet"), m.get("row")) for i, _, _, m in passages] == [
        ("support.xlsx#Contacts!row2", "Contacts", 2),
        ("support.xlsx#Contacts!row3", "Contacts", 3),
        ("support.xlsx#고객센터!row2", "고객센터", 2),
        ("support.xlsx#고객센터!row3", "고객센터", 3),
        ("support.xlsx#고객센터!row4", "고객센터", 4),
    ]
    assert passages[0][1] == "support (Contacts, row 2): Customer support"
    assert passages[0][2] == (
        "team: Customer support\nhours: Monday to Friday, 9 am to 6 pm\n"
        "contact: phone 1-800-555-0199"
    )


@pytest.mark.parametrize("name", ["broken.pdf", "broken.xlsx", "broken.docx"])
def test_a_corrupt_binary_file_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ok.txt").write_text("The shop opens at nine.", "utf-8")
    (tmp_path / name).write_bytes(b"this is not a real document")
    with caplog.at_level(logging.WARNING, logger="stagecast.collections"):
        index = open_index(tmp_path)
    assert [p.id for p in index.passages] == ["ok.txt#1"]
    assert index.stats is not None
    assert [str(p) for p, _ in index.stats.skipped] == [str(tmp_path / name)]
    ours = [r.getMessage() for r in caplog.records if r.name == "stagecast.collections"]
    assert [m.split(": skipped: ")[0] for m in ours] == [str(tmp_path / name)]


def test_a_text_file_that_is_not_utf8_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(CollectionError) as caught:
        open_index(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'latin1.txt'}: cannot read: not UTF-8 text"


def test_a_missing_folder_and_an_empty_collection_are_errors_naming_the_path(
    tmp_path: Path,
) -> None:
    with pytest.raises(CollectionError) as caught:
        open_index(tmp_path / "nope")
    assert str(caught.value) == f"{tmp_path / 'nope'}: no such folder"
    (tmp_path / "notes.json").write_text("{}", "utf-8")
    (tmp_path / ".hidden.md").write_text("# hidden", "utf-8")
    with pytest.raises(CollectionError) as caught:
        open_index(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path}: empty collection: no .md, .txt, .pdf, .docx, .csv, .xlsx files"
    )
    (tmp_path / "blank.txt").write_text("  \n", "utf-8")
    with pytest.raises(CollectionError) as caught:
        open_index(tmp_path)
    assert str(caught.value) == f"{tmp_path}: empty collection: the files hold no text"


def test_an_empty_query_finds_nothing() -> None:
    index = open_index(SAMPLE)
    assert index.search_sync("", 5) == []
    assert index.search_sync("   ", 5) == []
    assert index.search_sync("the of and", 5) == []  # only stopwords


def test_min_score_and_top_k_limit_the_hits() -> None:
    index = open_index(SAMPLE)
    hits = index.search_sync("How long is the warranty?", 10)
    assert len(hits) > 3
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(index.search_sync("How long is the warranty?", 2)) == 2
    cut = hits[1].score
    assert cut is not None
    assert [h.id for h in index.search_sync("How long is the warranty?", 10, cut)] == [
        h.id for h in hits[:2]
    ]


# -- the cache -----------------------------------------------------------------------------------


def _copy_sample(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    shutil.copytree(SAMPLE, folder, ignore=shutil.ignore_patterns(".stagecast-index"))
    return folder


def _reopen(folder: Path) -> retrieval.IndexStats:
    retrieval._memory.clear()
    stats = open_index(folder).stats
    assert stats is not None
    return stats


def test_the_index_is_cached_beside_the_collection_and_reused(tmp_path: Path) -> None:
    folder = _copy_sample(tmp_path)
    first = _reopen(folder)
    assert (first.rebuilt, first.passages, first.files) == (True, 30, 10)
    assert first.location == folder / ".stagecast-index"
    assert sorted(os.listdir(first.location)) == ["bm25", "manifest.json", "passages.json"]
    second = _reopen(folder)
    assert (second.rebuilt, second.passages) == (False, 30)
    # a touch changes the mtime, not the content: still reused
    os.utime(folder / "shipping.txt", (1, 1))
    assert _reopen(folder).rebuilt is False


def test_an_edit_an_addition_and_a_deletion_rebuild_the_index(tmp_path: Path) -> None:
    folder = _copy_sample(tmp_path)
    assert _reopen(folder).rebuilt is True
    shipping = folder / "shipping.txt"
    shipping.write_text(shipping.read_text("utf-8") + "\nDrones deliver to islands.\n", "utf-8")
    assert _reopen(folder).rebuilt is True
    assert [h.id for h in open_index(folder).search_sync("drones", 3)] == ["shipping.txt#1"]
    (folder / "new.md").write_text("# Pets\n\nDogs are welcome in the shop.", "utf-8")
    stats = _reopen(folder)
    assert (stats.rebuilt, stats.files, stats.passages) == (True, 11, 31)
    assert [h.id for h in open_index(folder).search_sync("dogs welcome", 3)] == ["new.md#1"]
    (folder / "new.md").unlink()
    stats = _reopen(folder)
    assert (stats.rebuilt, stats.files, stats.passages) == (True, 10, 30)
    assert open_index(folder).search_sync("dogs welcome", 3) == []
    assert _reopen(folder).rebuilt is False


def test_a_cache_dir_keeps_the_collection_folder_clean(tmp_path: Path) -> None:
    folder = _copy_sample(tmp_path)
    retrieval._memory.clear()
    stats = open_index(folder, cache_dir=tmp_path / "cache").stats
    assert stats is not None
    assert stats.location.parent == tmp_path / "cache"
    assert not (folder / ".stagecast-index").exists()


# -- citations -----------------------------------------------------------------------------------


def test_markers_map_to_the_sources_in_prompt_order_unmatched_included() -> None:
    given = [("a.md#1", "search"), ("b.csv#row2", "search"), ("c.pdf#p1-1", "more")]
    text = "Refunds take a week [2]. Both agree [1, 3][2]. See also [7] and [0]; not [x]."
    assert find_citations(text, given) == [
        Citation(marker=2, source_id="b.csv#row2", stage="search"),
        Citation(marker=1, source_id="a.md#1", stage="search"),
        Citation(marker=3, source_id="c.pdf#p1-1", stage="more"),
        Citation(marker=7, source_id=None, stage=None),
        Citation(marker=0, source_id=None, stage=None),
    ]
    assert find_citations("no markers here", given) == []
    assert find_citations("[1]", []) == [Citation(marker=1, source_id=None, stage=None)]


def test_equal_scores_come_in_passage_order_whatever_top_k(tmp_path: Path) -> None:
    for name in ("c.txt", "a.txt", "b.txt"):
        (tmp_path / name).write_text("The shop opens at nine.", "utf-8")
    (tmp_path / "d.txt").write_text("Nothing about it.", "utf-8")
    index = open_index(tmp_path)
    assert [h.id for h in index.search_sync("shop", 1)] == ["a.txt#1"]
    assert [h.id for h in index.search_sync("shop", 2)] == ["a.txt#1", "b.txt#1"]
    assert [h.id for h in index.search_sync("shop", 10)] == ["a.txt#1", "b.txt#1", "c.txt#1"]
