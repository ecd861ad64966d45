"""fedrec orchestration: data, profiles, LLM stage, recommender, evaluation and the CLI."""
