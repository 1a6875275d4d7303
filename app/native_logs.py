"""Every line the server writes to standard error is one JSON object, native libraries' included.

Python's records are JSON already (app.logging_config). TensorFlow's C++ runtime and XLA write
their own plain-text lines straight to file descriptor 2, e.g.

    E0000 00:00:1796190297.539107   18245 text_format.cc:378] Error parsing text-format ...

`python -m app` calls route_native_output(), which points descriptor 2 at a pipe read by a small
child process (`python -m app.native_logs LEVEL`, standard library only): JSON lines pass through
unchanged, and every other line becomes a record of the `native` logger, glog's level letter as
its level and the source location as a field. A child rather than a thread of the server, so that
a fatal line written just before an abort still reaches the log: the child reads until the pipe
closes, which is when the server has exited. It ignores SIGINT and SIGTERM (a terminal's Ctrl-C
reaches the whole process group; the server decides when to stop). Should it die anyway (killed,
out of memory), a watchdog thread gives descriptor 2 back to the original stderr and says so, so the
server's own records keep reaching the log (native lines are then plain text again).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import subprocess
import sys
import threading

from app.logging_config import JsonFormatter

GLOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]\s]+)\] ?(.*)$")
LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# Lines TensorFlow 2.21 writes at error level for every program it loads from the compilation
# cache, although the load works: it reads each entry as a text proto before the binary one, and
# the compiling machine's feature list names LLVM tuning flags (+prefer-no-scatter, ...) that are
# no instruction set. Logged at DEBUG (LOG_LEVEL=DEBUG shows them); so is absl's notice that it
# writes to standard error before its initialisation.
HARMLESS = (
    "Error parsing text-format tensorflow.XlaSerializedCacheEntry",
    "Loading XLA:CPU AOT result. Target machine feature +prefer-no-",
    "All log messages before absl::InitializeLog() is called are written to STDERR",
)
# Lines of a CUDA build of TensorFlow on a host without a GPU: at error level, yet it runs on the
# CPU as it should. A warning: the server's "ready" record names the device it runs on.
NO_GPU = ("failed call to cuInit",)
DRAIN_TIMEOUT_S = 2.0  # at exit, for the child to write what the pipe still holds

_route: tuple[subprocess.Popen, int] | None = None  # the child and the original stderr's descriptor
_route_lock = threading.Lock()  # close() and the watchdog: one of them gives descriptor 2 back


def record_for(line: str) -> logging.LogRecord:
    """The `native` logger's record for one plain-text line."""
    match = GLOG_LINE.match(line)
    if match:
        letter, source, message = match.groups()
        level = LEVELS[letter]
    else:
        source, message, level = None, line, logging.WARNING
    if any(harmless in line for harmless in HARMLESS):
        level = logging.DEBUG
    elif any(no_gpu in line for no_gpu in NO_GPU):
        level = min(level, logging.WARNING)
    record = logging.LogRecord("native", level, source or "", 0, message, None, None)
    if source:
        record.source = source
    return record


def forward(lines, out, level: int) -> None:
    """Copies lines (bytes) to `out` (text), each as one JSON object; never raises on a bad line."""
    formatter = JsonFormatter()
    for raw in lines:
        try:
            line = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("{"):  # a JSON record of the server's own logging
                out.write(line + "\n")
            else:
                record = record_for(line)
                if record.levelno >= level:
                    out.write(formatter.format(record) + "\n")
            out.flush()
        except (ValueError, UnicodeError):
            continue


def route_native_output(level: str) -> None:
    """Points descriptor 2 (Python's sys.stderr included) at the child; falls back to leaving it
    alone when the child cannot start."""
    global _route
    if _route is not None:
        return
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "app.native_logs", level],
            stdin=read_end,
            stdout=sys.stderr.fileno(),
            close_fds=True,
        )
    except (OSError, ValueError, AttributeError):  # no child, or no usable stderr to give it
        os.close(read_end)
        os.close(write_end)
        return
    os.close(read_end)
    sys.stderr.flush()
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    _route = (child, original)
    atexit.register(close)
    threading.Thread(target=_watch, args=(child,), name="native-log-watchdog", daemon=True).start()


def _watch(child: subprocess.Popen) -> None:
    """Waits for the child; if it ends while it is still the route (it was killed, not closed),
    points descriptor 2 back at the original stderr."""
    code = child.wait()
    with _route_lock:
        if _route is None or _route[0] is not child:
            return  # close() ended it
        _give_back()
    logging.getLogger("app").error(
        "the native log forwarder exited with code %s: logging straight to standard error, native lines as plain text",
        code,
    )


def close() -> None:
    """Gives descriptor 2 back and waits for the child to write what the pipe still holds: called
    at exit, and before os._exit, so that the last lines (the shutdown's) are not lost."""
    # Not a blocking acquire: a second signal during start-up runs this again on the same thread.
    if not _route_lock.acquire(timeout=DRAIN_TIMEOUT_S):
        return
    try:
        if _route is None:
            return
        child = _give_back()
    finally:
        _route_lock.release()
    try:
        child.wait(DRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()


def _give_back() -> subprocess.Popen:
    """Points descriptor 2 at the original stderr again (the pipe's last write end closes, so a
    living child reads to the end and exits); the caller holds _route_lock."""
    global _route
    child, original = _route
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(original, 2)
    os.close(original)
    _route = None  # after the dup2: whoever sees None finds descriptor 2 usable
    return child


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    level = logging.getLevelName(sys.argv[1].upper()) if len(sys.argv) > 1 else logging.INFO
    forward(sys.stdin.buffer, sys.stdout, level if isinstance(level, int) else logging.INFO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
