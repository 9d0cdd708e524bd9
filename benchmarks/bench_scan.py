"""The key proxy's leak scan alone, per body type and sampling step, CPU s per 200 MB.

    python benchmarks/bench_scan.py

In process, no container. ``Leaks.scan`` runs over 256 KiB pieces (one body-buffer
fill of the key proxy) of 1 MiB bodies: uniform (``b"x"``, the streaming bench's body),
random bytes, chat-completion JSON, SSE events, SSE events of varied words (the
streaming bench's ``--body text``) and base64. For three key shapes (the bench's 49
characters, OpenAI- and Anthropic-like lengths) it times the shipped scan (each fill
priced: plain finds or the word sampling, ``Leaks.by_find``), each of the two forced,
and the word sampling at the larger steps that leave the shorter forms to a plain
``find``: the measure behind both choices.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import sys
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


class Forced(Leaks):
    """``Leaks`` with the per-fill choice fixed: plain finds, or the word sampling."""

    def __init__(self, keys: list[bytes], finds: bool) -> None:
        super().__init__(keys)
        self.finds = finds

    def by_find(self, buf: bytearray, end: int) -> bool:
        return self.finds


def with_step(leaks: Leaks, step: int) -> Leaks:
    """``leaks`` sampling every ``step`` bytes; forms too short for it are found whole."""
    leaks.step = step
    leaks.short = [p for p in leaks.forms if len(p) < step + 7]
    at = [(p, i) for p in leaks.forms if len(p) >= step + 7 for i in range(step)]
    leaks.anchors = {int.from_bytes(p[i : i + 8], sys.byteorder) for p, i in at}
    return leaks


def seconds_per_200mb(leaks: Leaks, body: bytes, reps: int = 5) -> float:
    pieces = [bytearray(body[i : i + 4 * BUF]) for i in range(0, len(body), 4 * BUF)]
    best = float("inf")
    for _ in range(reps):
        started = time.process_time()
        for piece in pieces:
            leaks.scan(piece, len(piece))
        best = min(best, time.process_time() - started)
    return best * 200 * MB / len(body)


def main() -> None:
    keys = {
        "bench (49)": "sk-bench-" + secrets.token_hex(20),
        "openai-like (164)": "sk-proj-" + secrets.token_urlsafe(117),
        "anthropic-like (108)": "sk-ant-api03-" + secrets.token_urlsafe(71),
    }
    print("CPU s per 200 MB; " + ", ".join(BODIES))
    for name, key in keys.items():
        default = Leaks([key.encode()])
        lengths = sorted(map(len, default.forms))
        print(f"{name}: form lengths {lengths}, default step {default.step}")
        forced = {"finds only": True, "sampling only": False}
        variants = {"shipped (priced)": default}
        variants |= {k: Forced([key.encode()], v) for k, v in forced.items()}
        for label, leaks in variants.items():
            cells = " ".join(f"{seconds_per_200mb(leaks, b):6.3f}" for b in BODIES.values())
            print(f"  {label:<25} {cells}")
        steps = sorted({default.step} | {(n - 7) // 8 * 8 for n in lengths[1:4]})
        for step in steps:
            leaks = with_step(Forced([key.encode()], False), step)
            cells = " ".join(f"{seconds_per_200mb(leaks, b):6.3f}" for b in BODIES.values())
            print(f"  step {step:4d} ({len(leaks.short)} found whole): {cells}")


if __name__ == "__main__":
    main()
