"""app.http_protocol under a real uvicorn server, raw sockets for clients that misbehave.

A tiny ASGI app stands in for the service (no model), so each case takes well under a second:
the limits here are HEADER_TIMEOUT_S=0.5, MAX_HEADER_BYTES=4096, MAX_PIPELINED=4 and SEND_TIMEOUT_S=0.5."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time

import pytest
import uvicorn

from app.http_protocol import hardened_protocol

HEADER_TIMEOUT_S = 0.5
MAX_HEADER_BYTES = 4096
MAX_PIPELINED = 4
SEND_TIMEOUT_S = 0.5
BIG_ANSWER = 32 * 2**20  # more than the kernel's socket buffers hold
KEEP_ALIVE_S = 1  # shorter than /sleep


class App:
    """GET /ok answers; POST /refuse answers 401 without reading the body; POST /echo reads the
    body and answers its length; GET /slow answers after 0.5 s unless the client went away."""

    def __init__(self):
        self.disconnected = threading.Event()
        self.calls: list[str] = []
        self.headers_seen: list[int] = []  # how many headers each /echo request's scope held
        self.ok_calls = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/echo":
            self.headers_seen.append(len(scope["headers"]))
            size, more = 0, True
            while more:
                message = await receive()
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
            await self.answer(send, 200, {"received": size})
        elif path == "/big":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % BIG_ANSWER)]}
            )
            await send({"type": "http.response.body", "body": b"a" * BIG_ANSWER})
        elif path == "/refuse":
            await self.answer(send, 401, {"error": "no key"})
        elif path == "/break":  # fails midway through its answer, its body unread
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
            await send({"type": "http.response.body", "body": b"0123456789", "more_body": True})
            raise RuntimeError("the app failed midway through its answer")
        elif path == "/sleep":  # longer than the header deadline and the keep-alive timeout below
            self.calls.append(path)
            await asyncio.sleep(1.2)
            await self.answer(send, 200, {"slept": True})
        elif path == "/slow":
            await receive()  # the (empty) body
            try:
                message = await asyncio.wait_for(receive(), 0.5)
                if message["type"] == "http.disconnect":
                    self.disconnected.set()
                    return
            except TimeoutError:
                pass
            await self.answer(send, 200, {"slow": True})
        else:
            self.ok_calls += 1
            await self.answer(send, 200, {"ok": True})

    @staticmethod
    async def answer(send, status, payload):
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def served():
    app = App()
    with running(app) as port:
        errors = Errors()
        logging.getLogger("uvicorn.error").addHandler(errors)
        yield app, port, errors
        logging.getLogger("uvicorn.error").removeHandler(errors)


@contextlib.contextmanager
def running(app):
    """A real uvicorn server with this module's limits; yields its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
        http=hardened_protocol(HEADER_TIMEOUT_S, MAX_HEADER_BYTES, MAX_PIPELINED, SEND_TIMEOUT_S),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until_closed(connection: socket.socket, limit_s: float = 5) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed (seconds from now)."""
    started, data = time.monotonic(), b""
    connection.settimeout(limit_s)
    while True:
        try:
            more = connection.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not more:
            break
        data += more
    return data, time.monotonic() - started


def read_answer(connection: socket.socket) -> bytes:
    """One answer with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = connection.recv(65536)
        if not more:
            raise ConnectionError(f"closed before an answer: {data[:100]!r}")
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        more = connection.recv(65536)
        if not more:
            raise ConnectionError("closed in the middle of an answer")
        body += more
    return head + b"\r\n\r\n" + body


