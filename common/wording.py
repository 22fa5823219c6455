"""Counts in words, for the messages every command prints: "1 epoch", "3 epochs"."""


def noun(count: int, singular: str, plural: str | None = None) -> str:
    """The noun for `count` of it: singular for 1, else `plural` (by default, with an s)."""
    return singular if count == 1 else plural or f"{singular}s"


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """count and its noun: "1 epoch", "3 epochs", "2 processes"."""
    return f"{count} {noun(count, singular, plural)}"
