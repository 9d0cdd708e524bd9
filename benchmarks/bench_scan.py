"""The key proxy's leak scan alone, per body type and key shape, CPU s per 200 MB.

    python benchmarks/bench_scan.py [--keys N]

In process, no container. ``Leaks.scan`` runs over 256 KiB pieces (one body-buffer
fill of the key proxy) of 1 MiB bodies: uniform (``b"x"``, the streaming bench's body),
random bytes, chat-completion JSON, SSE events, SSE events of varied words (the
streaming bench's ``--body text``) and base64. For three key shapes (the bench's 49
characters, OpenAI- and Anthropic-like lengths), over N random keys each (a search's
cost depends on the key's bytes), the worst and the median of: the shipped scan (libc's
``memmem`` behind the byte-count check), the ``bytes.find`` fallback (a python without
ctypes), and ``memmem`` without the count check: the measure behind the choice.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import secrets
import statistics
import time

from bench_keyproxy import text_block

from pytest_agentbox.inside.keyproxy import BUF, Leaks

MB = 1 << 20
EVENT = b"data: " + json.dumps({"id": "c-1", "choices": [{"delta": {"content": "tok"}}]}).encode()
CHAT = {"id": "chatcmpl-1", "choices": [{"message": {"content": "The quick brown fox 0123"}}]}
BODIES = {
    "uniform": b"x" * MB,
    "random": random.randbytes(MB),
    "json": (json.dumps(CHAT) * 20_000).encode()[:MB],
    "sse": ((EVENT + b"\n\n") * 20_000)[:MB],
    "base64": base64.b64encode(random.randbytes(MB))[:MB],
    "text": text_block() * (MB // len(text_block())),
}
SHAPES = {
    "bench (49)": lambda: "sk-bench-" + secrets.token_hex(20),
    "openai-like (164)": lambda: "sk-proj-" + secrets.token_urlsafe(117),
    "anthropic-like (108)": lambda: "sk-ant-api03-" + secrets.token_urlsafe(71),
}


class Uncounted(Leaks):
    """``Leaks`` searching every pattern, without the byte-count check first."""

    def holds(self, buf: bytearray, end: int, pattern: bytes) -> bool:
        return True


def seconds_per_200mb(leaks: Leaks, body: bytes, reps: int = 3) -> float:
    pieces = [bytearray(body[i : i + 4 * BUF]) for i in range(0, len(body), 4 * BUF)]
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        for piece in pieces:
            leaks.scan(piece, len(piece))
        best = min(best, time.process_time() - started)
    return best * 200 * MB / len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=6, help="random keys per shape")
    args = parser.parse_args()
    if Leaks([b"sk-x" * 8]).memmem is None:
        print("note: this python has no ctypes/memmem: every row runs bytes.find")
    print(f"CPU s per 200 MB, worst/median of {args.keys} keys; " + ", ".join(BODIES))
    for name, new in SHAPES.items():
        keys = [new().encode() for _ in range(args.keys)]
        print(f"{name}: form lengths {sorted(map(len, Leaks(keys[:1]).forms))}")
        variants = {
            "shipped (memmem)": lambda k: Leaks([k]),
            "bytes.find fallback": lambda k: Leaks([k], native=False),
            "memmem, no count check": lambda k: Uncounted([k]),
        }
        for label, make in variants.items():
            scans = [make(k) for k in keys]
            cells = []
            for body in BODIES.values():
                cost = [seconds_per_200mb(leaks, body) for leaks in scans]
                cells.append(f"{max(cost):.3f}/{statistics.median(cost):.3f}")
            print(f"  {label:<24} {' '.join(cells)}")


if __name__ == "__main__":
    main()
