"""Records, manifests, collators and dataset builders."""

from audiorl.data.records import Record, read_records, validate_records

__all__ = ["Record", "read_records", "validate_records"]
