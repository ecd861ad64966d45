"""LangChain adapter: the verbalizer reranker as a `BaseDocumentCompressor`.

It reranks documents from any LangChain retriever: each document's text is a candidate title,
the query is the user profile, and a `score` in the metadata (as fedrec's `ItemRetriever` sets)
is fused with the LLM score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as exc:  # pragma: no cover - exercised only without the dependency
    raise ImportError("the LangChain adapter needs langchain-core; install it with `pip install langchain-core`") from exc

from pydantic import ConfigDict

from pipeline.config import RerankConfig
from pipeline.data import Catalog
from pipeline.llm.base import LLMBackend
from pipeline.rerank import PromptBuilder, RerankRequest, VerbalizerReranker
from retrieval import Candidate


class LLMRerankCompressor(BaseDocumentCompressor):
    """Reorders documents by LLM label log-probabilities; adds `llm_score` and `relevance_score` metadata."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: LLMBackend
    rerank: RerankConfig = RerankConfig()
    fusion_weight: float = 1.0
    top_n: int | None = None
    max_title_chars: int = 200

    def compress_documents(self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        n = len(documents)
        catalog = Catalog(
            item_ids=np.arange(n), titles=[d.page_content[: self.max_title_chars] for d in documents],
            years=[None] * n, genres=[()] * n, tags=[()] * n,
        )
        scores = [float(d.metadata.get("score", 0.0)) for d in documents]
        request = RerankRequest(query, (), tuple(Candidate(i, s) for i, s in enumerate(scores)))
        reranker = VerbalizerReranker(self.backend, PromptBuilder(self.backend, catalog, self.rerank), fusion_weight=self.fusion_weight)
        ranked = reranker.rerank(request)[: self.top_n]
        return [
            Document(page_content=documents[x.item].page_content,
                     metadata={**documents[x.item].metadata, "llm_score": x.llm_score, "relevance_score": x.score})
            for x in ranked
        ]


