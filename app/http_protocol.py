"""uvicorn's httptools protocol, hardened at the connection level (docs/HARDENING.md).

uvicorn (0.54-0.55) watches a connection only while it waits for the next request after a
response (its keep-alive timer), and cancels that timer on any byte received. Left as it is:
  - a connection that sends nothing, trickles its headers, sends one stray CRLF after an answer,
    or trickles the rest of a body that was answered before it was read (a 401, a 413 from its
    Content-Length) is held for ever: each costs a file descriptor, and enough of them make
    accept() fail for every other client (slowloris);
  - the request line and headers have no size limit: httptools joins a header value's pieces as
    they come (quadratic), so a 100 MB header stalls the event loop for seconds, and millions of
    small headers take a gigabyte;
  - after a pipelined request is cut off by garbage, the request still running writes to the
    closed connection (an ERROR traceback): uvicorn marks only the newest request as disconnected;
  - an `Upgrade` offer (`curl --http2` and Java's default HttpClient offer h2c on every request)
    makes httptools treat the request as bodiless and stop parsing the connection: an upload
    arrives empty, and nothing after it is read;
  - `Transfer-Encoding: gzip, chunked` is read as chunked: the app gets the compressed bytes;
  - an answer the client does not read waits in the write buffer for ever: the connection, its
    buffered bytes (megabytes for a beam search with attention over 16 images) and the request's
    task stay until the client leaves;
  - chunk extensions (`5;name=value`) reach neither the app nor any limit: a client can stream
    gigabytes of them inside one request;
  - pipelined requests are parsed as fast as they arrive, each queued with its own request state
    until its turn: a client that sends thousands of small requests on a connection and never
    reads the answers makes the server hold them all (100 such connections took it from 0.85 to
    2.5 GB, and other clients waited 6-18 s while it parsed them).

Here:
  - a request's headers must be complete within `header_timeout_s` of the connection being made,
    of the request's first byte, or of any byte that arrives between requests; past it the
    connection is closed, with a 408 JSON answer when part of a request had arrived (as nginx's
    client_header_timeout and Apache's RequestReadTimeout header=);
  - the rest of a body answered early must arrive within `header_timeout_s` of the answer (nginx's
    lingering close), else the connection is closed; once it has, the connection is kept alive;
  - more than `max_header_bytes` of request line and headers is answered 431 and the connection
    closed (nginx, Node and h11 allow 8-64 KiB);
  - the request running when the connection is lost is marked disconnected too;
  - an upgrade offer is ignored, as RFC 9110 section 7.8 lets a server do: a new parser reads the
    request again without the offer, then its body and the rest of the connection; the request
    is answered in HTTP/1.1 and the connection kept alive as usual; CONNECT, which
    httptools always treats as one, gets 405 JSON;
  - bytes that are not HTTP get the service's JSON 400 `bad_request` (uvicorn's is plain text);
  - an HTTP/1.1 request without a Host header, with two, or with one that is not a host[:port]
    gets 400 JSON, as RFC 9112 section 3.2 requires (uvicorn passes all three on, and a proxy
    in front may have read another Host than the one the app sees);
  - a transfer coding other than chunked (`gzip, chunked`) gets 501 JSON, as RFC 9112 asks, instead
    of the app being handed the still-encoded bytes;
  - while an answer waits in the write buffer (over its high-water mark, or left there when the
    response completed), the bytes the client has not taken must shrink within `send_timeout_s`
    (nginx's send_timeout), else the connection is aborted and the request cancelled;
  - a chunked body's framing (sizes, extensions, line ends) may not exceed `max_header_bytes` plus
    8 bytes per byte of data: past it, 400 JSON and the connection closes;
  - at most `max_pipelined` requests wait behind the running one on a connection: the next gets
    503 JSON `too_many_pipelined` in its turn, and nothing after it is read (the connection closes
    after that answer; RFC 9112 lets a pipelining client send again what was not answered).

An idle keep-alive connection stays uvicorn's KEEP_ALIVE_S business.
"""

from __future__ import annotations

import fcntl
import re
import struct
import termios
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.schemas import ErrorResponse

