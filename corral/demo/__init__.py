"""The demo fleet's tools (a small customer-support shop)."""

__all__: list[str] = []
