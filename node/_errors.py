"""The node package's errors: one root, and refusals that say whether to retry."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error the node package raises on purpose."""


class RefusedError(NodeError):
    """A server refused a request; `code` names why, `retryable` says if another try may work.

    Codes: `busy` (session or cache limits; retry later or elsewhere), `closing` (the node is
    draining), `wrong-model`, `wrong-span`, `bad-request` (malformed or out-of-contract input),
    `position` (a step that breaks the cache's position contract), `no-session`.
    """

    def __init__(self, code: str, detail: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.retryable = retryable


class HopFailedError(NodeError):
    """A hop of a route stopped answering or broke its stream (the client fails over)."""

    def __init__(self, peer_id: str, detail: str) -> None:
        super().__init__(f"peer {peer_id[:16]}: {detail}")
        self.peer_id = peer_id
        self.detail = detail


class GenerationError(NodeError):
    """A generation could not complete; the message is one line for the user."""


class SessionRefusedError(HopFailedError):
    """A hop refused to open the session (`refusal` says why and whether to retry elsewhere).

    The client sends its first step right behind `OpenSession`, so the refusal arrives while
    a step is under way and travels like any other hop failure.
    """

    def __init__(self, peer_id: str, refusal: RefusedError) -> None:
        super().__init__(peer_id, f"refused the session: {refusal}")
        self.refusal = refusal


def sole_error(exc: BaseException) -> BaseException:
    """`exc`, or the one error it wraps in exception groups of one member each.

    trio's nurseries wrap what escapes them in an `ExceptionGroup`, so a command's own error
    (say a checkpoint folder without `config.json`, found inside the daemon's nursery) reaches
    the command line as a group of one. The command line prints that one error's message in
    a line; a group of several, or anything it does not expect, stays a traceback.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
