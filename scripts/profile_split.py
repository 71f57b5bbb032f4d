"""Where couchsync's time goes, from a py-spy recording of a benchmark (the README's profile table).

    scripts/bench --only bootstrap --runs 1 --profile prof     # py-spy records each couchsync run
    python3 scripts/profile_split.py prof/bootstrap-*.txt --rate 50

Only the samples of threads running couchsync's code count (the baselines' are left out). Each is put
under the activity of the innermost couchsync module on its stack that says what it is for: the state
database, reading instances (and the global database), writing instances, planning, the broker; each
split into time waiting for the server's answer (the thread in a socket read) and Python's own time. Threads waiting
for other threads (a pool's queue, a future) are counted apart: they overlap the others' time.
The server's share (couchjs validation, view indexing, requests) is in `scripts/bench`'s own output.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

ACTIVITIES = (  # (module, activity): the innermost of these on a stack decides
    ("couchsync/state_store.py", "state database"),
    ("couchsync/writer.py", "instance writes"),
    ("couchsync/reader.py", "instance reads"),
    ("couchsync/instances.py", "instance reads"),
    ("couchsync/plan.py", "planning"),
    ("couchsync/mirror.py", "planning"),
    ("couchsync/onboarding.py", "planning"),
    ("couchsync/sync.py", "finding the instances, seed check"),
    ("couchsync/broker/", "broker"),
)
SOCKET_READS = ("readinto (socket.py", "recv_into", "do_poll (urllib3", "_read_status", "getresponse", "select (",
                "poll (")
WAITS = ("wait (threading.py", "_worker (concurrent/futures/thread.py", "result (concurrent/futures", "get (queue.py")


def activity(frames: list[str]) -> str | None:
    """The activity a stack (root first) is in, or None when it runs no couchsync code."""
    if not any("couchsync/" in frame for frame in frames):
        return None
    leaf = frames[-1]
    if any(wait in leaf for wait in WAITS):
        return "waiting for other threads"
    for frame in reversed(frames):
        for module, name in ACTIVITIES:
            if module in frame:
                waiting = any(read in leaf for read in SOCKET_READS)
                return f"{name}: {'waiting for the server' if waiting else 'Python'}"
    return "other couchsync code"


def split(lines: list[str]) -> Counter[str]:
    """Samples by activity, from py-spy's raw format (`frame;frame;... count` per line)."""
    samples: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        found = activity(stack.split(";")[1:])  # the first frame names the thread
        if found is not None:
            samples[found] += int(count)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recordings", nargs="+", help="py-spy raw recordings, added up")
    parser.add_argument("--rate", type=int, default=100, help="py-spy's --rate (samples per second)")
    args = parser.parse_args()
    samples: Counter[str] = Counter()
    for path in args.recordings:
        with open(path, encoding="utf-8") as recording:
            samples += split(recording.readlines())
    working = sum(count for name, count in samples.items() if name != "waiting for other threads")
    if not working:
        print("no sample ran couchsync code", file=sys.stderr)
        return 1
    print(f"{'activity':<58} {'thread-seconds':>14} {'share':>6}")
    for name, count in sorted(samples.items()):
        share = f"{count / working:.0%}" if name != "waiting for other threads" else "-"
        print(f"{name:<58} {count / args.rate:>14.2f} {share:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
