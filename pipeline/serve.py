"""`fedrec serve`: a JSON API and a page over the whole pipeline (profile → retrieval → LLM rerank → explanation).

Needs the `serve` extra (FastAPI, uvicorn). The HTTP layer only translates: `Demo` holds the recommender and the optional trained run and
answers in plain dicts; `create_app` maps them to FastAPI routes with pydantic models. Work that
touches the model runs on a small thread pool behind a bounded queue, with a timeout, so a slow
or failing LLM gives a 503 with its reason instead of a hang.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt

from pipeline.errors import DataError, FedrecError, RequestError, check_id
from pipeline.llm.base import LLMError
from pipeline.recommender import Recommender

if TYPE_CHECKING:
    from pipeline.explain import Explanation

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_HISTORY = 500
"""Longest ad-hoc history a request may send."""
EXPLAINED = 3
"""Top picks explained per request."""
MAX_BODY_BYTES = 256 * 1024
"""Largest request body accepted (a full 500-item history is about 25 KB); larger bodies get 413."""
ItemId = Annotated[int | str, PlainValidator(check_id, json_schema_input_type=int | str)]
"""A user or item id as the dataset spells it: an integer or a non-empty string, never a bool or a float (`pipeline.errors.check_id`, as in batch rows)."""
_REQUEST = ConfigDict(extra="forbid", allow_inf_nan=False)


class HistoryItem(BaseModel):
    model_config = _REQUEST

    item_id: ItemId = Field(description="Item id as in the dataset (e.g. a MovieLens movieId).")
    rating: float | None = Field(default=None, ge=0, le=10, description="Optional rating on the dataset's scale.")


class RecommendRequest(BaseModel):
    """Either `user_id` (an existing user: their history before the test item) or `history` (ad hoc)."""

    model_config = _REQUEST

    user_id: ItemId | None = Field(default=None, description="An existing user id of the dataset.")
    history: list[HistoryItem] | None = Field(default=None, max_length=MAX_HISTORY, description="Liked items, oldest first.")
    k: StrictInt = Field(default=10, ge=1, le=50, description="How many items to return.")
    soft_prompt: bool = Field(default=False, description="Rerank with the trained soft prompt and the user and item tokens of the loaded run.")
    fusion_weight: float | None = Field(default=None, ge=0, le=1, description="LLM weight in the fused score (None: configured/tuned).")
    explain: bool = Field(default=True, description="Explain the top picks from their facts (nearest history items, shared genres, rank movement).")


class Item(BaseModel):
    item_id: int | str
    title: str


class Candidate(Item):
    retrieval_rank: int
    retrieval_score: float


class Ranked(Item):
    rank: int
    retrieval_rank: int
    llm_probability: float = Field(description="The LLM's probability of this candidate's label (0 when not reranked).")
    score: float
    moved: int = Field(description="Places gained (+) or lost (-) against the retrieval order.")


class NearItem(Item):
    similarity: float = Field(description="Cosine similarity to the pick in the explanation's space.")
    shared_genres: list[str] = Field(description="Genres this history item and the pick both have in the catalogue.")


class Explained(Item):
    """One pick's grounded facts and the sentence shown for them."""

    rank: int
    retrieval_rank: int | None
    moved: int | None = Field(description="Places gained (+) or lost (-) by reranking (None when not reranked).")
    movement: str = Field(description="The rank movement in words.")
    genres: list[str]
    space: Literal["tower", "text"] = Field(description="Where the nearest history items were found: the trained tower or the item texts.")
    nearest: list[NearItem] = Field(description="The history items closest to the pick, nearest first.")
    sentence: str
    source: Literal["template", "llm"] = Field(description="Who wrote the sentence: the fixed template or the LLM.")
    fallback: str | None = Field(description="Why the LLM's sentence was replaced by the template (None when it was not).")


class RecommendResponse(BaseModel):
    profile: str
    history: list[Item]
    candidates: list[Candidate]
    ranked: list[Ranked]
    explanation: str | None = Field(description="The sentences of `explanations`, one per line (None when explanations are off).")
    explanations: list[Explained] = Field(description="The top picks' grounded facts and sentences (empty when explanations are off).")
    soft_prompt: bool
    fusion_weight: float
    timings_ms: dict[str, float]


