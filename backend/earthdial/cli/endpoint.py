"""A running `earthdial serve` as commands reach it: the default endpoint, a ping before a request."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from earthdial.contract.client import Client
from earthdial.contract.wire import DEFAULT_ENDPOINT, EarthDialError

PING_TIMEOUT_S = 3.0  # an endpoint named on the command line that does not answer: an error this soon
PROBE_TIMEOUT_S = 1.5  # the default endpoint, tried when neither --endpoint nor --model is given


def default_endpoint() -> str:
    return os.environ.get("EARTHDIAL_ENDPOINT") or DEFAULT_ENDPOINT


@contextlib.contextmanager
def connected(endpoint: str, timeout_s: float) -> Iterator[Client]:
    """A Client whose server answered a ping: a server that is not there fails in seconds, not after
    the whole request timeout."""
    with Client(endpoint, timeout_s=timeout_s) as client:
        client.ping(timeout_s=min(PING_TIMEOUT_S, timeout_s))
        yield client


def answers(endpoint: str) -> bool:
    try:
        with Client(endpoint, timeout_s=PROBE_TIMEOUT_S) as client:
            client.ping(timeout_s=PROBE_TIMEOUT_S)
        return True
    except EarthDialError:
        return False