def json_body(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_a_silent_connection_is_closed_after_the_header_deadline(served):
    _, port, _ = served
    with connect(port) as connection:
        data, after_s = read_until_closed(connection)
    assert data == b""  # no request came, so no answer
    assert 0.3 < after_s < 2


def test_trickled_headers_get_408_json_and_a_closed_connection(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
        for index in range(8):  # each line in time, the whole never
            time.sleep(0.1)
            try:
                connection.sendall(f"X-Slow-{index}: 1\r\n".encode())
            except OSError:
                break
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert json_body(data)["error"]["code"] == "header_timeout"


def test_a_stray_crlf_after_an_answer_does_not_hold_the_connection(served):
    """uvicorn cancels its keep-alive timer on any byte; a CRLF begins no request."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 200")
        connection.sendall(b"\r\n")
        data, after_s = read_until_closed(connection)
    assert data == b""
    assert after_s < 0.9  # the header deadline (0.5 s), not the keep-alive timeout (1 s) or never


def test_the_rest_of_a_body_answered_early_must_come_in_time(served):
    """A 401 before the body was read; a client trickling the rest of a huge declared body
    was read and dropped for ever."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nxxxx")
        assert read_answer(connection).startswith(b"HTTP/1.1 401")
        answered = time.monotonic()
        closed = False
        while time.monotonic() - answered < 4:
            try:
                connection.sendall(b"x" * 100)
                time.sleep(0.05)
            except OSError:
                closed = True
                break
        if not closed:
            closed = read_until_closed(connection, 1)[0] == b""
    assert closed
    assert time.monotonic() - answered < 3


def test_a_body_answered_early_that_comes_in_whole_leaves_the_connection_usable(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 401")
        connection.sendall(b"0123456789")  # the rest of the body, then the next request
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 200")


def test_an_early_answer_to_a_closing_request_reaches_the_client_before_the_close(served):
    """A request with Connection: close answered before its body came (a 401, a 413, a 503): the
    connection was closed at once with the body's bytes unread, and the kernel's reset to them
    discarded the answer from the client's receive buffer: an upload got "connection reset" in
    place of its JSON error. The rest of the body is read and dropped first now, then it closes."""
    _, port, _ = served
    body = b"x" * (4 * 2**20)
    for version in (b"HTTP/1.1", b"HTTP/1.0"):  # HTTP/1.0 closes without being asked
        with connect(port) as connection:
            head = b"POST /refuse %s\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            connection.sendall(head % (version, len(body)))
            time.sleep(0.2)  # answered by now, before any of its body
            connection.sendall(body)
            answer, _ = read_until_closed(connection)
        assert answer.startswith(b"HTTP/1.1 401") and json_body(answer) == {"error": "no key"}, version


def test_an_answer_cut_off_by_the_app_closes_the_connection_at_once_whatever_its_body(served):
    """The lingering close is for answers given whole: a cut-off one (the app failed midway) has
    no on_response_complete to bound the wait, and its connection had stayed open for ever."""
    _, port, errors = served
    for closing in (b"Connection: close\r\n", b""):
        with connect(port) as connection:
            connection.sendall(b"POST /break HTTP/1.1\r\nHost: x\r\n%sContent-Length: 1000000\r\n\r\nxx" % closing)
            answer, took = read_until_closed(connection, 5)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"0123456789") and took < 2, closing
    errors.records.clear()  # the app's failure is logged, as it should be


def test_headers_over_the_limit_get_431_json_and_a_closed_connection(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEADER_BYTES))
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 431"), data[:100]
    assert json_body(data)["error"]["code"] == "headers_too_large"


def test_small_headers_and_a_large_body_in_one_write_are_not_mistaken_for_large_headers(served):
    _, port, _ = served
    body = b"z" * (20 * MAX_HEADER_BYTES)
    with connect(port) as connection:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answer = read_answer(connection)
    assert answer.startswith(b"HTTP/1.1 200")
    assert json_body(answer) == {"received": len(body)}


