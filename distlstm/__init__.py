"""distlstm: train LSTMs on sharded datasets; `distlstm.load(path)` gives back a trained model.

    model, vocab, config = distlstm.load("runs/default-1a2b3c4d")
"""

__all__ = ["load", "Vocab"]


def __getattr__(name: str):
    # Lazy, so `python -m distlstm.<command>` and the loader's workers do not pay for imports they skip.
    if name in __all__:
        from distlstm.checkpoint import artifacts
        return getattr(artifacts, name)
    raise AttributeError(f"module 'distlstm' has no attribute {name!r}")
