"""The old home of ``FolderLock`` (one writer per folder on one host): it lives in ``refine.core.write`` now,
the one layer that writes into output and run folders, which says how it works; these names stay importable."""

from refine.core.write import HOST, LOCK_NAME, FolderLock, alive  # noqa: F401 - re-exported

__all__ = ["HOST", "LOCK_NAME", "FolderLock", "alive"]