class Status(BaseModel):
    dataset: str
    users: int
    items: int
    index_size: int
    model: str
    backend: str
    retrieval: str
    """Where candidates come from: the trained run's tower over the client's FAISS index, or the zero-shot text fallback."""
    soft_prompt: dict[str, Any]
    queue: dict[str, int]


class Busy(Exception):
    """The work queue is full (503)."""


class NotFound(Exception):
    """The request names something that does not exist (404)."""


class BadInput(ValueError):
    """The request is well-formed but cannot be served as it is (422)."""


class Unavailable(Exception):
    """The request asks for something this server has not loaded (409)."""


def check_limits(timeout_s: float, max_queue: int) -> None:
    """Refuse a request timeout that is not a finite number of seconds > 0 (click's range check lets nan through) or an
    empty queue; `fedrec serve` calls it before it loads any model."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise FedrecError(f"--timeout must be a finite number of seconds, got {timeout_s}; give a value > 0")
    if max_queue < 1:
        raise FedrecError(f"--max-queue must be >= 1, got {max_queue}")


class Demo:
    """What the app serves: one recommender and the trained run it serves, if any (tower, soft prompt and curves).

    Args:
        rec: the recommender (dataset, its trained run or the zero-shot fallback, LLM backend).
        timeout_s: longest wait for one request's model work.
        max_queue: requests admitted at once (running + waiting); more get 503.
    """

    def __init__(self, rec: Recommender, *, timeout_s: float = 120.0, max_queue: int = 32) -> None:
        check_limits(timeout_s, max_queue)
        self.rec = rec
        self.timeout_s = timeout_s
        self.max_queue = max_queue
        self._admitted = 0
        self._count_lock = threading.Lock()
        self._retrieval_lock = threading.Lock()  # embedder, tokenizer and FAISS calls: one at a time
        # In-process, the model work runs one request at a time (torch modules are not shared across threads);
        # against a server, up to llm.concurrency requests are in flight.
        in_process = rec.cfg.llm.backend == "transformers"
        self.pool = ThreadPoolExecutor(max_workers=1 if in_process else max(1, rec.cfg.llm.concurrency), thread_name_prefix="fedrec-serve")
        self.run = rec.trained.folder if rec.trained is not None else None
        self._trained: Any = None
        self._trained_reason: str | None = None
        self._zero_shot_reranker: Any = None
        self._load_lock = threading.Lock()

    # --- setup -------------------------------------------------------------------------------------
    def run_results(self) -> dict[str, Any] | None:
        return self.rec.trained.results if self.rec.trained is not None else None

    def trained(self):  # noqa: ANN201 - (reranker factory, round) or None
        """The run's soft prompt as a reranker factory, loaded once; None with `_trained_reason` when unavailable."""
        with self._load_lock:
            if self._trained is None and self._trained_reason is None:
                self._load_trained()
            return self._trained

    def _load_trained(self) -> None:
        run = self.rec.trained
        if run is None:
            self._trained_reason = "no trained run found (train one with `fedrec train --set soft_prompt.enabled=true`)"
            return
        if not run.has_soft_prompt:
            self._trained_reason = f"the run in {run.folder} trained no soft prompt (soft_prompt.enabled=false)"
            return
        try:
            reranker = run.reranker(self.rec)
        except (FedrecError, ValueError, KeyError, RuntimeError) as exc:  # any reason the prompt cannot be used is reported; the page still works
            self._trained_reason = f"the run in {run.folder} cannot be used: {exc}"
            log.warning("%s", self._trained_reason)
            return
        self._trained = (lambda weight: _with_weight(reranker, weight), run.best_round)

    def _zero_shot(self, weight: float):  # noqa: ANN202 - Reranker
        with self._load_lock:
            if self._zero_shot_reranker is None:
                self._zero_shot_reranker = self.rec.reranker(fusion_weight=weight, trained=False)
        return _with_weight(self._zero_shot_reranker, weight)

    # --- answers -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        trained = self.trained()
        soft = {"loaded": trained is not None, "run": str(self.run) if self.run else None}
        soft.update({"round": trained[1]} if trained else {"reason": self._trained_reason})
        return {
            "dataset": self.rec.dataset.name, "users": self.rec.dataset.n_users, "items": self.rec.dataset.n_items,
            "index_size": len(self.rec.index), "model": self.rec.cfg.llm.model, "backend": self.rec.backend.describe(),
            "retrieval": self.rec.retrieval_source, "soft_prompt": soft, "queue": {"admitted": self._admitted, "max": self.max_queue},
        }

    def search(self, query: str, limit: int) -> list[dict[str, Any]]:
        """Items whose title contains every word of `query` (case-insensitive), shortest titles first."""
        words = query.casefold().split()
        cat = self.rec.dataset.catalog
        hits = [i for i in range(len(cat)) if all(w in cat.label(i).casefold() for w in words)]
        hits.sort(key=lambda i: (len(cat.titles[i]), i))
        return [self._item(i) for i in hits[:limit]]

    def users(self, limit: int) -> list[dict[str, Any]]:
        histories = self.rec.split.histories("test")
        return [{"user_id": self.rec.dataset.user_id(u), "history_length": len(histories[u])}
                for u in range(min(limit, self.rec.dataset.n_users))]

    def run_curves(self) -> dict[str, Any]:
        try:
            results = self.run_results()
        except FedrecError as exc:
            return {"available": False, "reason": str(exc)}
        if results is None:
            return {"available": False, "reason": "no federated run found; `fedrec train --config …` writes one"}
        history = [h for h in results["history"] if isinstance(h, dict)]
        return {
            "available": True, "run": str(self.run), "rounds": results.get("rounds"), "clients": results.get("clients"),
            "engine": results.get("engine"),
            "valid_ndcg10": [h.get("valid", {}).get("N@10") for h in history],
            "bytes_up": [h.get("bytes_up") for h in history], "bytes_down": [h.get("bytes_down") for h in history],
            "test": results.get("test"), "test_rerank": {k: v for k, v in (results.get("test_rerank") or {}).items() if k != "by_client"},
        }

    def _item(self, i: int) -> dict[str, Any]:
        return {"item_id": self.rec.dataset.catalog.item_id(i), "title": self.rec.dataset.catalog.label(i)}

    def _explained(self, e: Explanation) -> dict[str, Any]:
        f = e.facts
        return {**self._item(f.item), "rank": f.rank, "retrieval_rank": f.retrieval_rank, "moved": f.moved, "movement": f.movement,
                "genres": list(f.genres), "space": f.space,
                "nearest": [{**self._item(n.item), "similarity": n.similarity, "shared_genres": list(n.shared_genres)} for n in f.neighbours],
                "sentence": e.sentence, "source": e.source, "fallback": e.fallback}

    def recommend(self, request: RecommendRequest) -> dict[str, Any]:
        """The whole pipeline for one history; runs on the worker pool."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        history = None if request.history is None else [h.item_id for h in request.history]
        ratings = None if request.history is None else [h.rating for h in request.history]
        try:
            with self._retrieval_lock:
                rerank_request = self.rec.request(user_id=request.user_id, history=history, ratings=ratings, split="test")
        except DataError as exc:
            raise NotFound(f"user_id: {exc}") from None
        except RequestError as exc:
            raise BadInput(f"{exc}{'; find ids with /api/items?q=…' if exc.field == 'history' else ''}") from None
        profile, found = rerank_request.profile, list(rerank_request.candidates)
        timings["retrieve"] = (time.perf_counter() - start) * 1000
        trained = self.trained() if request.soft_prompt else None
        if request.soft_prompt and trained is None:
            raise Unavailable(f"`soft_prompt`: no trained soft prompt is loaded ({self._trained_reason})")
        weight = request.fusion_weight if request.fusion_weight is not None else self.rec.fusion_weight()
        start = time.perf_counter()
        reranker = trained[0](weight) if trained else self._zero_shot(weight)
        ranked = reranker.rerank(rerank_request)[: request.k]
        timings["rerank"] = (time.perf_counter() - start) * 1000
        explained: list[dict[str, Any]] = []
        if request.explain and ranked:
            from pipeline.explain import Pick

            start = time.perf_counter()
            explained = [self._explained(e) for e in self.rec.explain_picks(rerank_request.history, Pick.from_ranked(ranked[:EXPLAINED]))]
            timings["explain"] = (time.perf_counter() - start) * 1000
        return {
            "profile": profile,
            "history": [self._item(int(i)) for i in rerank_request.history[-50:]],
            "candidates": [{**self._item(c.item), "retrieval_rank": r + 1, "retrieval_score": float(c.score)} for r, c in enumerate(found)],
            "ranked": [{**self._item(x.item), "rank": r + 1, "retrieval_rank": x.retrieval_rank + 1,
                        "llm_probability": float(math.exp(x.llm_score)) if self.rec.cfg.rerank.method == "verbalizer" else 0.0,
                        "score": float(x.score), "moved": x.retrieval_rank - r} for r, x in enumerate(ranked)],
            "explanation": "\n".join(e["sentence"] for e in explained) if request.explain else None, "explanations": explained,
            "soft_prompt": request.soft_prompt, "fusion_weight": float(weight), "timings_ms": timings,
        }

    async def submit(self, fn, *args):  # noqa: ANN001, ANN201 - run `fn` on the pool, bounded and timed
        with self._count_lock:
            if self._admitted >= self.max_queue:
                raise Busy(f"{self._admitted} requests are already queued (limit {self.max_queue}); retry shortly")
            self._admitted += 1
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=self.timeout_s)

    def _release(self) -> None:
        with self._count_lock:
            self._admitted -= 1


def _with_weight(reranker, weight: float):  # noqa: ANN001, ANN202 - a copy, so concurrent requests do not share the setting
    out = copy.copy(reranker)
    if hasattr(out, "fusion_weight"):
        out.fusion_weight = weight
    return out


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 before it is read into memory (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is over the {self.limit:,}-byte limit; send at most {MAX_HISTORY} history items"
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await error(413, message)(scope, receive, send)
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise HTTPException(status_code=413, detail=message)
            return event

        return await self.app(scope, bounded, send)


def create_app(demo: Demo) -> FastAPI:
    """The FastAPI app: JSON API under /api, the page at /."""
    app = FastAPI(title="fedrec", version="0.1.0", description="Federated LLM recommendation: profile → retrieval → rerank → explanation.")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input is never echoed back: it may be huge, or NaN (which JSON cannot encode).
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", ""))}
                  for e in exc.errors()[:20]]
        detail = "; ".join(f"{'.'.join(p for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/status", response_model=Status)
    async def status() -> Any:
        try:
            return await demo.submit(demo.status)
        except Busy as exc:
            return error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the backend failing to load is a 503 with its reason
            return error(503, f"the LLM backend is unavailable: {exc}")

    @app.get("/api/items", response_model=list[Item])
    def items(q: Annotated[str, Query(min_length=1, max_length=200, description="Words of the title")],
              limit: Annotated[int, Query(ge=1, le=50)] = 10) -> Any:
        return demo.search(q, limit)

    @app.get("/api/users")
    def users(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        return demo.users(limit)

    @app.get("/api/run")
    def run() -> Any:
        return demo.run_curves()

    @app.post("/api/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> Any:
        try:
            return await demo.submit(demo.recommend, request)
        except NotFound as exc:
            return error(404, str(exc))
        except BadInput as exc:
            return error(422, str(exc))
        except Unavailable as exc:
            return error(409, str(exc))
        except Busy as exc:
            return error(503, str(exc))
        except TimeoutError:
            return error(503, f"the LLM did not answer within {demo.timeout_s:.0f} s; try again or raise --timeout")
        except (LLMError, OSError, RuntimeError) as exc:
            return error(503, f"the LLM backend failed: {exc}")
        except Exception as exc:  # noqa: BLE001 - an unexpected failure is logged and answered as JSON, never a bare 500 page
            log.exception("recommend failed")
            return error(500, f"internal error ({type(exc).__name__}: {exc}); the server log has the traceback")

    return app


def serve(rec: Recommender, *, host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 120.0, max_queue: int = 32) -> None:
    """Start uvicorn with the app (blocks)."""
    import uvicorn

    demo = Demo(rec, timeout_s=timeout_s, max_queue=max_queue)
    uvicorn.run(create_app(demo), host=host, port=port, log_level="warning")
