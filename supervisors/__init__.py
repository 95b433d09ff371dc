"""Process supervision: the launcher that keeps actor processes running."""

from supervisors.launcher import Child, Launcher

__all__ = ["Child", "Launcher"]
