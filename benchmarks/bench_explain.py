"""Grounded explanations on ml-100k: does an explanation name a real history item and a genre it really shares with the pick?

For the first `--users` test users (configs/ml-100k.yaml, SmolLM2-135M-Instruct in-process), the picks are the served
recommendations (retrieval through the trained tower and the user's client FAISS index; `--rerank` reranks them with the
zero-shot verbalizer first). Each is explained three ways:

- `explain.v1` (the generated note the server used to show): the text profile and the top 3 titles, two sentences from the LLM;
- `template`: each pick's facts (nearest history items in the tower space, the genres they share with it, the rank movement)
  in one fixed sentence;
- `LLM (explain.v2)`: the LLM phrases the same facts in one sentence; a sentence that names no given history title (or not the
  pick) is replaced by the template. The table shows the LLM's own sentences and what is served after that fallback.

The checker (`pipeline.explain.audit`) knows nothing of the facts: it matches the user's whole history titles in the text,
and then the genres that a named history item and the explained pick both have in the catalogue. An explanation counts as
grounded when it names a history item and such a shared genre. A `explain.v1` note covers 3 picks; a genre shared with any
of them counts.

Usage: python benchmarks/bench_explain.py [--users 100] [--picks 1] [--rerank] [--space tower|text] [--report]

Without a trained ml-100k run under runs/bench-explain/, `--space tower` trains one first (the tower alone: `fedrec train -c configs/ml-100k.yaml --set soft_prompt.enabled=false`,
about two minutes on 2 cores). Every finished user is appended to runs/bench-explain/users.jsonl, so an interrupted run
resumes where it stopped; `--report` only rebuilds the table and the RESULTS.md section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from common import REPO, data_dir, log_command, logged_commands, markdown_table, update_results

OUT = REPO / "runs" / "bench-explain"
RESULTS_FILE = OUT / "users.jsonl"
V1_PICKS = 3
"""Titles the old note was written for (what the server sent)."""


def _recommender(space: str, batch: int):
    from pipeline.config import load_config
    from pipeline.recommender import Recommender
    from pipeline.trained import find_run

    # the tower alone (the demo recipe also trains the reranker's soft prompt, which explanations do not use)
    cfg = load_config(REPO / "configs" / "ml-100k.yaml", [f"output_dir={OUT}", f"llm.batch_size={batch}", "soft_prompt.enabled=false"])
    if space == "text":
        return Recommender.from_config(cfg, run=None)
    rec = Recommender.from_config(cfg)
    if find_run(rec) is None:
        from federation.runner import train

        print(f"no trained ml-100k run under {OUT}; training one (fedrec train -c configs/ml-100k.yaml --set soft_prompt.enabled=false)", flush=True)
        start = time.perf_counter()
        train(rec, progress=True)
        print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
        rec = Recommender.from_config(cfg)
    return rec


def _scored(text: str, rec, history: list[int], picks: list[int]) -> dict:
    from pipeline.explain import audit, named_items

    cat = rec.dataset.catalog
    found = audit(text, cat, history, picks)
    names_pick = bool(named_items(text, cat, [*history, *picks])[0] & set(picks))
    return {"text": text, "history_named": len(found.history_named), "shared_named": list(found.shared_named),
            "grounded": found.grounded, "names_pick": names_pick}


def run_users(rec, users: list[int], picks_n: int, rerank: bool) -> list[dict]:
    """These users' picks, explained three ways and scored by `audit`; the LLM writes each chunk's texts in one batched call."""
    import prompts
    from pipeline.explain import Pick, pick_facts, template_explanations
    from pipeline.explain import phrase as llm_phrase

    cat, cfg = rec.dataset.catalog, rec.cfg.rerank
    requests = [rec.request(user_id=rec.dataset.user_id(u), split="test") for u in users]
    histories = [[int(i) for i in r.history] for r in requests]
    if rerank:
        picks = [Pick.from_ranked(ranked[:V1_PICKS]) for ranked in rec.reranker(trained=False).rerank_batch(requests)]
    else:
        picks = [[Pick(c.item, r + 1, r + 1, reranked=False) for r, c in enumerate(q.candidates[:V1_PICKS])] for q in requests]
    space, vectors = rec.explanation_space()
    facts = [pick_facts(cat, vectors, space, h, p[:picks_n]) for h, p in zip(histories, picks, strict=True)]

    # The old note, rendered exactly as `pipeline.rerank.explain` does, batched over the chunk.
    messages = [prompts.render_chat(cfg.explain_template, control_tokens=rec.backend.control_tokens(), profile=q.profile,
                                    picks=[cat.label(x.item) for x in p]) for q, p in zip(requests, picks, strict=True)]
    start = time.perf_counter()
    notes = [n.strip() for n in rec.backend.generate(messages, max_tokens=cfg.explain_max_tokens)]
    v1_s = (time.perf_counter() - start) / len(users)
    start = time.perf_counter()
    templated = template_explanations([f for fs in facts for f in fs])
    template_s = (time.perf_counter() - start) / max(1, len(templated))
    start = time.perf_counter()
    phrased = llm_phrase(rec.backend, [f for fs in facts for f in fs], cfg, cat)
    llm_s = (time.perf_counter() - start) / max(1, len(phrased))
    out = []
    for n, (user, history, p, note) in enumerate(zip(users, histories, picks, notes, strict=True)):
        mine = slice(n * picks_n, n * picks_n + len(facts[n]))
        out.append({
            "user": user, "user_id": rec.dataset.user_id(user), "space": space, "picks": [x.item for x in p],
            "v1": {**_scored(note, rec, history, [x.item for x in p]), "seconds": v1_s},
            "template": [{**_scored(e.sentence, rec, history, [e.facts.item]), "seconds": template_s} for e in templated[mine]],
            "llm_raw": [{**_scored(e.generated or "", rec, history, [e.facts.item]), "seconds": llm_s} for e in phrased[mine]],
            "llm_served": [{**_scored(e.sentence, rec, history, [e.facts.item]), "source": e.source, "fallback": e.fallback}
                           for e in phrased[mine]],
        })
    return out


def _settings(args: argparse.Namespace) -> dict:
    return {"picks": args.picks, "rerank": args.rerank, "space": args.space}


def _share(rows: list[dict], key: str) -> str:
    return f"{sum(bool(r[key]) for r in rows) / len(rows):.0%} ({sum(bool(r[key]) for r in rows)}/{len(rows)})" if rows else "—"


def report(settings: dict, users: int) -> None:
    saved = [json.loads(line) for line in RESULTS_FILE.read_text().splitlines() if line.strip()] if RESULTS_FILE.is_file() else []
    saved = [r for r in saved if r["settings"] == settings][:users]
    if not saved:
        raise SystemExit(f"nothing saved under {RESULTS_FILE} for {settings}; run the benchmark first")
    methods = [
        ("`explain.v1` (old generated note, top 3 picks)", [r["v1"] for r in saved]),
        ("template (facts, one sentence)", [e for r in saved for e in r["template"]]),
        ("LLM `explain.v2`, its own sentences", [e for r in saved for e in r["llm_raw"]]),
        ("LLM `explain.v2` + template fallback (served)", [e for r in saved for e in r["llm_served"]]),
    ]
    rows = []
    for name, found in methods:
        seconds = [e["seconds"] for e in found if "seconds" in e]
        rows.append([name, len(found), _share(found, "history_named"), _share(found, "grounded"), _share(found, "names_pick"),
                     f"{statistics.median(seconds):.3f}" if seconds else "—"])
    table = markdown_table(["explanation", "explanations", "names a history item", "+ a genre it really shares with the pick (grounded)",
                            "names the pick", "median s each"], rows)
    served = [e for r in saved for e in r["llm_served"]]
    fallbacks = sum(e["source"] == "template" for e in served)
    space = saved[0]["space"]
    example = saved[0]
    body = (
        f"{len(saved)} test users of ml-100k (the first {len(saved)}), {settings['picks']} pick(s) each explained by the template and "
        f"the LLM, picks {'reranked by the zero-shot verbalizer' if settings['rerank'] else 'in retrieval order (not reranked)'}; facts "
        f"in the {space} space ({'the trained tower of a `fedrec train -c configs/ml-100k.yaml --set soft_prompt.enabled=false` run' if space == 'tower' else 'MiniLM item-text vectors'}). "
        "SmolLM2-135M-Instruct in-process, bf16 weights, greedy decoding, the texts of "
        f"{example['batch']} users generated in one batched call (`--batch`; seconds are per text). The checker is `pipeline.explain.audit`: string matching "
        "of the user's history titles and of the genres a named history item shares with the pick, independent of the facts the "
        f"explanations were built from. The LLM's sentence failed the check and fell back to the template for {fallbacks} of "
        f"{len(served)} picks.\n\n{table}\n\nUser {example['user_id']}, old note: \"{example['v1']['text']}\"  \n"
        f"Template: \"{example['template'][0]['text']}\"  \nLLM's own sentence: \"{example['llm_raw'][0]['text']}\""
    )
    print(table)
    update_results("bench:explain", "Grounded explanations: named history items and shared genres (ml-100k)", logged_commands(OUT), body)


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100, help="the first N test users")
    parser.add_argument("--picks", type=int, default=1, choices=range(1, V1_PICKS + 1), help="picks per user explained by the template and the LLM")
    parser.add_argument("--rerank", action="store_true", help="rerank the candidates with the zero-shot verbalizer before explaining")
    parser.add_argument("--space", choices=["tower", "text"], default="tower", help="tower: a trained run (trained when absent); text: no run")
    parser.add_argument("--batch", type=int, default=10, help="users per chunk; the LLM generates a chunk's texts in batches of this size")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and RESULTS.md from saved results")
    args = parser.parse_args()
    settings = _settings(args)
    if not args.report:
        os.environ.setdefault("FEDREC_DATA_DIR", str(data_dir()))
        log_command(OUT, "bench_explain.py", sys.argv[1:])
        rec = _recommender(args.space, args.batch)
        print(rec.retrieval_source, flush=True)
        done = set()
        if RESULTS_FILE.is_file():
            done = {r["user"] for r in map(json.loads, RESULTS_FILE.read_text().splitlines()) if r["settings"] == settings}
        todo = [u for u in range(min(args.users, rec.dataset.n_users)) if u not in done]
        for chunk in range(0, len(todo), args.batch):
            start = time.perf_counter()
            results = run_users(rec, todo[chunk : chunk + args.batch], args.picks, args.rerank)
            with RESULTS_FILE.open("a") as handle:
                handle.writelines(json.dumps({"settings": settings, "batch": args.batch, **r}) + "\n" for r in results)
            print(f"users {results[0]['user_id']}..{results[-1]['user_id']}: grounded v1 {sum(r['v1']['grounded'] for r in results)}, "
                  f"template {sum(e['grounded'] for r in results for e in r['template'])}, "
                  f"llm {sum(e['grounded'] for r in results for e in r['llm_raw'])} ({time.perf_counter() - start:.0f} s)", flush=True)
    report(settings, args.users)


if __name__ == "__main__":
    main()
