"""LangChain adapter: a fedrec retriever as a `BaseRetriever` returning item `Document`s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as exc:  # pragma: no cover - exercised only without the dependency
    raise ImportError("the LangChain adapter needs langchain-core; install it with `pip install langchain-core`") from exc

from pydantic import ConfigDict

from retrieval.retriever import Query, Retriever


class ItemRetriever(BaseRetriever):
    """Retrieves catalogue items for a text query (a profile or free text).

    Documents carry `item_id` (the catalogue's raw id), `item_index`, `score` and the item text.
    Set `history` to the user's item indices to exclude them and to pool them into the query.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    item_texts: Sequence[str]
    item_ids: Sequence[Any]
    k: int = 20
    history: Sequence[int] = ()

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        found = self.retriever.retrieve(Query(history=tuple(self.history), profile=query), self.k)
        return [
            Document(
                page_content=self.item_texts[c.item],
                metadata={"item_id": _plain(self.item_ids[c.item]), "item_index": c.item, "score": c.score},
            )
            for c in found
        ]


def _plain(value: Any) -> Any:
    """numpy scalars → Python scalars, so documents serialise cleanly."""
    return value.item() if hasattr(value, "item") else value


__all__ = ["ItemRetriever"]
