"""The framing of messages between tiles on one node: whole messages out of reads of any size."""

import numpy as np
import pytest

from wafer_actors.fabric.sockets import _Frames


class _Collect:
    """The inbox side of ``_Frames``: keeps what it is handed."""

    def __init__(self):
        self.got: list[bytes] = []

    def _deliver(self, view: memoryview) -> None:
        self.got.append(bytes(view))


@pytest.mark.parametrize("chunk", [1, 3, 8, 9, 100, 5000, 10**6])
def test_messages_cut_into_reads_of_any_size_arrive_whole_and_in_order(chunk):
    rng = np.random.default_rng(chunk)
    messages = [rng.bytes(n) for n in (0, 1, 7, 8, 9, 300, 4096, 70_000, 2)]
    stream = b"".join(len(m).to_bytes(8, "little") + m for m in messages)
    inbox = _Collect()
    frames = _Frames(inbox)
    for i in range(0, len(stream), chunk):
        frames.data_received(stream[i : i + chunk])
    assert inbox.got == messages
    frames.data_received(stream[:5])  # a length not yet whole: nothing delivered, nothing lost
    assert inbox.got == messages
    frames.data_received(stream[5:])
    assert inbox.got == messages * 2
