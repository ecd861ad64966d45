"""Federated training of the soft prompt, item-token projector and retrieval tower."""
