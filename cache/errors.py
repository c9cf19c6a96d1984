"""Errors the cache raises; each message says what was found and what to do."""


class StoreError(RuntimeError):
    """A store that cannot be used as asked (missing, incomplete, not ours)."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different config, backbone or dataset."""

    def __init__(self, path: str, differences: list[str], hint: str = ""):
        self.differences = differences
        lines = "\n".join(f"  - {d}" for d in differences)
        super().__init__(f"store {path!r} was made differently:\n{lines}" + (f"\n{hint}" if hint else ""))
