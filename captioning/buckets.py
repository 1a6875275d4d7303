"""Batch-size buckets: every compiled batch shape, so a new batch size never retraces (no TensorFlow here,
so the service's engine can plan batches without importing the model)."""

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def bucket_for(batch: int) -> int:
    """The smallest bucket that holds `batch` rows (batches over the largest are split by callers)."""
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    raise ValueError(f"batch of {batch} exceeds the largest bucket {BATCH_BUCKETS[-1]}")
