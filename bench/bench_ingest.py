#!/usr/bin/env python3
"""Ingest benchmark: the node's durable C-STORE rate and memory against dcmtk's storescp.

Every receiver runs as its own process, gets a fresh output folder per run (so all of them
write new files) and is fed by dcmtk ``storescu`` with ``TCP_NODELAY=1``:

* ``storescp``    dcmtk's reference receiver (``-od``; ``--fork`` for concurrent associations);
                  it does not fsync;
* ``opmri-node``  ``python -m opmri_node serve`` with a Redis broker (started by the
                  benchmark), as it runs beside Celery workers: the listening process holds no
                  models; the instance's file, its commit record in the preamble, flushed
                  with one fdatasync and a committed state database row before every
                  0x0000;
* ``pynetdicom``  a plain pynetdicom 3 handler that decodes the data set and calls ``save_as``
                  (what a first implementation usually looks like);
* ``storescp+sync`` storescp again, timed until ``sync`` has put its files on disk.

Files written by a run are kept until the benchmark ends. On ext4 without a journal the inode
allocator skips inodes freed in the last minutes, one by one, so each file created soon after
a mass deletion costs up to a millisecond of CPU; deleting each run's output before the next
run would charge that to whichever receiver comes next instead of to the receiver.

The disk ceiling (files of the same size, each written, fdatasynced and dropped from the page
cache as the node does) is measured in every
round as well: on a disk whose sustained synchronous bandwidth is low, it, not the receiver,
bounds the durable rate. ``--workdir /dev/shm`` runs everything on tmpfs, which shows what the
receivers cost in CPU alone.

Measured: instances per second over one association and over N concurrent associations
(median of the rounds), the node's peak resident memory while receiving, and the memory effect
of a PDU header claiming 4 GiB followed by a stream of bytes (against the node and against
plain pynetdicom). Printed as ratios against storescp measured in the same run: its median
and, since storescp's rate depends on the memory state of the machine far more than the
node's, its fastest round.

Usage: ``.venv/bin/python bench/bench_ingest.py [--instances 300] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.node_fixtures import TOOL_ENV, free_port, make_mr_series, tool  # noqa: E402

NAIVE_SCP = r"""
import os, sys, uuid
from pynetdicom import AE, evt, AllStoragePresentationContexts
port, out = int(sys.argv[1]), sys.argv[2]
def on_store(event):
    ds = event.dataset
    ds.file_meta = event.file_meta
    ds.save_as(os.path.join(out, uuid.uuid4().hex + ".dcm"), enforce_file_format=True)
    return 0x0000
ae = AE("NAIVE")
ae.maximum_associations = 16
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context("1.2.840.10008.1.1")
ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""

console = Console()
RECEIVE_PROCESSES = os.cpu_count() or 1
"""node.receive_processes of the node under test (--receive-processes)."""
BROKER_URL = "redis://127.0.0.1:6379/0"
"""Set in main() to a redis-server the benchmark starts (the node runs as in production with
workers: the SCP process holds no models)."""


@dataclass
class Receiver:
    """One receiver under test."""

    name: str
    called_ae: str
    start: Callable[[Path, int, bool], subprocess.Popen[bytes]]
    rates_single: list[float] = field(default_factory=list)
    rates_concurrent: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    then_sync: bool = False
    """Count the time until ``sync`` has written everything (a receiver that does not fsync)."""


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited early with {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"receiver did not open port {port}")


