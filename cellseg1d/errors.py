"""Exceptions a user can cause, each with a message that says what to do."""

from __future__ import annotations


class CellsegError(Exception):
    """Base class of every error cellseg1d reports to a user."""


class ConfigError(CellsegError):
    """The configuration file or a command-line option is invalid."""


class ImageError(CellsegError):
    """An input image cannot be processed as it is (permanent: retrying will not help)."""


class CatalogError(CellsegError):
    """The catalog database cannot be opened or migrated."""


class PluginError(CellsegError):
    """A plugin raised or returned something invalid; the message names the plugin."""

    def __init__(self, plugin: str, hook: str, message: str, *, transient: bool = False) -> None:
        self.plugin = plugin
        self.hook = hook
        #: True for storage errors (OSError) raised inside the plugin: worth a retry.
        self.transient = transient
        super().__init__(f"plugin '{plugin}' failed in hook '{hook}': {message}")


class JobAborted(CellsegError):
    """The daemon is shutting down and released the job unfinished."""
