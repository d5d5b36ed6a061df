"""Preference pair data: readers (`pairs`), transforms, the training dataset, and the
`ncppo data check | curate | cache` tools. See docs/data.md."""

from .dataset import PreferenceDataset, collate_pairs
from .pairs import (
           BadRowError,
           PairMeta,
           PairRecord,
           PairSchemaError,
           PairTable,
           open_pairs,
)

__all__ = ["BadRowError", "PairMeta", "PairRecord", "PairSchemaError", "PairTable", "PreferenceDataset",
           "collate_pairs", "open_pairs"]
