"""A small research-assistant agent: newline-delimited JSON in, JSON out.

Protocol (stdin -> stdout, one JSON object per line):
    -> (start)                          <- {"type": "ready", "remembered": N}
    -> {"type": "message", "text": ...}  <- {"type": "delta", "text": ...} (streamed)
                                        <- {"type": "message", "text": <full reply>}
    -> {"type": "shutdown"}             <- {"type": "shutdown"}
Errors are answered with {"type": "error", "message": ...}; the agent keeps going.

It talks to any OpenAI-compatible chat completions API with streaming, using only
OPENAI_API_KEY and OPENAI_BASE_URL from its environment (plain HTTP from the standard
library, so it needs no install step), and remembers each exchange in ~/state/.
Run one question without the protocol: python3 agent.py --once "hello"
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

MODEL = os.environ.get("AGENT_MODEL", "gpt-4o-mini")
MEMORY = Path.home() / "state" / "memory.jsonl"


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def remembered() -> list[dict]:
    if not MEMORY.exists():
        return []
    return [json.loads(line) for line in MEMORY.read_text().splitlines() if line.strip()]


def remember(question: str, answer: str) -> None:
    MEMORY.parent.mkdir(parents=True, exist_ok=True)
    with MEMORY.open("a") as fh:
        fh.write(json.dumps({"q": question, "a": answer}) + "\n")


def ask(question: str, on_delta) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise RuntimeError(f"OPENAI_BASE_URL must be an http(s) URL, not {base!r}")
    if not key:
        raise RuntimeError("OPENAI_API_KEY is not set")
    history = [{"role": "user", "content": m["q"]} for m in remembered()[-5:]]
    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "messages": [*history, {"role": "user", "content": question}],
        }
    ).encode()
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        f"{base}/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    parts: list[str] = []
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                delta = json.loads(data)["choices"][0].get("delta", {}).get("content") or ""
                if delta:
                    parts.append(delta)
                    on_delta(delta)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace")
        raise RuntimeError(f"upstream error {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"upstream unreachable: {exc.reason}") from None
    return "".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--once":
        try:
            answer = ask(argv[1], lambda d: None)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        remember(argv[1], answer)
        print(answer)
        return 0
    emit({"type": "ready", "remembered": len(remembered())})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            emit({"type": "error", "message": "input is not JSON"})
            continue
        if msg.get("type") == "shutdown":
            emit({"type": "shutdown"})
            return 0
        if msg.get("type") != "message" or not isinstance(msg.get("text"), str):
            emit({"type": "error", "message": "expected {'type': 'message', 'text': ...}"})
            continue
        try:
            answer = ask(msg["text"], lambda d: emit({"type": "delta", "text": d}))
        except RuntimeError as exc:
            emit({"type": "error", "message": str(exc)})
            continue
        remember(msg["text"], answer)
        emit({"type": "message", "text": answer})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
