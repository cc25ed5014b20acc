"""The cache contract between extraction and training: layout, codecs, writer, reader and verification."""

from cache_schema.layout import (SCHEMA_VERSION, CacheCorruptionError, CacheError, IncompatibleCacheError, Manifest,
                                 Sample, StorageInfo, TargetInfo, check_compatible)
from cache_schema.reader import CacheReader
from cache_schema.verify import verify
from cache_schema.writer import CacheWriter, ShardWriter

__all__ = ["SCHEMA_VERSION", "CacheCorruptionError", "CacheError", "IncompatibleCacheError", "Manifest", "Sample",
           "StorageInfo", "TargetInfo", "check_compatible", "CacheReader", "CacheWriter", "ShardWriter", "verify"]
