"""uvicorn's HTTP protocol with a deadline on each request's headers (against slowloris clients).

uvicorn 0.54 arms its keep-alive timer only after a response. A connection that sends nothing, or
that trickles a header line a byte at a time, is therefore held for ever: each one costs a file
descriptor, and enough of them make accept() fail for every other client. Here a request's
headers must be complete within `header_timeout_s` of the connection being made (its first
request) or of the request's first byte (the next ones; an idle keep-alive connection is uvicorn's
KEEP_ALIVE_S business). Past it the connection is closed, with a 408 JSON answer when part of a
request had arrived (as nginx's client_header_timeout and Apache's RequestReadTimeout header=).
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.schemas import ErrorResponse


def _timeout_answer() -> bytes:
    """The service's one error shape; no request ID: the request never reached the app."""
    error = {"code": "header_timeout", "message": "the request headers did not arrive in time"}
    body = ErrorResponse(error=error, request_id=None).model_dump_json().encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


TIMEOUT_ANSWER = _timeout_answer()


class HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # set per server by with_header_deadline()
    _header_timer = None
    _request_started = False  # some of a request has arrived: the deadline answers 408

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True
        if self._header_timer is None:  # a later request: its own deadline from its first byte
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        self._request_started = False
        super().on_headers_complete()

    def _arm_header_deadline(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_started:
            self.transport.write(TIMEOUT_ANSWER)
        self.transport.close()


def with_header_deadline(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