def test_bytes_that_are_not_http_get_a_json_400(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 400")
    assert json_body(data)["error"]["code"] == "bad_request"


UPGRADE = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def test_an_upgrade_offer_with_a_body_is_answered_in_http_1_1_with_its_body_and_kept_alive(served):
    """What `curl --http2 http://...` and Java's default HttpClient send on every request: httptools
    would skip the body and read nothing more on the connection."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n" + UPGRADE + b"\r\nhello")
        assert json_body(read_answer(connection)) == {"received": 5}
        # The body in several reads, the next request in the last one's tail.
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n" + UPGRADE + b"\r\nhel")
        time.sleep(0.1)
        connection.sendall(b"lo ")
        time.sleep(0.1)
        connection.sendall(b"worldGET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_answer(connection)
        while answers.count(b"HTTP/1.1 200") < 2:
            answers += read_answer(connection)
        assert b'{"received": 11}' in answers and b'{"ok": true}' in answers
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n")  # and without a body
        assert json_body(read_answer(connection)) == {"ok": True}


def test_an_upgrade_offer_with_a_chunked_body_is_read_too(served):
    """Java's HttpClient streams a multipart body built with ofByteArrays as chunks, with the offer."""
    app, port, _ = served
    with connect(port) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + UPGRADE + b"\r\n5\r\nhello\r\n"
        )
        time.sleep(0.1)
        connection.sendall(b"6\r\n world\r\n0\r\n\r\n")
        assert json_body(read_answer(connection)) == {"received": 11}
    # The request the app saw is the one sent, less the offer.
    assert app.headers_seen[-1] == 2  # host and transfer-encoding: no upgrade, http2-settings or connection


def test_garbage_after_a_pipelined_request_tells_the_running_request_and_logs_no_error(served):
    """uvicorn marked only the newest request disconnected: the running one wrote to the closed
    connection (an ERROR traceback) and was computed for nothing."""
    app, port, errors = served
    app.disconnected.clear()
    before = len(errors.records)
    with connect(port) as connection:
        connection.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
        data, _ = read_until_closed(connection)
    assert app.disconnected.wait(2)  # the running request saw the disconnect
    time.sleep(0.6)  # past when /slow would have answered
    assert errors.records[before:] == []
    assert data == b""  # a 400 now would read as the answer to /slow, which did nothing wrong


def test_a_transfer_coding_other_than_chunked_is_501_not_handed_on_still_encoded(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 501"), data[:100]
    assert json_body(data)["error"]["code"] == "transfer_coding_not_supported"
    with connect(port) as connection:  # plain chunked is read as before
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        assert json_body(read_answer(connection)) == {"received": 5}


def answers_until_closed(connection: socket.socket, limit_s: float = 5) -> list[bytes]:
    """The status lines of every answer the server sends before it closes."""
    data, _ = read_until_closed(connection, limit_s)
    return [data[i : i + 12] for i in range(len(data)) if data.startswith(b"HTTP/1.1 ", i)]


def test_headers_over_the_limit_are_refused_even_when_complete_within_one_read(served):
    """The count of bytes read before the headers complete missed a block that completed inside
    one read (about 128 kB); the size is also checked exactly once they are complete."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\n")
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 431")


def test_a_refused_request_is_answered_in_its_turn_after_those_pipelined_before_it(served):
    _, port, _ = served
    with connect(port) as connection:
        big = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n\r\n"
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n" + big + b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answers_until_closed(connection) == [b"HTTP/1.1 200", b"HTTP/1.1 431"]  # and nothing after it


def test_trailers_are_dropped_and_limited(served):
    """uvicorn appended a chunked body's trailers to the running request's headers, unlimited."""
    app, port, _ = served
    app.headers_seen.clear()
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    with connect(port) as connection:
        connection.sendall(chunked + b"X-Trailer: 1\r\n\r\n")  # a small one: the request goes on
        assert json_body(read_answer(connection)) == {"received": 5}
    assert app.headers_seen == [2]  # host and transfer-encoding: the trailer never reached the scope
    with connect(port) as connection:
        connection.sendall(chunked)
        try:
            for index in range(100):
                connection.sendall(b"X-T%d: " % index + b"a" * 990 + b"\r\n")
        except OSError:
            pass  # closed by the server: what this test wants
        data, after_s = read_until_closed(connection, 3)
    assert not data.startswith(b"HTTP/1.1 200")


def test_a_request_after_a_dropped_body_in_the_same_read_is_not_cut_by_the_keep_alive_timer(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 401")
        connection.sendall(b"0123456789" + b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n")  # sleeps past KEEP_ALIVE_S
        assert read_answer(connection).startswith(b"HTTP/1.1 200")


def test_pipelined_headers_the_server_has_not_read_yet_are_not_timed_out(served):
    """While a pipelined request waits its turn uvicorn stops reading: the next request's headers
    cannot complete, through no fault of the client's."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(
            b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n"
        )
        time.sleep(0.05)
        connection.sendall(b"\r\n")
        assert answers_until_closed(connection) == [b"HTTP/1.1 200"] * 3


