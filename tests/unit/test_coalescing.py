"""outbox_relay.coalescing: the same bytes in the same order, in one buffer."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st
from pika.adapters.utils import io_services_utils

from outbox_relay import coalescing


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=2, max_size=30))
def test_joining_keeps_the_bytes_and_their_order(chunks: list[bytes]) -> None:
    buffers: deque[object] = deque(chunks)
    coalescing._join(buffers)
    assert len(buffers) == 1
    joined = buffers[0]
    assert isinstance(joined, memoryview) and joined.tobytes() == b"".join(chunks)
    # What pika does with the tail of a partial send: a slice, still the right bytes.
    assert bytes(joined[3:]) == b"".join(chunks)[3:]


def test_install_patches_pikas_transport_once() -> None:
    assert coalescing.install() is True
    patched = io_services_utils._AsyncTransportBase._produce
    assert coalescing.install() is True
    assert io_services_utils._AsyncTransportBase._produce is patched
    assert patched.__module__ == coalescing.__name__
