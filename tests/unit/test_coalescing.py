"""outbox_relay.coalescing._join_front: the same bytes in the same order, fewer buffers."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika.adapters.utils import io_services_utils

from outbox_relay import coalescing


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=30), st.integers(1, 120))
def test_joining_keeps_the_bytes_and_their_order(chunks: list[bytes], limit: int) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coalescing, "LIMIT", limit)
        buffers = deque(chunks)
        coalescing._join_front(buffers)
    assert b"".join(buffers) == b"".join(chunks)
    if len(chunks) > 1:
        # As many chunks as fit in the limit joined, at least one; the rest untouched.
        first = buffers[0]
        assert len(first) <= limit or first == chunks[0]
        joined = len(chunks) - len(buffers) + 1
        assert first == b"".join(chunks[:joined])
        if joined < len(chunks):
            assert len(first) + len(chunks[joined]) > limit
        assert list(buffers)[1:] == chunks[joined:]


def test_install_patches_pikas_transport_once() -> None:
    assert coalescing.install() is True
    patched = io_services_utils._AsyncTransportBase._produce
    assert coalescing.install() is True
    assert io_services_utils._AsyncTransportBase._produce is patched
    assert patched.__module__ == coalescing.__name__
