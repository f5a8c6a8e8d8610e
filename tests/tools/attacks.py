"""Hostile programs shared by the sandbox tests and the end-to-end containment tests
(tests/reliability/test_containment.py). Each one stays under a limit that holds per process
or per command, and breaks it for the sandbox as a whole."""

from __future__ import annotations

# hog.py INDEX COUNT MB: hold MB of touched (resident) memory until COUNT hogs hold theirs (or 5 s:
# fewer get there where a limit holds), then print how much anonymous memory all the sandbox's
# processes hold at that moment.
HOG = """\
import os, sys, time
index, count, mb = (int(a) for a in sys.argv[1:4])
block = bytearray(mb << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
open(f"held.{index}", "w").close()
deadline = time.monotonic() + 5
while sum(n.startswith("held.") for n in os.listdir(".")) < count and time.monotonic() < deadline:
    time.sleep(0.05)

def anon(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0

print("anon_total_mb", sum(anon(p) for p in os.listdir("/proc") if p.isdigit()) >> 20, flush=True)
"""

# burn.py SECONDS: use SECONDS of CPU time, then say so.
BURN = """\
import sys, time
while time.process_time() < float(sys.argv[1]):
    pass
print("burnt", flush=True)
"""

# deep.py DEPTH: a chain of DEPTH nested directories "d" with a file at the bottom.
DEEP = """\
import os, sys
for _ in range(int(sys.argv[1])):
    os.mkdir("d")
    os.chdir("d")
with open("bottom.txt", "w") as f:
    f.write("the bottom")
print("depth", sys.argv[1], flush=True)
"""

DEPTH = 3000


def hogs(count: int, mb: int) -> str:
    """A shell command starting ``count`` hogs of ``mb`` each at once."""
    return f"rm -f held.*; for i in $(seq {count}); do python3 hog.py $i {count} {mb} & done; wait; echo finished"


def burners(count: int, seconds: float) -> str:
    """A shell command starting ``count`` processes that each burn ``seconds`` of CPU."""
    return f"for i in $(seq {count}); do python3 burn.py {seconds} & done; wait; echo finished"


def anon_totals_mb(output: str) -> list[int]:
    """What each hog that lived to see the others reported (MiB held by all at that moment)."""
    return [int(line.split()[1]) for line in output.splitlines() if line.startswith("anon_total_mb ")]


def deep_path(depth: int = DEPTH) -> str:
    """The workspace-relative path of deep.py's file: far beyond PATH_MAX (4096)."""
    return "d/" * depth + "bottom.txt"