def start_storescp(out: Path, port: int, concurrent: bool) -> subprocess.Popen[bytes]:
    args = [tool("storescp"), "-od", str(out), "-aet", "STORESCP"]
    if concurrent:
        args.append("--fork")
    return subprocess.Popen(
        [*args, str(port)], env=TOOL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def start_node(out: Path, port: int, concurrent: bool) -> subprocess.Popen[bytes]:
    config = out / "node.yaml"
    config.write_text(
        "node:\n"
        "  ae_title: OPMRI\n"
        "  bind: 127.0.0.1\n"
        f"  port: {port}\n"
        "  data_dir: data\n"
        "  study_stable_seconds: 3600\n"
        "  min_free_disk_mb: 512\n"
        f"  receive_processes: {RECEIVE_PROCESSES}\n"
        "peers:\n"
        "  bench:\n"
        "    ae_title: BENCH\n"
        "    host: 127.0.0.1\n"
        "    port: 11112\n"
        "    may_send: true\n"
        "queue:\n"
        f"  broker: {BROKER_URL}\n"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "opmri_node", "serve", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_naive(out: Path, port: int, concurrent: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", NAIVE_SCP, str(port), str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class RSSSampler:
    """Peak resident set size of a process tree, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def current(self) -> int:
        total = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.current())
            except psutil.Error:
                return
            time.sleep(0.02)

    def __enter__(self) -> RSSSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send(port: int, called: str, folders: Sequence[Path]) -> float:
    """storescu each folder over its own association, all at once; returns elapsed seconds."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [tool("storescu"), "-aet", "BENCH", "-aec", called, "+sd", "127.0.0.1", str(port),
             str(folder)],
            env=TOOL_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for folder in folders
    ]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    elapsed = time.perf_counter() - started
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0 or b"E:" in output:
            raise RuntimeError(f"storescu failed:\n{output.decode(errors='replace')}")
    return elapsed


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.terminate()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_stored(receiver: Receiver, out: Path) -> int:
    if receiver.name == "opmri-node":
        import sqlite3

        with sqlite3.connect(out / "data" / "state.sqlite3") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    return sum(1 for p in out.iterdir() if p.is_file() and p.name != "node.yaml")


def run_once(
    receiver: Receiver, work: Path, folders: Sequence[Path], expected: int, concurrent: bool
) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work))
    port = free_port()
    proc = receiver.start(out, port, concurrent)
    try:
        wait_port(port, proc)
        os.sync()  # start every run with no dirty pages left by the previous receiver
        with RSSSampler(proc.pid) as sampler:
            elapsed = send(port, receiver.called_ae, folders)
            if receiver.then_sync:
                os.sync()
                elapsed = time.perf_counter() - sampler.started
        if receiver.name == "opmri-node":
            receiver.peak_rss_mb = max(receiver.peak_rss_mb, sampler.peak / 2**20)
    finally:
        stop(proc)
    stored = count_stored(receiver, out)
    if stored != expected:
        raise RuntimeError(f"{receiver.name} stored {stored} of {expected} instances")
    return expected / elapsed


