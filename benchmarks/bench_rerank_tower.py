"""The LLM reranker retrained on a trained tower run's candidates (ml-latest-small, all users).

The run (a `fedrec train` folder, e.g. one of bench_tower's federated runs) supplies the tower and
each client's FAISS index. A soft prompt and the item-token projector (`rerank.v2`: one projected
tower item embedding after each candidate's title) are trained through the frozen SmolLM2-135M on
`--train-users` users: history minus its last training item → the served top-20 → that item
(inserted at a random slot when missed, LlamaRec-style). Then every user's validation and test
candidates are reranked; the fusion weight with the tower score is chosen on validation from a grid
that includes 0 (the tower order), so the fused row is never below the tower on validation.

Usage: python benchmarks/bench_rerank_tower.py --run runs/bench-tower/runs/train-ml-latest-small-<hash>
       [--train-users 300] [--epochs 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import REPO, data_dir, markdown_table, update_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a fedrec train run folder on ml-latest-small")
    parser.add_argument("--train-users", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-users", type=int, default=None, help="evaluate only the first N users (a smoke run; prints only)")
    args = parser.parse_args()
    os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))

    import torch

    from pipeline.config import load_config
    from pipeline.evaluate import list_metrics
    from pipeline.llm.softprompt import SoftPrompt, make_examples, train_soft_prompt
    from pipeline.recommender import Recommender
    from pipeline.rerank import PromptBuilder, RerankRequest, choose_fusion_weight, fuse, order_by
    from pipeline.trained import trained_reranker
    from retrieval import Query

    sections = json.loads((args.run / "run.json").read_text())["fingerprint"]["sections"]
    overrides = [f"cache_dir={REPO / '.cache'}", "llm.dtype=bfloat16", "eval.splits=[valid,test]",
                 *(f"tower.{k}={v}" for k, v in sections["tower"].items()),
                 *(f"partition.{k}={v}" for k, v in sections["partition"].items())]
    rec = Recommender.from_config(load_config(REPO / "configs" / "ml-latest-small.yaml", overrides), run=args.run)
    run = rec.trained
    n = rec.cfg.retrieval.num_candidates
    rng = np.random.default_rng(args.seed)
    users = np.arange(rec.dataset.n_users if args.eval_users is None else args.eval_users)
    train_users = rng.permutation(users)[: args.train_users]

    train = rec.split.train()
    histories = [train[u][:-1] for u in train_users]
    found = rec.retriever.retrieve_batch([Query(tuple(h.tolist()), None, int(rec.client_of[u])) for h, u in zip(histories, train_users, strict=True)], n)
    requests = [RerankRequest(rec.text_profile(h, rec.dataset.ratings[u][: len(h)]), tuple(h.tolist()), tuple(c))
                for h, u, c in zip(histories, train_users, found, strict=True)]
    backend = rec.backend
    builder = PromptBuilder(backend, rec.dataset.catalog, rec.cfg.rerank.model_copy(update={"template": "rerank.v2"}), item_tokens=True)
    module = SoftPrompt(rec.cfg.soft_prompt.tokens, backend.hidden_size, run.item_embeddings.shape[1], seed=args.seed)
    examples = make_examples(builder, requests, [int(train[u][-1]) for u in train_users], seed=args.seed)
    start = time.perf_counter()
    stats = train_soft_prompt(module, backend, examples, torch.as_tensor(run.item_embeddings), builder.labels(n), epochs=args.epochs,
                              batch_size=rec.cfg.soft_prompt.batch_size, lr=rec.cfg.soft_prompt.lr, seed=args.seed)
    train_minutes = (time.perf_counter() - start) / 60
    print(f"trained on {len(examples)} prompts in {train_minutes:.1f} min: loss {stats['loss_first']:.3f} → {stats['loss']:.3f} "
          f"(ln {n} = {np.log(n):.3f})", flush=True)
    reranker = trained_reranker(rec, module.state_arrays(), run.item_embeddings)

    scored, seconds = {}, {}
    for split in ("valid", "test"):
        reqs = rec.rerank_requests(users, split)
        start, llm = time.perf_counter(), []
        for begin in range(0, len(reqs), 32):
            llm += reranker.llm_scores(reqs[begin : begin + 32])
            print(f"{split}: {begin + 32}/{len(reqs)} users", flush=True)
        scored[split], seconds[split] = (reqs, llm), time.perf_counter() - start
    valid_reqs, valid_llm = scored["valid"]
    weight, table = choose_fusion_weight(valid_reqs, valid_llm, rec.split.targets("valid")[users], rec.cfg.rerank.fusion_grid)
    rows = []
    for split in ("valid", "test"):
        reqs, llm = scored[split]
        targets = rec.split.targets(split)[users]
        items = [[c.item for c in r.candidates] for r in reqs]
        for name, w in (("tower order (FAISS top-20)", 0.0), ("trained soft prompt + item tokens", 1.0), (f"fusion {weight:g} (chosen on valid)", weight)):
            ranked = [[i[j] for j in order_by(fuse(np.array([c.score for c in r.candidates]), s, w))] for r, s, i in zip(reqs, llm, items, strict=True)]
            m = list_metrics(ranked, targets, [10, 20], rec.dataset.n_items)
            rows.append([split, name, f"{m['R@10']:.4f}", f"{m['N@10']:.4f}", f"{m['R@20']:.4f}", f"{m['MRR']:.4f}"])
    result = markdown_table(["split", "ranking", "R@10", "N@10", "R@20 (= tower ceiling)", "MRR"], rows)
    print(result)
    if args.eval_users is not None:
        return
    body = (
        f"Run `{args.run.name}` (best round {run.best_round}; tower shape {sections['tower']}). Soft prompt "
        f"({rec.cfg.soft_prompt.tokens} tokens) + item-token projector trained centrally through the frozen SmolLM2-135M-Instruct "
        f"(bf16 weights, fp32 label logits) on {len(examples)} users' last training item, {args.epochs} epoch, Adam lr "
        f"{rec.cfg.soft_prompt.lr}, batch {rec.cfg.soft_prompt.batch_size}, {train_minutes:.1f} min; loss {stats['loss_first']:.3f} → "
        f"{stats['loss']:.3f} against chance ln 20 = {np.log(20):.3f}. All {len(users)} users evaluated on valid and test (a tower miss "
        f"counts as 0); {len(users) / seconds['test']:.2f} users/s reranking test. One seed ({args.seed}). Fusion table on valid "
        f"(weight: N@10): {', '.join(f'{k:g}: {v:.4f}' for k, v in table.items())}.\n\n{result}"
    )
    update_results("bench:rerank-tower", "LLM reranker retrained on the trained tower's candidates (ml-latest-small)",
                   f"python benchmarks/bench_rerank_tower.py --run {args.run.relative_to(REPO) if args.run.is_absolute() else args.run} "
                   f"--train-users {args.train_users} --epochs {args.epochs} --seed {args.seed}", body)


if __name__ == "__main__":
    main()
