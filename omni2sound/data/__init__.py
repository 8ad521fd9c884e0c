"""Data: SoundAtlas-style manifests, feature shards (safetensors, memory-mapped) and in-memory tables."""
from .manifest import ClipRecord, ManifestError, ManifestReport, ManifestValidationError, read_manifest, write_manifest
from .shards import FeatureTable, ShardDataset, done_shards, shard_name, write_index, write_shard

__all__ = ["ClipRecord", "ManifestError", "ManifestReport", "ManifestValidationError", "read_manifest",
           "write_manifest", "FeatureTable", "ShardDataset", "done_shards", "shard_name", "write_index",
           "write_shard"]
