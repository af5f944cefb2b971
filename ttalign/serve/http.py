"""uvicorn with a deadline on request headers.

uvicorn closes idle keep-alive connections but gives a client all the time it wants to finish its request line and
headers, so a few hundred connections that send one byte at a time (slowloris) hold the server's sockets forever.
:func:`header_deadline_protocol` derives, from uvicorn's own HTTP protocol class, one that closes a connection whose
request headers are not complete within `seconds` of the connection (or of the previous response); :func:`run` serves
an app with it and with a cap on concurrent connections (uvicorn answers 503 past it).
"""

from __future__ import annotations


def header_deadline_protocol(seconds: float, base=None):
    """uvicorn's HTTP protocol class (httptools when installed, else h11), closing connections whose headers take
    longer than `seconds`. Both classes set `self.cycle` when a request's headers are complete."""
    if base is None:
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        except ImportError:  # uvicorn without httptools
            from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderDeadline(base):
        header_timeout_s = seconds

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(self.header_timeout_s, self._check_header_deadline, self.cycle)

        def _check_header_deadline(self, cycle_when_armed) -> None:
            if self.transport.is_closing():
                return
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and self.cycle is cycle_when_armed:  # no request's headers completed since the check was armed
                self.transport.close()
            else:
                self._arm_header_deadline()

    HeaderDeadline.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadline


def run(
    app, host: str, port: int, log_level: str = "warning", header_timeout_s: float = 10.0, max_connections: int = 256
) -> None:
    """Serves `app` with uvicorn: headers due within `header_timeout_s`, at most `max_connections` at once."""
    import uvicorn

    if not header_timeout_s > 0:
        raise ValueError(f"--header-timeout must be > 0, got {header_timeout_s!r}.")
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {max_connections!r}.")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_deadline_protocol(header_timeout_s),
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
    )
