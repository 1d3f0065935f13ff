"""The control gate and socket (issue 12, item 6) without a mount: overlapping freezes, a
freeze cancelled while it waits, and clients that die at each step never leave the mount
frozen."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from unionfs import control
from unionfs.gate import Bypassed, Gate

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


def test_a_freeze_waits_with_the_gate_open_for_files_written_past_it():
    """Open files that write past the gate (passthrough of created files): a freeze admits
    no new one, waits for those left to be closed while mutating requests still get through
    (a tar sets owner and times between its last write and its close), and only then
    closes the gate."""

    async def main() -> None:
        gate = Gate()
        gate.bypass_open(7, 100)
        gate.bypass_open(8, 100)
        frozen, done = trio.Event(), []
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:

                async def freezer() -> None:
                    await gate.freeze(DEADLINE)
                    frozen.set()

                n.start_soon(freezer)
                await trio.testing.wait_all_tasks_blocked()
                assert not gate.may_bypass and not gate.frozen
                ok = trio.Event()
                ok.set()
                await _request(gate, ok, done, "the writer's fchown")  # not held
                gate.bypass_close(7)
                await trio.testing.wait_all_tasks_blocked()
                assert not frozen.is_set()
                gate.bypass_close(8)
                await frozen.wait()
                assert gate.frozen and not gate.may_bypass
                gate.thaw()
                assert not gate.frozen and gate.may_bypass
        assert done == ["the writer's fchown"]

    trio.run(main)


def test_a_freeze_gives_up_on_files_written_past_the_gate_that_stay_open():
    async def main() -> None:
        gate = Gate()
        gate.bypass_open(7, 100)
        gate.bypass_open(9, 200)
        gate.bypass_open(10, 100)
        with trio.fail_after(DEADLINE):
            with pytest.raises(Bypassed) as exc:
                await gate.freeze(0.05)
        assert exc.value.inos == [100, 200]
        assert not gate.frozen and gate.may_bypass  # let go of its hold
        ok = trio.Event()
        ok.set()
        await _request(gate, ok, [], "next")  # admitted at once

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


def test_a_freeze_over_the_socket_names_the_files_written_past_the_gate(tmp_path):
    """`freeze:SECONDS` bounds the wait for them; the error names each file, and the
    mount stays thawed; once they are closed, the next freeze holds."""

    async def main() -> None:
        gate = Gate()
        gate.bypass_open(7, 100)
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                path = os.path.join(str(tmp_path), "control").encode()
                await n.start(
                    control.serve, control.listen(path), gate, str(tmp_path).encode(), None,
                    lambda ino: f"/mnt/file{ino}",
                )  # fmt: skip
                c = await _client(path)
                await c.send_all(b"freeze:0.05\n")
                reply = await _line_long(c)
                assert reply.startswith(b"error 1 file(s) created through the mount"), reply
                assert b"/mnt/file100" in reply and b"passthrough=0" in reply, reply
                assert not gate.frozen and gate.may_bypass
                gate.bypass_close(7)
                await c.send_all(b"freeze:0.05\n")
                assert await _line(c) == b"frozen\n"
                await c.send_all(b"freeze:x thaw\n")  # already frozen: ignored
                assert await _line(c) == b"thawed\n"
                for bad in (b"x", b"-1", b"nan"):
                    await c.send_all(b"freeze:%s\n" % bad)
                    assert await _line_long(c) == b"error bad freeze wait: %s\n" % bad
                    assert not gate.frozen and gate.may_bypass
                n.cancel_scope.cancel()

    trio.run(main)


async def _line_long(stream: trio.SocketStream) -> bytes:
    return await stream.receive_some(4096)


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
