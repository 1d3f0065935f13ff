"""The control gate and socket (issue 12, item 6) without a mount: overlapping freezes, a
freeze cancelled while it waits, and clients that die at each step never leave the mount
frozen."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from unionfs import control
from unionfs.gate import Gate

DEADLINE = 10


async def _request(gate: Gate, release: trio.Event, done: list[str], name: str) -> None:
    """A mutating request: admitted by the gate, in flight until `release`."""
    await gate.enter()
    try:
        await release.wait()
    finally:
        gate.leave()
    done.append(name)


def test_overlapping_freezes_both_complete_and_the_last_thaw_lets_writes_through():
    async def main() -> None:
        gate = Gate()
        release, done = trio.Event(), []
        frozen: list[str] = []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                n.start_soon(_request, gate, release, done, "in flight")
                await trio.testing.wait_all_tasks_blocked()

                async def freezer(name: str) -> None:
                    await gate.freeze()
                    frozen.append(name)

                n.start_soon(freezer, "a")
                await trio.testing.wait_all_tasks_blocked()
                n.start_soon(freezer, "b")  # overlaps: both wait for the same drain
                await trio.testing.wait_all_tasks_blocked()
                assert frozen == [] and gate.frozen
                release.set()
                await trio.testing.wait_all_tasks_blocked()
                assert sorted(frozen) == ["a", "b"]
                n.start_soon(_request, gate, trio.Event(), done, "held")
                late = trio.Event()
                late.set()
                n.start_soon(_request, gate, late, done, "after thaw")
                await trio.testing.wait_all_tasks_blocked()
                assert done == ["in flight"]  # held while frozen
                gate.thaw()
                await trio.testing.wait_all_tasks_blocked()
                assert gate.frozen and done == ["in flight"]  # "b" still holds it
                gate.thaw()
                await trio.testing.wait_all_tasks_blocked()
                assert not gate.frozen and done == ["in flight", "after thaw"]
                n.cancel_scope.cancel()

    trio.run(main)


def test_a_freeze_cancelled_while_it_waits_lets_go():
    async def main() -> None:
        gate = Gate()
        release, done = trio.Event(), []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                n.start_soon(_request, gate, release, done, "slow")
                await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(0.1):
                    await gate.freeze()
                assert not gate.frozen
                ok = trio.Event()
                ok.set()
                await _request(gate, ok, done, "next")  # admitted at once
                release.set()
        assert sorted(done) == ["next", "slow"]

    trio.run(main)


def test_one_freeze_waits_for_every_request_in_flight():
    async def main() -> None:
        gate = Gate()
        r1, r2, done = trio.Event(), trio.Event(), []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                n.start_soon(_request, gate, r1, done, "1")
                n.start_soon(_request, gate, r2, done, "2")
                await trio.testing.wait_all_tasks_blocked()
                frozen = trio.Event()

                async def freezer() -> None:
                    await gate.freeze()
                    frozen.set()

                n.start_soon(freezer)
                r1.set()
                await trio.testing.wait_all_tasks_blocked()
                assert not frozen.is_set()
                r2.set()
                await frozen.wait()
                gate.thaw()

    trio.run(main)


# ----- the socket protocol, served in-process ---------------------------------------------
async def _serving(nursery: trio.Nursery, tmp: str, gate: Gate) -> bytes:
    path = os.path.join(tmp, "control").encode()
    await nursery.start(control.serve, control.listen(path), gate, tmp.encode(), None)
    return path


async def _client(path: bytes) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def _line(stream: trio.SocketStream) -> bytes:
    return await stream.receive_some(64)


@pytest.mark.parametrize("when", ["frozen", "waiting for the drain"])
def test_a_client_that_dies_never_leaves_the_mount_frozen(tmp_path, when):
    async def main() -> None:
        gate = Gate()
        release, done = trio.Event(), []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                path = await _serving(n, str(tmp_path), gate)
                if when == "waiting for the drain":
                    n.start_soon(_request, gate, release, done, "stuck")
                    await trio.testing.wait_all_tasks_blocked()
                c = await _client(path)
                await c.send_all(b"freeze\n")
                if when == "frozen":
                    assert await _line(c) == b"frozen\n"
                else:
                    while not gate.frozen:
                        await trio.sleep(0.01)
                assert gate.frozen
                await c.aclose()  # the client dies
                while gate.frozen:
                    await trio.sleep(0.01)  # the daemon notices: thawed, or freeze given up
                ok = trio.Event()
                ok.set()
                await _request(gate, ok, done, "after")
                release.set()
                n.cancel_scope.cancel()
        assert "after" in done

    trio.run(main)


def test_two_clients_freeze_at_once_and_both_thaw(tmp_path):
    async def main() -> None:
        gate = Gate()
        release, done = trio.Event(), []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                path = await _serving(n, str(tmp_path), gate)
                n.start_soon(_request, gate, release, done, "busy")
                await trio.testing.wait_all_tasks_blocked()
                a, b = await _client(path), await _client(path)
                await a.send_all(b"freeze\n")
                await b.send_all(b"freeze\n")
                await trio.sleep(0.1)
                release.set()
                assert await _line(a) == b"frozen\n"
                assert await _line(b) == b"frozen\n"
                await a.send_all(b"thaw\n")
                assert await _line(a) == b"thawed\n"
                assert gate.frozen
                await b.send_all(b"ping thaw\n")
                assert await _line(b) in (b"pong\n", b"pong\nthawed\n")
                while gate.frozen:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()

    trio.run(main)


def test_ping_answers_once_the_socket_is_served(tmp_path):
    """`control.ping` (the benchmark harness's sign that a daemon has finished starting):
    a bound socket nobody serves yet keeps it waiting; served, it returns; a socket that is
    not there (yet) is tried again until the timeout, then fails."""
    path = control.socket_path(tmp_path)
    os.makedirs(os.path.dirname(path))
    with pytest.raises(FileNotFoundError):
        control.ping(tmp_path, timeout=0.2)  # nothing bound
    listener = control.listen(path.encode())

    async def main() -> None:
        answered = trio.Event()

        async def client() -> None:
            await trio.to_thread.run_sync(control.ping, tmp_path, 10.0)
            answered.set()

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                n.start_soon(client)
                await trio.sleep(0.2)
                assert not answered.is_set()  # bound, not served: it waits in the backlog
                await n.start(control.serve, listener, Gate(), str(tmp_path).encode(), None)
                await answered.wait()
                n.cancel_scope.cancel()

    trio.run(main)
