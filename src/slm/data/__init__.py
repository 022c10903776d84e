"""Data pipeline: raw sources -> tokenized, packed shards (prepare) -> training batches (loader).

    from slm.data.loader import PackedDataset, DataLoader, iterate_eval
    from slm.data.prepare import PrepareConfig, prepare
"""
