"""Non-blocking pyzmq sockets driven from trio, each wait under a deadline.

A ZMQ socket's ``FD`` is edge-triggered and only says "look at ZMQ_EVENTS": after it
wakes us, or before sleeping on it, ``EVENTS`` must be re-read (reading it also drains
the notification). So every wait is: check ``EVENTS``; if not ready, wait for the FD to
become readable; loop. Only one task may use a socket at a time.
"""

from __future__ import annotations

import math
from typing import cast

import trio
import zmq

__all__ = ["close_socket", "recv_frames", "send_frames"]


def _fd(sock: zmq.Socket[bytes]) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


async def _wait_for(sock: zmq.Socket[bytes], flag: int) -> None:
    while not (cast(int, sock.getsockopt(zmq.EVENTS)) & flag):
        await trio.lowlevel.wait_readable(_fd(sock))


async def send_frames(sock: zmq.Socket[bytes], frames: list[bytes], *, max_wait: float) -> None:
    """Send a multipart message; raises trio.TooSlowError after ``max_wait`` seconds."""
    with trio.fail_after(max_wait):
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                await _wait_for(sock, zmq.POLLOUT)


async def recv_frames(sock: zmq.Socket[bytes], *, max_wait: float = math.inf) -> list[bytes]:
    """Receive a multipart message; raises trio.TooSlowError after ``max_wait`` seconds.

    ``math.inf`` is for server loops that wait for requests until their nursery is cancelled.
    """
    with trio.fail_after(max_wait):
        while True:
            try:
                frames: list[bytes] = sock.recv_multipart(flags=zmq.NOBLOCK)
                return frames
            except zmq.Again:
                await _wait_for(sock, zmq.POLLIN)


def close_socket(sock: zmq.Socket[bytes], *, linger_ms: int) -> None:
    """Close ``sock``, telling trio first so no waiter is left on a dead FD.

    ``linger_ms`` bounds how long queued outgoing messages may delay context termination.
    """
    if sock.closed:
        return
    trio.lowlevel.notify_closing(_fd(sock))
    sock.close(linger=linger_ms)
