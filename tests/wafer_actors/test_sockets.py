"""The channels between tiles: whole messages out of reads of any size, over Unix sockets and TCP."""

import asyncio
import os

import numpy as np
import pytest

from wafer_actors.fabric.sockets import Inbox, Outbox, _Frames


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


def test_a_tile_listens_on_a_unix_socket_and_a_tcp_port_until_every_peer_is_connected(tmp_path):
    """One peer over the Unix socket and one over TCP: messages of any size, one larger than a socket's buffers,
    arrive whole and in each sender's order; sealed, the inbox takes no new peer and its socket file is gone."""
    rng = np.random.default_rng(1)
    messages = {way: [rng.bytes(n + extra) for n in (0, 9, 70_000, 6_000_000, 3)]  # no message in both
                for way, extra in (("unix", 0), ("tcp", 1))}

    async def main():
        got = []
        inbox = Inbox(lambda view: got.append(bytes(view)))
        path, port = await inbox.open("127.0.0.1")
        assert os.path.exists(path) and port[0] == "127.0.0.1"
        boxes = {"unix": await Outbox.connect(path), "tcp": await Outbox.connect(port)}
        await inbox.seal(2)
        assert not os.path.exists(path)
        with pytest.raises(OSError):
            await Outbox.connect(port)
        for way, box in boxes.items():
            for m in messages[way]:
                box.post(m)
        total = sum(map(len, messages.values()))
        for _ in range(2000):
            if len(got) == total:
                break
            await asyncio.sleep(0.005)
        for box in boxes.values():
            box.close()
        return got

    got = asyncio.run(main())
    for way, sent in messages.items():  # each sender's messages in its order (the two streams may interleave)
        assert [m for m in got if m in sent] == sent
    assert len(got) == sum(map(len, messages.values()))
