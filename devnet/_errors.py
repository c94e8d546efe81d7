"""The devnet package's error tree.

Errors are named by who is at fault, as in trio and h11:

* :class:`DevnetError` -- the root: the devnet could not do what was asked (a node exited
  before it came online, a command failed, namespaces need root, ...). Its message says
  what to look at next, usually the tail of a node's log.
* :class:`StatusFileError` -- a node process broke the process contract: its ``status.json``
  is not the JSON object the contract describes. A bug in the node, not in the launcher.
"""

from __future__ import annotations


class DevnetError(Exception):
    """Root of every error raised by the devnet package."""


class StatusFileError(DevnetError):
    """A node's ``status.json`` violates the process contract (the node's fault)."""
