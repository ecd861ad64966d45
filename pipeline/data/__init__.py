"""Datasets: reading, the benchmark preprocessing, leave-one-out splits and client partitions."""

from pipeline.data.dataset import (
    Catalog,
    Dataset,
    Split,
    k_core,
    leave_one_out,
    load_dataset,
    preprocess,
)
from pipeline.data.partition import partition_users
from pipeline.data.readers import RawData, clean_title
from pipeline.data.sources import DataSource, resolve_source

__all__ = [
    "Catalog", "DataSource", "Dataset", "RawData", "Split", "clean_title", "k_core", "leave_one_out",
    "load_dataset", "partition_users", "preprocess", "resolve_source",
]
