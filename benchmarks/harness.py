"""The benchmark run: every workload on every engine, interleaved, several rounds.

Order: round by round, workload by workload, engine by engine (A B C A B C …), so slow drifts of
this noisy machine hit every engine alike and ratios can be taken pair by pair (same round).
Each workload gets a fresh mount with fresh upper/work dirs under the run dir, and is unmounted
(lazily if busy) whatever happens; an engine that fails a workload is recorded as failed and the
run goes on.  Mount time is timed on the dataset's stack of tiny layers with relative layer
names (cwd = the stack), so 500 layers fit in the kernel's one-page mount options.  Results are
`Row`s, plain data that `report` prints, saves and draws.  Single process, root only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import LAYERFS, umount
from benchmarks.dataset import Dataset
from benchmarks.workloads import WORKLOADS, Workload, describe

ENGINES = ("kernel", "fuse-overlayfs", "layerfs")
# Run only when named (--engines): layerfs with the writeback cache instead of passthrough,
# to measure the per-mount choice between the two (the kernel grants one of them).
OPTIONAL_ENGINES = ("layerfs-writeback",)


@dataclass
class Row:
    id: str  # "W1", "M500", "S1"
    mode: str  # cold | warm | once
    title: str
    baseline: str  # the engine the ratios are taken against
    target: float | None = None  # max ratio (or, for mount time, max seconds)
    target_kind: str = "ratio"  # ratio | seconds
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def add(self, engine: str, seconds: float) -> None:
        self.samples.setdefault(engine, []).append(seconds)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def mount(engine: str, opts: str, mnt: Path, cwd: Path | None = None) -> None:
    """Mount, and return once the mount answers and has finished starting.  A FUSE daemon
    may return before it serves (layerfs answers INIT first and imports its handlers after),
    and the kernel queues what comes meanwhile; layerfs then answers without trio until it
    needs it, and the first request that needs it waits for its import (100-150 ms): a
    workload timed from there would include the rest of the start-up.  The mount rows time
    that start-up themselves (`mount_round`).  A writable layerfs mount has finished
    starting once its control socket answers (a control client makes it load trio)."""
    _mount(engine, opts, mnt, cwd)
    answered(mnt)
    if engine.startswith("layerfs") and "workdir=" in opts:
        from unionfs import control

        control.ping(opts.split("workdir=", 1)[1].split(",", 1)[0])


def answered(mnt: Path) -> None:
    """Block until the filesystem at `mnt` answers a request: the root's attributes, which a
    FUSE mount does not know until it asks the daemon (the kernel's root inode starts with
    them expired)."""
    os.stat(mnt)


def _mount(engine: str, opts: str, mnt: Path, cwd: Path | None = None) -> None:
    cmd = {
        "kernel": ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
        "fuse-overlayfs": ["fuse-overlayfs", "-o", opts, str(mnt)],
        "layerfs": [LAYERFS, "-o", opts, str(mnt)],
        "layerfs-writeback": [LAYERFS, "-o", opts + ",writeback=1", str(mnt)],
    }[engine]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def fresh_mount_dirs(d: Path, lowers: Sequence[str | Path]) -> tuple[Path, str]:
    """New, empty d/upper, d/work and d/mnt; returns the mountpoint and the mount options."""
    shutil.rmtree(d, ignore_errors=True)
    for sub in ("upper", "work", "mnt"):
        (d / sub).mkdir(parents=True)
    lowerdir = ":".join(map(str, lowers))
    return d / "mnt", f"lowerdir={lowerdir},upperdir={d / 'upper'},workdir={d / 'work'}"


def prepare(w: Workload, mode: str, first: bool, mnt: Path, ds: Dataset) -> None:
    """What comes before the timed run of `w` in `mode` (the module docstring of workloads)."""
    if mode == "cold":
        drop_caches()
    elif mode == "warm" and first:
        w.run(mnt, ds)
    elif mode == "once":
        os.sync()


def _error(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        err = (exc.stderr or "").strip().splitlines()
        return f"{Path(exc.cmd[0]).name} exited {exc.returncode}" + (f": {err[-1]}" if err else "")
    return f"{type(exc).__name__}: {exc}"


class Harness:
    def __init__(
        self, ds: Dataset, engines: list[str], run_dir: Path, log: Callable[[str], None] = print
    ) -> None:
        self.ds = ds
        self.engines = engines
        self.run_dir = run_dir
        self.log = log
        self.rows: dict[tuple[str, str], Row] = {}
        # a FUSE daemon's peak RSS over a workload's modes, the most of any round, by
        # workload and engine: what the daemon keeps per object the workload met
        self.peak_rss: dict[str, dict[str, int]] = {}

    def row(self, id: str, mode: str, **kw: object) -> Row:
        if (id, mode) not in self.rows:
            self.rows[(id, mode)] = Row(id, mode, **kw)  # type: ignore[arg-type]
        return self.rows[(id, mode)]

    @contextlib.contextmanager
    def attempt(self, rows: Iterable[Row], label: str, engine: str, d: Path) -> Iterator[None]:
        """One engine's turn on a fresh mount under `d`: a failure is recorded in `rows` and
        logged, not raised (one engine failing does not stop the run), and d/mnt is unmounted
        and `d` removed whatever happens."""
        try:
            yield
        except Exception as exc:
            for row in rows:
                row.errors[engine] = _error(exc)
            self.log(f"    {label} {engine}: FAILED {_error(exc)}")
        finally:
            umount(d / "mnt")
            shutil.rmtree(d, ignore_errors=True)

    # --- W1..W10 ---------------------------------------------------------------------------

    def workload_round(self, wid: str) -> None:
        w = next(w for w in WORKLOADS if w.id == wid)
        title = describe(w, self.ds)
        rows = [
            self.row(w.id, m, title=title, baseline="kernel", target=w.targets.get(m))
            for m in w.modes
        ]
        for engine in self.engines:
            d = self.run_dir / engine
            mnt, opts = fresh_mount_dirs(d, self.ds.lowers)
            with self.attempt(rows, w.id, engine, d):
                mount(engine, opts, mnt)
                for i, (mode, row) in enumerate(zip(w.modes, rows, strict=True)):
                    prepare(w, mode, i == 0, mnt, self.ds)
                    t0 = time.perf_counter()
                    reported = w.run(mnt, self.ds)
                    took = time.perf_counter() - t0
                    row.add(engine, reported if reported is not None else took)
                self._note_daemon_rss(w.id, engine, mnt)
        rss = self.peak_rss.get(w.id)
        if rss:
            shown = ", ".join(f"{e} {b / 1e6:,.0f} MB" for e, b in rss.items())
            for row in rows:
                row.title = f"{title} [daemon peak RSS: {shown}]"

    def _note_daemon_rss(self, wid: str, engine: str, mnt: Path) -> None:
        """The peak RSS (VmHWM) of the daemon serving `mnt`, if a FUSE engine serves it."""
        from benchmarks.floor import daemon_pids

        for pid in daemon_pids(mnt):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    kb = int(line.split()[1])
                    seen = self.peak_rss.setdefault(wid, {})
                    seen[engine] = max(seen.get(engine, 0), kb * 1024)

    # --- mount time --------------------------------------------------------------------------

    def mount_round(self) -> None:
        depths = self.ds.sizes.stack_depths
        for depth in depths:
            row = self.row(
                f"M{depth}",
                "once",
                title=f"mount {depth} layer(s)",
                baseline="kernel",
                # issue 11: M1 ≤ 60 ms; issue 6: M500 ≤ 2 s
                target={1: 0.06, 500: 2.0}.get(depth),
                target_kind="seconds",
            )
            # what a user of the mount waits for: the mount command, then the first answer
            # (no target of its own; the M1 is the process wall time above)
            answer_row = self.row(
                f"M{depth}",
                "first",
                title=f"mount {depth} layer(s), until the first request is answered",
                baseline="kernel",
                target_kind="seconds",
            )
            names = [f"{i:03d}" for i in reversed(range(depth))]
            for engine in self.engines:
                # with an upper, as a container has (the kernel refuses a single lower alone)
                d = self.run_dir / engine
                mnt, opts = fresh_mount_dirs(d, names)
                with self.attempt([row, answer_row], f"M{depth}", engine, d):
                    t0 = time.perf_counter()
                    _mount(engine, opts, mnt, cwd=self.ds.stack)
                    took = time.perf_counter() - t0
                    answered(mnt)
                    until_answer = time.perf_counter() - t0
                    # it answers: the top layer's own file is there
                    if not (mnt / f"own{depth - 1}").exists():
                        raise RuntimeError(f"own{depth - 1} missing from the mount")
                    row.add(engine, took)
                    answer_row.add(engine, until_answer)

    # --- one request -------------------------------------------------------------------------

    def floor_round(self) -> None:
        """µs per getxattr and per open+close on each engine, and on a pyfuse3 filesystem that
        does nothing (the floor any pyfuse3 + trio daemon pays per request here)."""
        from benchmarks.floor import daemon_pids, null_fs, per_request, pinned

        n = 500 if self.ds.sizes.small_files < 5000 else 2000  # quick: fewer calls
        # issue 11: R1 ≤ 15 µs with the daemon pinned to the caller's CPU; unpinned reported too
        rows = {
            (op, mode): self.row(
                f"R{i}",
                mode,
                title=f"one {op} (per call)"
                + (", daemon and caller on one CPU" if mode == "pinned" else ""),
                baseline="kernel",
                target=15e-6 if (op, mode) == ("getxattr", "pinned") else None,
                target_kind="seconds",
            )
            for i, op in enumerate(("getxattr", "open+close"), 1)
            for mode in ("warm", "pinned")
        }
        cpu = max(os.sched_getaffinity(0))
        for engine in [*self.engines, "pyfuse3-null"]:
            d = self.run_dir / engine
            mnt, opts = fresh_mount_dirs(d, self.ds.lowers)
            with self.attempt(rows.values(), "R", engine, d), contextlib.ExitStack() as null:
                if engine == "pyfuse3-null":
                    target = null.enter_context(null_fs(mnt))
                else:
                    mount(engine, opts, mnt)
                    target = mnt / "small" / "f00000"
                for op, took in per_request(target, n).items():
                    rows[(op, "warm")].add(engine, took)
                pids = []  # kernel overlayfs: only the caller is pinned
                if engine != "kernel":
                    pids = daemon_pids(mnt)
                    if not pids:
                        raise RuntimeError(f"no process serving {mnt} to pin")
                with pinned(pids, cpu):
                    for op, took in per_request(target, n).items():
                        rows[(op, "pinned")].add(engine, took)

    # --- store -------------------------------------------------------------------------------

    def store_round(self, store: object) -> None:
        """S1/S2 (and S6/S7) on the sample image; S1d/S2d on the Debian image."""
        from benchmarks.store import StoreBench

        assert isinstance(store, StoreBench)
        files = store.files
        d = "d" if store.debian else ""
        layers = "1 gzip layer" if store.debian else "3 gzip layers"
        changes = (
            f"reinstall of {len(list((store.image.parent / 'debs').glob('*.deb')))} packages"
            if store.debian
            else f"~{min(files, 1000):,} rewritten files"
        )
        work: list[tuple[str, str, str, str, Callable[[], dict[str, float]], float | None]] = [
            # issue 16: S1 ≤ ×1.0 of skopeo+umoci, S2 ≤ ×0.6 of umoci repack
            (
                f"S1{d}",
                "once",
                f"pull + unpack, {layers}, {store.label}",
                "skopeo+umoci",
                store.pull_round,
                1.0,
            ),
            (
                f"S2{d}",
                "once",
                f"commit {changes} ({store.label})",
                "umoci",
                store.commit_round,
                0.6,
            ),
        ]
        if not store.debian:
            work += [
                (
                    "S6",
                    "once",
                    f"unpack 3 gzip layers, {files:,} files, with/without fingerprints",
                    "without",
                    store.unpack_round,
                    1.05,
                ),
                (
                    "S7",
                    "warm",
                    "fsck: every blob (sha256) and layer file (xxh3) vs cat",
                    "cat",
                    store.fsck_round,
                    None,
                ),
            ]
        for sid, mode, title, base, fn, target in work:
            row = self.row(sid, mode, title=title, baseline=base, target=target)
            try:
                for engine, took in fn().items():
                    row.add(engine, took)
                if sid == "S7":
                    row.title = f"{title} [{store.fsck_bytes / 1e6:,.0f} MB]"
                elif sid in ("S1", "S1d", "S2", "S2d"):
                    rss = store.rss_summary("pull" if sid.startswith("S1") else "commit")
                    row.title = f"{title} [{rss}]"
            except Exception as exc:
                row.errors["layer"] = _error(exc)
                self.log(f"    {sid}: FAILED {_error(exc)}")

    # --- podman (S3-S5) ----------------------------------------------------------------------

    def podman_round(self, bench: object) -> None:
        """One round of the podman paths: each command on each storage engine, back to back."""
        from benchmarks.podman_bench import PodmanBench

        assert isinstance(bench, PodmanBench)
        for sid, title, fn in (
            ("S3", "podman run --rm IMG true", bench.run_round),
            ("S4", "podman build, 3 RUN + COPY", bench.build_round),
            ("S5", f"podman export, 3 layers, {bench.files:,} files", bench.export_round),
        ):
            row = self.row(sid, "once", title=title, baseline="kernel")
            try:
                for engine, took in fn().items():
                    row.add(engine, took)
            except Exception as exc:
                row.errors["podman"] = _error(exc)
                self.log(f"    {sid}: FAILED {_error(exc)}")


def fuse_overlayfs_available() -> bool:
    return shutil.which("fuse-overlayfs") is not None


def check_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, drop_caches)"
    for tool in ("fio", "dd", "tar", "find"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    if not Path(LAYERFS).exists():
        return f"{LAYERFS} is missing: run scripts/setup.sh"
    return None
