"""The compile child started ahead of time (dgemma.control.spare): it serves one compile, is replaced, and dies
with its parent even though it was started by another thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dgemma.control.spare import SpareChild


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_spare_is_started_ahead_and_used_once():
    spares = SpareChild([sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read() + sys.argv[1])"])
    try:
        first = spares.take()  # none ready yet: started now, and a spare is asked for
        assert first.communicate(b"pid ")[0] == f"pid {os.getpid()}".encode()
        for _ in range(200):
            if spares._ready:
                break
            time.sleep(0.05)
        spare = spares._ready[0]
        second = spares.take()
        assert second is spare and second.communicate(b"x")[0] == f"x{os.getpid()}".encode()
        dead = spares.take()  # a spare that died while waiting is not handed out
        dead.kill()
        dead.communicate()
        spares._ready.append(dead)
        third = spares.take()
        assert third is not dead and third.communicate(b"y")[0] == f"y{os.getpid()}".encode()
    finally:
        spares.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_every_compile_child_dies_with_the_server():
    script = textwrap.dedent("""
        import sys, time
        from dgemma.control import Constraint, ConstraintVocabulary
        vocab = ConstraintVocabulary(tuple(bytes([b]) for b in range(256)), (0,))
        Constraint.from_regex("a+", vocab)  # a spare is started by the spare thread, then waits
        print("compiled", flush=True)
        time.sleep(600)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert server.stdout.readline().strip() == b"compiled"
        for _ in range(400):  # a child is listed under the thread that started it
            children = []
            for task in os.listdir(f"/proc/{server.pid}/task"):
                with open(f"/proc/{server.pid}/task/{task}/children") as f:
                    children += [int(p) for p in f.read().split()]
            if children:
                break
            time.sleep(0.05)
        assert children, "no spare compile child was started"
        time.sleep(1.0)  # let it set its parent-death signal
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
    for _ in range(100):
        if not any(_alive(pid) for pid in children):
            return
        time.sleep(0.05)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    pytest.fail("a compile child outlived its parent")
