"""Reranker ablation on ml-latest-small: zero-shot text prompt vs trained soft prompt vs soft prompt + item tokens.

A retrieval tower is trained centrally first (same recipe as bench_federation) and supplies 20
candidates per user. The LLM (SmolLM2-135M-Instruct, bf16 weights, fp32 label logits) stays frozen;
only the soft prompt (and, with item tokens, the projector from tower item embeddings) is trained,
LlamaRec-style (history minus its last item, positive inserted when the tower missed it). Scores
are HR@1 / NDCG@10 among the 20 candidates of the test step for held-out users, and full-ranking
test metrics of the reranked lists for them (a miss of the tower counts as 0).

Usage: python benchmarks/bench_ablation.py [--train-users 160] [--eval-users 120] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-users", type=int, default=160)
    parser.add_argument("--eval-users", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tower-epochs", type=int, default=10)
    args = parser.parse_args()
    os.environ["FEDREC_DATA_DIR"] = str(data_dir())

    import torch

    import prompts
    from pipeline.llm.softprompt import SoftPrompt, make_examples, train_soft_prompt
    from federation.task import initial_state, tower_config
    from pipeline.config import load_config
    from pipeline.evaluate import list_metrics
    from pipeline.recommender import Recommender
    from pipeline.rerank import PromptBuilder, RerankRequest, VerbalizerReranker
    from retrieval.tower import RetrievalTower, train_tower

    cache = str(Path.home() / ".cache" / "fedrec")
    cfg = load_config(REPO / "configs" / "ml-latest-small.yaml", [f"cache_dir={cache}", "tower.lr=0.003", "llm.dtype=bfloat16"])
    rec = Recommender.from_config(cfg)
    rng = np.random.default_rng(0)
    order = rng.permutation(rec.dataset.n_users)
    train_users, eval_users = order[: args.train_users], order[args.train_users : args.train_users + args.eval_users]

    start = time.perf_counter()
    tower = RetrievalTower(rec.item_vectors, tower_config(cfg.federation))
    tower.load_arrays(initial_state(rec.item_vectors, cfg.federation))
    train_tower(tower, rec.split.train(), epochs=args.tower_epochs, lr=cfg.federation.lr)
    with torch.no_grad():
        items = tower.item_embeddings()  # eval mode: the same vectors top_candidates scores with
    tower_minutes = (time.perf_counter() - start) / 60
    n = cfg.retrieval.num_candidates

    def requests_for(histories: list[np.ndarray], profiles: list[str]) -> list[RerankRequest]:
        _, candidates = tower.top_candidates(histories, n)
        return [RerankRequest(p, tuple(h.tolist()), tuple(c)) for h, p, c in zip(histories, profiles, candidates, strict=True)]

    train_hist = [rec.split.train()[u] for u in train_users]
    train_profiles = [rec.text_profile(h[:-1]) for h in train_hist]
    train_requests = requests_for([h[:-1] for h in train_hist], train_profiles)
    train_targets = [int(h[-1]) for h in train_hist]
    test_hist = [rec.split.histories("test")[u] for u in eval_users]
    test_requests = requests_for(test_hist, [rec.profile(int(u), "test") for u in eval_users])
    test_targets = rec.split.targets("test")[eval_users]

    backend = rec.backend
    labels = prompts.labels_for(n)
    rows = []
    for name, template, tokens, trained in (
        ("zero-shot text prompt", "rerank.v1", False, False),
        ("trained soft prompt (text only)", "rerank.v1", False, True),
        ("trained soft prompt + item tokens", "rerank.v2", True, True),
    ):
        builder = PromptBuilder(backend, rec.dataset.catalog, cfg.rerank.model_copy(update={"template": template}), item_tokens=tokens)
        module = SoftPrompt(cfg.soft_prompt.tokens, backend.hidden_size, cfg.tower.dim)
        start = time.perf_counter()
        loss = float("nan")
        if trained:
            examples = make_examples(builder, train_requests, train_targets)
            stats = train_soft_prompt(module, backend, examples, items, labels, epochs=args.epochs, batch_size=cfg.soft_prompt.batch_size,
                                      lr=cfg.soft_prompt.lr)
            loss = stats["loss"]
        train_minutes = (time.perf_counter() - start) / 60
        reranker = VerbalizerReranker(
            backend, builder, fusion_weight=1.0, soft_prompt=module.prompt.detach() if trained else None,
            item_tokens=(lambda ids, m=module: m.item_tokens(items[list(ids)]).detach()) if tokens else None,
        )
        ranked = [[x.item for x in r] for r in reranker.rerank_batch(test_requests)]
        metrics = list_metrics(ranked, test_targets, [1, 10], rec.dataset.n_items)
        rows.append([name, f"{metrics['R@1']:.4f}", f"{metrics['R@10']:.4f}", f"{metrics['N@10']:.4f}", f"{metrics['MRR']:.4f}",
                     f"{loss:.3f}" if trained else "—", f"{train_minutes:.1f}"])
        print(rows[-1], flush=True)
    tower_order = [[c.item for c in r.candidates] for r in test_requests]
    base = list_metrics(tower_order, test_targets, [1, 10], rec.dataset.n_items)
    rows.insert(0, ["tower order (no LLM)", f"{base['R@1']:.4f}", f"{base['R@10']:.4f}", f"{base['N@10']:.4f}", f"{base['MRR']:.4f}", "—", "—"])
    ceiling = float(np.mean([t in c for t, c in zip(test_targets, tower_order, strict=True)]))
    table = markdown_table(["reranker", "R@1", "R@10", "N@10", "MRR", "train loss", "train min"], rows)
    print(table)
    update_results(
        "bench:ablation", "Reranker ablation: text prompt vs soft prompt vs soft prompt + item tokens",
        f"python benchmarks/bench_ablation.py --train-users {args.train_users} --eval-users {args.eval_users} --epochs {args.epochs}",
        f"ml-latest-small, centrally trained tower ({args.tower_epochs} epochs, {tower_minutes:.1f} min) retrieves {n} candidates; "
        f"{args.train_users} users train the soft prompt ({cfg.soft_prompt.tokens} tokens; Adam lr {cfg.soft_prompt.lr}, "
        f"batch {cfg.soft_prompt.batch_size}, {args.epochs} epoch), {len(eval_users)} other users are evaluated on their test "
        f"item (full ranking; tower misses count as 0; tower Recall@{n} ceiling {ceiling:.4f}). SmolLM2-135M-Instruct, bf16 weights, "
        f"fp32 label logits, LLM frozen. Seeded; one run. Small samples: differences of one or two hits are noise.\n\n{table}",
    )


if __name__ == "__main__":
    main()
