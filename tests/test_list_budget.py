"""List answers keep the newest entries that fit one message and say how many they left out."""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator.service import within_budget


class Entry(BaseModel):
    n: int
    text: str


def test_the_newest_entries_that_fit_are_kept_in_order_and_the_rest_counted() -> None:
    entries = [Entry(n=i, text="x" * 100) for i in range(10, 60)]  # all the same size
    size = len(entries[0].model_dump_json()) + 1
    kept, omitted = within_budget(entries, budget=size * 10)
    assert [e.n for e in kept] == list(range(50, 60))
    assert omitted == 40
    assert within_budget(entries, budget=10**9) == (entries, 0)
    assert within_budget([], budget=10) == ([], 0)


def test_one_huge_newest_entry_leaves_nothing_rather_than_an_oversized_answer() -> None:
    entries = [Entry(n=0, text="small"), Entry(n=1, text="x" * 10_000)]
    assert within_budget(entries, budget=1000) == ([], 2)
