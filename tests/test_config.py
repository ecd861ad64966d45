"""Typed configs: every shipped YAML loads; bad keys and values name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, write

from pipeline.config import FedrecConfig, load_config
from pipeline.errors import ConfigError


@pytest.mark.parametrize("name", ["tiny", "ml-100k", "ml-latest-small", "ml-1m"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, FedrecConfig)


def test_every_field_is_documented() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                missing += walk(annotation)
        return missing

    assert walk(FedrecConfig) == []


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(overrides=["retrieval.query=profile", "eval.ks=[1, 3]", "eval.max_users=7", "index.factory=HNSW32"])
    assert (cfg.retrieval.query, cfg.eval.ks, cfg.eval.max_users, cfg.index.factory) == ("profile", [1, 3], 7, "HNSW32")


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"retrieval\.qurey: unknown key; allowed keys here: .*query"):
        load_config(overrides=["retrieval.qurey=profile"])


def test_wrong_literal_names_key_value_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"retrieval\.query: Input should be 'profile', 'history' or 'hybrid' \(got 'bm25'\)"):
        load_config(overrides=["retrieval.query=bm25"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"eval\.max_users: .*integer.* \(got 'many'\)"):
        load_config(overrides=["eval.max_users=many"])


def test_min_user_interactions_below_three_explains_why() -> None:
    with pytest.raises(ConfigError, match=r"data\.min_user_interactions: must be >= 3 because leave-one-out"):
        load_config(overrides=["data.min_user_interactions=2"])


def test_custom_dataset_needs_a_path() -> None:
    with pytest.raises(ConfigError, match=r"data\.name=custom needs data\.path"):
        load_config(overrides=["data.name=custom"])


def test_malformed_override_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE"):
        load_config(overrides=["retrieval.query"])
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"must hold a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "data: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"data\.name2: unknown key"):
        load_config(write(tmp_path / "c.yaml", "data:\n  name: ml-100k\n  name2: 1\n"))


def test_readme_config_reference_is_current() -> None:
    from pipeline.config import reference_markdown

    assert reference_markdown() in (REPO / "README.md").read_text(encoding="utf-8")
