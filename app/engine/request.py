"""What travels between the client (event loop) and the core (inference threads): one request,
its result, and the hand-back of outcomes to the loop that awaits them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Result:
    captions: list  # list[captioning.decoding.Caption], best first
    queue_ms: float  # submitted -> admitted into decode slots
    inference_ms: float  # admitted -> captions ready
    domain_score: float | None = None  # captioning.domain; None when the model has no domain check


class Request:
    __slots__ = (
        "image",
        "options",
        "width",
        "views",
        "loop",
        "future",
        "submitted",
        "admitted",
        "search",
        "abandoned",
        "deadline_timer",
        "feature_slots",
        "domain_score",
        "scene",
    )

    def __init__(self, image, options, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.image = image
        self.options = options
        self.width = options.width  # decoder rows
        self.views = options.views  # images encoded: the upload, and its mirror with mirror_view
        self.loop = loop
        self.future = future
        self.submitted = time.monotonic()
        self.admitted = 0.0
        self.search = None
        self.abandoned = False  # set on the event loop; the threads free the request's rows and slot
        self.deadline_timer = None
        self.feature_slots: list[int] = []  # where each view's features are, once encoded
        self.domain_score: float | None = None  # captioning.domain, from the encoder's features
        self.scene = None  # grounded decoding: the image's scene as the model reads it (Captioner.read_scenes)


def deliver(outcomes: list[tuple[Request, object]]) -> None:
    """On the event loop: sets each future's result or exception, unless it is already done
    (cancelled, or failed by its deadline), so a cancelled future never receives one."""
    for request, outcome in outcomes:
        if request.future.done():
            continue
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)


def each_failed(requests: list[Request], error: Exception) -> list[tuple[Request, Exception]]:
    """The outcomes of a failed batch: each request gets its own exception object, since raising
    one object in several awaiting tasks would tangle their tracebacks."""
    return [(request, type(error)(str(error))) for request in requests]