def free_memory_mb() -> int:
    """``MemFree`` of ``/proc/meminfo`` in MB (0 where there is none)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) // 1024
    return 0


def disk_ceiling(work: Path, count: int, size: int) -> float:
    """Files per second the disk takes when each one is written and fdatasynced (and, like the
    node does, its pages are then dropped from the page cache)."""
    folder = Path(tempfile.mkdtemp(prefix="ceiling-", dir=work))
    data = os.urandom(size)
    os.sync()
    started = time.perf_counter()
    for index in range(count):
        fd = os.open(folder / f"{index}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return count / (time.perf_counter() - started)


def pdu_bomb(receiver: Receiver, work: Path, stream_mb: int) -> tuple[float, float, float]:
    """Send a PDU header claiming 4 GiB, stream bytes; returns (MB accepted, RSS before, after)."""
    out = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-bomb-", dir=work))
    port = free_port()
    proc = receiver.start(out, port, False)
    try:
        wait_port(port, proc)
        time.sleep(0.5)
        sampler = RSSSampler(proc.pid)
        before = sampler.current() / 2**20
        sent = 0
        chunk = b"\0" * (1 << 20)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(5)
            sock.sendall(bytes([0x01, 0x00]) + (0xFFFFFFFF).to_bytes(4, "big"))
            try:
                for _ in range(stream_mb):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            time.sleep(0.5)
            after = sampler.current() / 2**20
    finally:
        stop(proc)
        shutil.rmtree(out, ignore_errors=True)
    return sent / 2**20, before, after


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each instance")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bomb-mb", type=int, default=256, help="bytes streamed after the header")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--receive-processes", type=int, default=os.cpu_count() or 1,
                        help="node.receive_processes of the node (default: the CPU count, as "
                        "storescp --fork uses every core)")
    args = parser.parse_args(argv)
    global RECEIVE_PROCESSES
    RECEIVE_PROCESSES = args.receive_processes
    console.print(f"opmri-node runs with node.receive_processes = {RECEIVE_PROCESSES}")
    console.print(
        f"memory never used by the page cache at start: {free_memory_mb()} MB (on a virtual "
        "machine, page cache growing into it can cost the host's page faults: receivers that "
        "keep what they write cached, like storescp, slow down)"
    )
    # SIGTERM unwinds like Ctrl-C, so that receivers started by the benchmark are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    global BROKER_URL
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    redis_port = free_port()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    BROKER_URL = f"redis://127.0.0.1:{redis_port}/0"
    try:
        console.print(f"generating {args.instances} MR instances of {args.size}x{args.size} ...")
        series = make_mr_series(work / "input" / "all", args.instances, size=args.size)
        parts = [work / "input" / f"part{i}" for i in range(args.concurrency)]
        for i, path in enumerate(series.files):
            part = parts[i % args.concurrency]
            part.mkdir(parents=True, exist_ok=True)
            os.link(path, part / path.name)
        receivers = [
            Receiver("storescp", "STORESCP", start_storescp),
            Receiver("opmri-node", "OPMRI", start_node),
            Receiver("pynetdicom", "NAIVE", start_naive),
            Receiver("storescp+sync", "STORESCP", start_storescp, then_sync=True),
        ]
        ceilings = []
        for round_no in range(1, args.rounds + 1):
            ceilings.append(disk_ceiling(work, args.instances, series.files[0].stat().st_size))
            # rotate the order so that no receiver always follows the same one
            shift = (round_no - 1) % len(receivers)
            for receiver in receivers[shift:] + receivers[:shift]:
                single = run_once(receiver, work, [series.files[0].parent], args.instances, False)
                receiver.rates_single.append(single)
                multi = run_once(receiver, work, parts, args.instances, True)
                receiver.rates_concurrent.append(multi)
                console.print(
                    f"round {round_no}: {receiver.name:11s} 1 assoc {single:7.1f}/s   "
                    f"{args.concurrency} assoc {multi:7.1f}/s"
                )

        bombs = {r.name: pdu_bomb(r, work, args.bomb_mb) for r in receivers[1:3]}
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    reference = receivers[0]
    ref_single = statistics.median(reference.rates_single)
    ref_multi = statistics.median(reference.rates_concurrent)
    table = Table(
        title=f"C-STORE ingest, {args.instances} MR {args.size}x{args.size}, "
        f"median of {args.rounds} rounds, storescu with TCP_NODELAY=1"
    )
    for column in ("receiver", "1 assoc /s", "x storescp", f"{args.concurrency} assoc /s",
                   "x storescp"):
        table.add_column(column, justify="right")
    for receiver in receivers:
        single = statistics.median(receiver.rates_single)
        multi = statistics.median(receiver.rates_concurrent)
        table.add_row(
            receiver.name,
            f"{single:.0f}",
            f"{single / ref_single:.2f}",
            f"{multi:.0f}",
            f"{multi / ref_multi:.2f}",
        )
    ceiling = statistics.median(ceilings)
    table.add_row(
        "disk ceiling", f"{ceiling:.0f}", f"{ceiling / ref_single:.2f}", "", "",
    )
    console.print(table)
    console.print(
        "storescp writes to the page cache only; storescp+sync counts until `sync` returns; "
        "disk ceiling: files of this size written, fdatasynced and dropped from the page "
        "cache one after the other, "
        "which bounds any receiver that makes each instance durable before answering."
    )

    bomb_table = Table(title="PDU header claiming 4 GiB, then a stream of zero bytes")
    for column in ("receiver", "MB accepted before close", "RSS before MB", "RSS after MB",
                   "growth MB"):
        bomb_table.add_column(column, justify="right")
    for name, (accepted, before, after) in bombs.items():
        bomb_table.add_row(
            name, f"{accepted:.0f}", f"{before:.0f}", f"{after:.0f}", f"{after - before:+.0f}"
        )
    console.print(bomb_table)

    node = receivers[1]
    ratio_single = statistics.median(node.rates_single) / ref_single
    ratio_multi = statistics.median(node.rates_concurrent) / ref_multi
    accepted, before, after = bombs["opmri-node"]
    console.print(
        f"opmri-node durable ingest: {ratio_single:.2f} x storescp over 1 association, "
        f"{ratio_multi:.2f} x over {args.concurrency} (target >= 0.5)"
    )
    best_single, best_multi = max(reference.rates_single), max(reference.rates_concurrent)
    console.print(
        f"against storescp's fastest round ({best_single:.0f}/s and {best_multi:.0f}/s, its rate "
        f"depends on the machine's memory state): "
        f"{statistics.median(node.rates_single) / best_single:.2f} x and "
        f"{statistics.median(node.rates_concurrent) / best_multi:.2f} x"
    )
    console.print(f"opmri-node peak RSS while receiving: {node.peak_rss_mb:.0f} MB (target <= 300)")
    console.print(
        f"opmri-node RSS after a 4 GiB PDU header and {accepted:.0f} MB streamed: "
        f"{after - before:+.0f} MB"
    )
    ok = (
        ratio_single >= 0.5
        and ratio_multi >= 0.5
        and node.peak_rss_mb <= 300
        and after - before < 16
    )
    console.print("targets met" if ok else "[red]targets NOT met[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