def test_nothing_after_a_refused_request_in_the_same_read_runs(served):
    app, port, _ = served
    app.calls.clear()
    with connect(port) as connection:
        connection.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert answers_until_closed(connection) == [b"HTTP/1.1 501"]
    time.sleep(0.3)
    assert app.calls == []


def test_connect_is_refused_not_read_again_for_ever(served):
    """httptools treats every CONNECT as an upgrade offer, whatever its headers: re-read without the
    offer, it was an offer again, without end."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        data, after_s = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 405") and json_body(data)["error"]["code"] == "method_not_allowed"
    assert after_s < 2


def test_bytes_after_a_closing_request_behind_an_upgrade_offer_do_not_cost_it_its_answer(served):
    """The parser that reads an offer again is as lenient as uvicorn's own about data after a
    request that closes the connection."""
    _, port, _ = served
    with connect(port) as connection:
        offer = b"Connection: close, Upgrade\r\nUpgrade: h2c\r\n"
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + offer + b"\r\nGARBAGE")
        assert answers_until_closed(connection) == [b"HTTP/1.1 200"]


def test_many_upgrade_offers_in_one_read_stay_under_the_pipelining_limit(served):
    """Each offer is read again by a new parser: a read full of them must meet the same limit as
    any pipelined requests, not an unbounded chain of re-reads."""
    _, port, _ = served
    offer = b"GET /sleep HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n"
    with connect(port) as connection:
        connection.sendall(offer * 2000)
        answers = answers_until_closed(connection)
    assert answers == [b"HTTP/1.1 200"] * (1 + MAX_PIPELINED) + [b"HTTP/1.1 503"]


def test_requests_pipelined_behind_an_upgrade_offer_are_answered_in_turn(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /sleep HTTP/1.1\r\nHost: x\r\n" + UPGRADE + b"\r\n")
        time.sleep(0.1)
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answers_until_closed(connection) == [b"HTTP/1.1 200"] * 2


def test_pipelined_requests_within_the_limit_are_all_answered_on_a_connection_kept_alive(served):
    _, port, _ = served
    ok = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n" + ok * MAX_PIPELINED)
        data = b""
        while data.count(b"HTTP/1.1 ") < 1 + MAX_PIPELINED or not data.endswith(b"}"):
            more = connection.recv(65536)
            assert more, f"closed after {data.count(b'HTTP/1.1 ')} answers"
            data += more
        assert data.count(b"HTTP/1.1 200") == 1 + MAX_PIPELINED
        connection.sendall(ok)
        assert read_answer(connection).startswith(b"HTTP/1.1 200")


def test_a_client_pipelining_without_reading_gets_a_bounded_queue_then_503_and_a_close(served):
    """uvicorn parsed every pipelined request as it arrived and queued each with its state until
    its turn: thousands a connection, never read, held gigabytes and stalled the event loop."""
    app, port, _ = served
    app.ok_calls = 0
    with connect(port) as connection:
        connection.sendall(b"GET /sleep HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        time.sleep(1.5)  # the client reads nothing while /sleep runs and the queue is served
        data, _ = read_until_closed(connection)
    statuses = [data[i : i + 12] for i in range(len(data)) if data.startswith(b"HTTP/1.1 ", i)]
    assert statuses == [b"HTTP/1.1 200"] * (1 + MAX_PIPELINED) + [b"HTTP/1.1 503"]
    assert json.loads(data.rsplit(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_pipelined"
    assert app.ok_calls == MAX_PIPELINED  # nothing after the refusal ran


def test_an_answer_the_client_does_not_read_ends_the_connection_after_the_send_deadline(served):
    """uvicorn waited for ever on a full write buffer: the connection and the buffered answer stayed."""
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect(("127.0.0.1", served[1]))
        connection.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(4 * SEND_TIMEOUT_S)  # reads nothing
        data, _ = read_until_closed(connection, limit_s=5)
    assert data.startswith(b"HTTP/1.1 200") and len(data) < BIG_ANSWER  # cut off, not delivered


def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(served):
    with connect(served[1]) as connection:
        connection.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        data, reads = b"", 0
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < BIG_ANSWER:
            reads += 1
            if reads % 32 == 0:
                time.sleep(0.1)  # about 2 MB a pause: slow, but never a whole deadline without reading
            more = connection.recv(65536)
            assert more, f"closed after {len(data)} bytes"
            data += more
    assert data.startswith(b"HTTP/1.1 200")


def test_a_chunked_body_that_breaks_its_framing_gets_a_json_400_not_silence(served):
    """The parser's error came while the request ran, and nothing was answered before the close."""
    _, port, _ = served
    start = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for broken in (b"zz\r\nhello\r\n0\r\n\r\n", b"3\r\nhello\r\n0\r\n\r\n", b"5\nhello\n0\n\n"):
        with connect(port) as connection:
            connection.sendall(start)
            time.sleep(0.1)  # the request is running, waiting for its body
            connection.sendall(broken)
            data, _ = read_until_closed(connection)
        assert data.startswith(b"HTTP/1.1 400"), (broken, data[:80])
        assert json_body(data)["error"]["code"] == "bad_request"