HTTP_REASONS = {
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
}
BAD_REQUEST_CODE = "bad_request"  # app.errors' code for a request that is not valid HTTP
ANSWERED_BELOW_APP = "answered_below_app"  # request state key: (status, code) this protocol gave in the app's place


@dataclass(frozen=True)
class Refusal:
    """An error answer of the service's one shape, given below the app (no request ID: the request
    never reached it); the connection closes after it."""

    status: int
    code: str
    message: str

    def _parts(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        body = ErrorResponse(error={"code": self.code, "message": self.message}, request_id=None)
        payload = body.model_dump_json().encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        return payload, headers

    def raw(self) -> bytes:
        """The bytes, written to the transport at once (no request of the connection is running)."""
        payload, headers = self._parts()
        head = f"HTTP/1.1 {self.status} {HTTP_REASONS[self.status]}\r\n".encode()
        return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + payload

    def app(self):
        """An ASGI app that gives it. A request refused once its headers are complete runs it as its
        own request: after the requests pipelined before it are answered, never inside their answers."""
        payload, headers = self._parts()

        async def refuse(scope, receive, send) -> None:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        return refuse


HEADER_TIMEOUT = Refusal(408, "header_timeout", "the request headers did not arrive in time")
# httptools treats CONNECT as an upgrade offer (the connection becomes a tunnel), and rebuilding its
# head cannot change that: it is refused, not re-read.
CONNECT_NOT_SUPPORTED = Refusal(405, "method_not_allowed", "CONNECT is not supported: this is not a proxy")
CODING_NOT_SUPPORTED = Refusal(
    501,
    "transfer_coding_not_supported",
    "the only transfer coding this server reads is chunked (RFC 9112: gzip, deflate or compress are not decoded)",
)

BAD_HOST = Refusal(
    400,
    BAD_REQUEST_CODE,
    "an HTTP/1.1 request needs exactly one Host header, holding host or host:port (RFC 9112 section 3.2)",
)
# RFC 3986's host (an IP literal in brackets, or a reg-name, which may be empty) and optional port.
HOST_VALUE = re.compile(rb"(\[[0-9A-Za-z:.%_~-]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:[0-9]*)?")


def _host_is_valid(headers: list[tuple[bytes, bytes]], http_version: str) -> bool:
    hosts = [value for name, value in headers if name == b"host"]
    if not hosts:
        return http_version == "1.0"
    return len(hosts) == 1 and HOST_VALUE.fullmatch(hosts[0].strip(b" \t")) is not None


# A chunked body's framing may reach MAX_HEADER_BYTES plus this many bytes per data byte: 1-byte
# chunks take 5 ("1\r\nX\r\n"), so any real sender fits; an endless extension does not.
FRAMING_PER_DATA_BYTE = 8
CHUNK_FRAMING_TOO_LARGE = Refusal(
    400,
    BAD_REQUEST_CODE,
    "the chunked body's framing (chunk sizes and extensions) outgrew its data and the header limit",
)


class _ClosedAfterBody:
    """A request's view of the connection's transport (uvicorn's RequestResponseCycle writes and
    closes through it): close() goes through the protocol, which lets the rest of a body answered
    early come in first (HardenedProtocol.close_after_body)."""

    def __init__(self, transport, protocol, cycle):
        self._transport, self._protocol, self._cycle = transport, protocol, cycle

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_after_body(self._cycle)


def _headers_too_large(limit: int) -> Refusal:
    return Refusal(431, "headers_too_large", f"the request line and headers exceed {limit} bytes")


def _too_many_pipelined(limit: int) -> Refusal:
    return Refusal(
        503,
        "too_many_pipelined",
        f"more than {limit} requests were sent on this connection ahead of their answers; this one and "
        "any after it were not run: read the answers before sending more, or send them again",
    )


class HardenedProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0  # all four set per server by hardened_protocol()
    max_header_bytes = 64 * 1024
    max_pipelined = 32
    send_timeout_s = 30.0
    _header_timer = None
    _header_bytes = 0  # received since the header deadline was armed
    _request_started = False  # some of a request has arrived: the deadline answers 408
    _running = None  # the request whose ASGI task runs now (self.cycle is the newest one)
    _drain_timer = None  # the rest of an answered request's body is being dropped until it fires
    _trailer_bytes = 0  # of the current chunked body's trailers
    _send_timer = None  # armed while an answer waits in the write buffer
    _send_buffered = 0  # the bytes not taken (_unsent) when it was armed
    _chunked_body = False  # the parser is inside a chunked request body
    _body_bytes = 0  # its data so far
    _framing_bytes = 0  # its other bytes (chunk sizes, extensions, line ends), counted per read
    _body_this_read = 0
    _requests_seen = 0  # so that a read spanning two requests is not counted as one body's framing
    _read_no_more = False  # a request was refused in its turn: answered, then closed
    _offer_head: bytes | None = None  # an upgrade offer's head without the offer, for the next parser
    _close_after_body = False  # a closing request answered before its body came: close once it has
    _stopping = False  # the server is shutting down (shutdown() was called)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        self._cancel_drain()
        self._cancel_send_deadline()
        running = self._running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_no_more:  # the answer goes out, then the connection closes
            return
        if self._drain_timer is None and self._header_timer is None and self._between_requests():
            # Bytes between requests (a stray CRLF) cancel uvicorn's keep-alive timer and may
            # begin no request: they start a header deadline, as a new connection's first bytes do.
            self._arm_header_deadline()
        if self._header_timer is not None:
            self._header_bytes += len(data)
        in_chunked_body, requests_seen, self._body_this_read = self._chunked_body, self._requests_seen, 0
        self._feed(data)
        if in_chunked_body and self._chunked_body and self._requests_seen == requests_seen:
            # This read lay wholly inside one chunked body: what is not data is framing.
            self._framing_bytes += len(data) - self._body_this_read
            if self._framing_bytes > self.max_header_bytes + FRAMING_PER_DATA_BYTE * self._body_bytes:
                self._close_with(CHUNK_FRAMING_TOO_LARGE)
                return
        # Checked after parsing, so that one read holding small headers and a large body passes:
        # headers that completed have cancelled the deadline (and reset the count).
        if self._header_timer is not None and self._header_bytes > self.max_header_bytes:
            self._close_with(_headers_too_large(self.max_header_bytes))

    def _feed(self, data: bytes) -> None:
        """uvicorn's parsing of a read, continued past upgrade offers."""
        while data and not self._read_no_more:
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserError:
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.send_400_response(message)
                return
            except httptools.HttpParserUpgrade as offer:
                # httptools stops for good at an upgrade offer, right after its headers, and skips
                # its body. A new parser reads the request again without the offer: its head (from
                # on_headers_complete), then its body and whatever follows on the connection.
                head, self._offer_head = self._offer_head, None
                if head is None:  # refused (CONNECT included): nothing more is read
                    return
                self.parser = httptools.HttpRequestParser(self)
                # As uvicorn sets up its own parser: bytes after a request that closes the
                # connection (Connection: close, HTTP/1.0) do not cost that request its answer.
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                data = head + data[offer.args[0] :]

    def _should_upgrade(self) -> bool:
        # The service has no WebSocket routes: every upgrade offer is ignored (answered in HTTP/1.1
        # under this protocol's limits) instead of uvicorn handing the connection to its WebSocket protocol.
        return False

    # Parser callbacks. Once this class has refused a request, httptools still parses the rest of
    # the read: none of it may start another request or reach a running one.

    def _ignoring(self) -> bool:
        return self._read_no_more or self.transport.is_closing()

    def on_message_begin(self) -> None:
        if self._ignoring():
            return
        # A keep-alive timer left from dropping an answered body must not cut this request off.
        self._unset_keepalive_if_required()
        super().on_message_begin()
        self._request_started = True
        if self._header_timer is None:  # a later request: its own deadline from its first byte
            self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        if not self._ignoring():
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._ignoring():
            return
        if not self._request_started:
            # A trailer after a chunked body: uvicorn would append it to the running request's
            # headers, with no limit. ASGI has no trailers; they are counted and dropped.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self.max_header_bytes:
                self._close_with(_headers_too_large(self.max_header_bytes))
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._ignoring():
            return
        self._cancel_header_deadline()
        self._request_started = False
        self._trailer_bytes = 0
        # Exact, whatever the reads: a block that completed within one read was not counted.
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.max_header_bytes:
            self._refuse(_headers_too_large(self.max_header_bytes))
        elif not _host_is_valid(self.headers, self.parser.get_http_version()):
            self._refuse(BAD_HOST)
        elif len(self.pipeline) >= self.max_pipelined:
            # Each waiting request holds its state (and any body read so far) until its turn.
            self._refuse(_too_many_pipelined(self.max_pipelined))
        elif any(
            name == b"transfer-encoding" and value.strip(b" ").lower() != b"chunked" for name, value in self.headers
        ):
            # httptools reads "gzip, chunked" as chunked and hands the app the still-compressed bytes.
            self._refuse(CODING_NOT_SUPPORTED)
        else:
            if self.parser.get_http_version() == "1.0":
                self.expect_100_continue = False  # RFC 9110 section 10.1.1: HTTP/1.0 knows no 100
            if self.parser.should_upgrade():
                if self.parser.get_method() == b"CONNECT":
                    self._refuse(CONNECT_NOT_SUPPORTED)
                    return
                # Ignored, as RFC 9110 section 7.8 allows: the request starts when a new parser
                # has read it again without the offer (_feed).
                self._offer_head = self._head_without_upgrade()
                return
            super().on_headers_complete()
            self.cycle.transport = _ClosedAfterBody(self.transport, self, self.cycle)
            self._requests_seen += 1
            self._chunked_body = any(name == b"transfer-encoding" for name, _ in self.headers)
            self._body_bytes = self._framing_bytes = 0

    def _head_without_upgrade(self) -> bytes:
        """The request line and headers as received, less `Upgrade`, `HTTP2-Settings` and those
        tokens of `Connection`."""
        method, version = self.parser.get_method(), self.parser.get_http_version().encode()
        lines = [method + b" " + self.url + b" HTTP/" + version]
        for name, value in self.headers:
            if name in (b"upgrade", b"http2-settings"):
                continue
            if name == b"connection":
                tokens = [
                    t.strip() for t in value.split(b",") if t.strip().lower() not in (b"upgrade", b"http2-settings")
                ]
                if not tokens:
                    continue
                value = b", ".join(tokens)
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _refuse(self, refusal: Refusal) -> None:
        """This request gets `refusal` in its turn, then the connection closes; nothing after it is read."""
        self._read_no_more = True
        # uvicorn parses the target into the scope, and httptools fails on one of 64 KiB or more:
        # that error would replace the refusal. The refusal's answer does not read the scope.
        self.url = b"/"
        app, self.app = self.app, refusal.app()
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    # After a refusal the rest of the read lands on the refused request (bounded by the read) and
    # goes with it.
    def on_body(self, body: bytes) -> None:
        self._body_this_read += len(body)
        self._body_bytes += len(body)
        if self.cycle is not None and not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._offer_head is not None:
            return  # httptools ending an upgrade offer at its headers: it is read again (_feed)
        self._chunked_body = False
        if self.cycle is not None and not self.transport.is_closing():
            super().on_message_complete()
        if self._drain_timer is not None:  # the answered request's body is in: a keep-alive connection again
            self._cancel_drain()
            if self._close_after_body:  # ...unless the request asked for the connection to close
                self.transport.close()
                return
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        running = self._running
        # An answer left in the buffer, below the high-water mark (so writing never paused), must
        # still be taken: the keep-alive close would otherwise wait for it for ever.
        if self._send_timer is None and self.transport.get_write_buffer_size():
            self._arm_send_deadline()
        super().on_response_complete()
        if running is not None and running.more_body and not self.transport.is_closing():
            # Answered before its body came in whole (401, 413, 503, 408): uvicorn reads and drops
            # the rest, and each byte of it cancels the keep-alive timer, so a client trickling a
            # body it declared huge was held for ever. The rest must come within header_timeout_s.
            self._drain_timer = self.loop.call_later(self.header_timeout_s, self.transport.close)

    # The transport calls this when its write buffer crosses the high-water mark. The deadline
    # outlives resume_writing (under the low-water mark is not empty): _check_sending ends it.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_deadline()

    def _arm_send_deadline(self) -> None:
        self._cancel_send_deadline()
        self._send_buffered = self._unsent()
        self._send_timer = self.loop.call_later(self.send_timeout_s, self._check_sending)

    def _unsent(self) -> int:
        """Bytes the client has not taken: the transport's buffer, plus the kernel's send queue (its
        buffers hold megabytes, so a client reading steadily can leave the first alone for a while)."""
        queued = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None and hasattr(termios, "TIOCOUTQ"):
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return self.transport.get_write_buffer_size() + queued

    def _check_sending(self) -> None:
        self._send_timer = None
        if not self.transport.get_write_buffer_size():  # emptied as the timer fired
            return
        if self._unsent() < self._send_buffered:
            self._arm_send_deadline()  # the client reads, however slowly: another period
            return
        # Nothing was taken for a whole period: close() would wait for the buffer to empty for ever.
        self.transport.abort()

    def _cancel_send_deadline(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def close_after_body(self, cycle) -> None:
        """What closing the connection is, once `cycle`'s answer is complete (uvicorn's cycle closes
        the transport itself after answering a request that does not keep the connection:
        `Connection: close`, HTTP/1.0)."""
        # Only for an answer given whole: one cut off by the app failing midway closes at once, as
        # before (on_response_complete, which bounds the wait, never runs for it). Not while the
        # server stops: the grace is not spent on a body nobody reads.
        answered = cycle.response_complete and not self._stopping
        if answered and cycle is self._running and cycle.more_body and not self.transport.is_closing():
            # Answered before its body came in whole (a 401, a 413, a 503). Closing now would leave
            # the body's bytes unread, and the kernel answers those with a reset that discards the
            # answer from the client's receive buffer before it reads it: an upload with
            # Connection: close got a connection reset instead of its JSON error. As nginx's
            # lingering close: the rest is read and dropped (within header_timeout_s, armed by
            # on_response_complete), then the connection closes.
            self._close_after_body = True
            return
        self.transport.close()

    def shutdown(self) -> None:
        """The server stops: a connection dropping the rest of an answered body closes now."""
        self._stopping = True
        if self._close_after_body or self._drain_timer is not None:
            self.transport.close()
            return
        super().shutdown()

    def _cancel_drain(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP (a parser error)."""
        self._close_with(Refusal(400, BAD_REQUEST_CODE, msg))

    def _start_asgi_task(self, cycle, app) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def _arm_header_deadline(self, count_from: int = 0) -> None:
        self._header_bytes = count_from
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._header_bytes = 0

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.flow is not None and self.flow.read_paused:
            # The server itself stopped reading (a pipelined request waits its turn): not the client's fault.
            self._arm_header_deadline(count_from=self._header_bytes)
            return
        self._close_with(HEADER_TIMEOUT if self._request_started else None)

    def _close_with(self, refusal: Refusal | None) -> None:
        """Answers (unless a response is being written: the bytes would land inside it) and closes."""
        self._cancel_header_deadline()
        if self.transport.is_closing():
            return
        running = self._running
        if refusal is not None and running is not None and not running.response_complete:
            if running is self.cycle and running.more_body and not running.response_started:
                # The running request's own body broke (a bad chunk size): nothing of its answer has
                # gone out, so the refusal takes its place, and the request is told the connection
                # has gone (it would otherwise write into a closed one).
                running.disconnected = True
                running.message_event.set()
                # For the access log and metrics: the client got this, not the 499 the app will
                # answer into the closed connection (app.middleware.RequestContextMiddleware).
                running.scope.setdefault("state", {})[ANSWERED_BELOW_APP] = (refusal.status, refusal.code)
            else:  # the fault is a later request's: an answer now would read as the running one's
                refusal = None
        if refusal is not None:
            self.transport.write(refusal.raw())
        self.transport.close()


def hardened_protocol(
    header_timeout_s: float, max_header_bytes: int, max_pipelined: int, send_timeout_s: float
) -> type[HardenedProtocol]:
    """The protocol class for uvicorn.Config(http=...), with this server's limits."""
    limits = {
        "header_timeout_s": header_timeout_s,
        "max_header_bytes": max_header_bytes,
        "max_pipelined": max_pipelined,
        "send_timeout_s": send_timeout_s,
    }
    return type("HardenedProtocol", (HardenedProtocol,), limits)
