"""Item-text embedding, FAISS indices and retrievers. Imports neither flwr nor vllm."""

from retrieval.embed import TextEmbedder
from retrieval.index import ItemIndex, brute_force
from retrieval.retriever import Candidate, EmbeddingRetriever, Query, Retriever, TowerRetriever

__all__ = ["Candidate", "EmbeddingRetriever", "ItemIndex", "Query", "Retriever", "TextEmbedder", "TowerRetriever", "brute_force"]