def test_chunk_extensions_cannot_outgrow_the_data_and_the_header_limit(served):
    """Extensions reached no limit: one connection streamed gigabytes of them inside one request."""
    _, port, _ = served
    start = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(start)
        try:
            for _ in range(64):  # 5 bytes of data a chunk, 1 KiB of extension
                connection.sendall(b"5;e=" + b"x" * 1024 + b"\r\nhello\r\n")
                time.sleep(0.005)
        except OSError:
            pass  # closed by the server: what this test wants
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 400") and json_body(data)["error"]["code"] == "bad_request"
    # Chunks of one byte (5 bytes of framing each) are data, whatever their number.
    with connect(port) as connection:
        connection.sendall(start)
        for _ in range(50):
            connection.sendall(b"1\r\na\r\n" * 400)
        connection.sendall(b"0\r\n\r\n")
        assert json_body(read_answer(connection)) == {"received": 50 * 400}


def test_a_request_target_too_long_for_the_url_parser_still_gets_431(served):
    """httptools' URL parser fails at 64 KiB; its error replaced the 431 with uvicorn's 400."""
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"GET /ok?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 431")


def test_an_answer_the_client_stops_taking_midway_ends_the_connection_too(served):
    """The deadline ran only while the buffer was over its high-water mark: a client that read
    most of an answer and stopped once the rest fell under it was held for ever."""
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect(("127.0.0.1", served[1]))
        connection.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        taken = 0
        while taken < BIG_ANSWER - 8 * 2**20:  # more is left than the kernel's buffers hold
            taken += len(connection.recv(65536))
        time.sleep(4 * SEND_TIMEOUT_S)
        data, _ = read_until_closed(connection, limit_s=5)
    assert taken + len(data) < BIG_ANSWER


def test_a_websocket_upgrade_offer_is_answered_in_http_1_1_under_the_limits(served):
    """uvicorn handed a WebSocket upgrade to its WebSocket protocol, past the limits of this one."""
    _, port, _ = served
    websocket = (
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n" + websocket + b"\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 200")  # not 101: answered as HTTP/1.1
        connection.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answers_until_closed(connection) == [b"HTTP/1.1 200"]  # the connection went on
    with connect(port) as connection:
        connection.sendall(b"GET /ok?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n" + websocket + b"\r\n")
        assert answers_until_closed(connection) == [b"HTTP/1.1 431"]


def test_a_read_that_ends_one_chunked_body_and_starts_others_is_not_counted_as_framing(served):
    """A read beginning in one chunked body and ending in the next request's was all counted as the
    first body's framing (the pipelined requests' headers included): a valid upload was refused."""
    _, port, _ = served
    chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    cookie = b"GET /ok HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 2500 + b"\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(chunked + b"5\r\nhello\r\n")
        time.sleep(0.1)  # the next read starts inside that body
        connection.sendall(b"0\r\n\r\n" + cookie + cookie + chunked + b"5\r\nhello\r\n")
        time.sleep(0.1)
        connection.sendall(b"0\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 ") < 4 or not data.endswith(b"}"):
            more = connection.recv(65536)
            assert more, f"closed after {data[:200]!r}"
            data += more
    assert data.count(b"HTTP/1.1 200") == 4


@pytest.mark.parametrize(
    "host_lines",
    [b"", b"Host: a\r\nHost: b\r\n", b"Host: a b/c\r\n", b"Host: user@a\r\n"],
    ids=["missing", "twice", "not-a-host", "userinfo"],
)
def test_an_http11_request_needs_exactly_one_valid_host(served, host_lines):
    app, port, _ = served
    calls = app.ok_calls
    with connect(port) as connection:
        connection.sendall(b"GET /ok HTTP/1.1\r\n" + host_lines + b"\r\n")
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    assert "Host header" in json_body(data)["error"]["message"]
    assert app.ok_calls == calls  # refused before the app


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /ok HTTP/1.1\r\nHost: 10.0.0.7:8000\r\n",
        b"GET /ok HTTP/1.1\r\nHost: [::1]:8000\r\n",
        b"GET /ok HTTP/1.1\r\nHost: [fe80::1%25eth0]:8000\r\n",  # an IPv6 zone id (RFC 6874)
        b"GET /ok HTTP/1.1\r\nHost: captioner.default.svc.cluster.local\r\n",
        b"GET /ok HTTP/1.1\r\nHost:\r\n",  # RFC 9112: empty when the target has no authority
        b"GET /ok HTTP/1.0\r\n",  # HTTP/1.0 has no Host requirement
    ],
)
def test_the_hosts_clients_send_are_accepted(served, request_head):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(request_head + b"\r\n")
        assert read_answer(connection).startswith(b"HTTP/1.1 200")


def test_an_http10_request_expecting_100_continue_gets_no_interim_answer(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
        data, _ = read_until_closed(connection)
    assert data.startswith(b"HTTP/1.1 200"), data[:100]  # no "100 Continue" first
    assert json_body(data) == {"received": 3}


def test_an_http11_request_expecting_100_continue_gets_it(served):
    _, port, _ = served
    with connect(port) as connection:
        connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 100 Continue")
        connection.sendall(b"abc")
        assert json_body(read_answer(connection)) == {"received": 3}


def test_the_access_log_and_metrics_count_the_servers_answer_not_a_client_that_left(caplog):
    # The app answers the request whose framing broke 499 (client gone) into the closed connection;
    # the client got the protocol's 400, and that is what the log and the error metric must say.
    from app.middleware import RequestContextMiddleware

    with running(RequestContextMiddleware(App())) as port, caplog.at_level(logging.INFO, "app.access"):
        with connect(port) as connection:
            connection.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            time.sleep(0.1)
            connection.sendall(b"zz\r\nhello\r\n0\r\n\r\n")
            data, _ = read_until_closed(connection)
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if r.getMessage() == "request"] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert data.startswith(b"HTTP/1.1 400")
    (logged,) = [r for r in caplog.records if r.getMessage() == "request"]
    assert logged.status == 400
