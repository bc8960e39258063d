"""A stand-in model server for the gateway's tests: OpenAI's chat completions, answered after a delay.

Run as its own process (``python openai_stub_server.py PORT DELAY_SECONDS``) so a test can SIGKILL it
while requests are in flight, as the OOM killer or a crashed node would, and start it again on the same
port. Every ``POST`` gets one fixed chat completion after ``DELAY_SECONDS``; ``GET /health`` answers at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

ANSWER = json.dumps(
    {
        "id": "stub",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "stub",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "billing"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
    }
).encode()


def app_answering_after(delay_s: float) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more_body = True
        while more_body:
            message = await receive()
            more_body = message.get("more_body", False)
        if scope["method"] == "POST":
            await asyncio.sleep(delay_s)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})

    return app


def main() -> None:
    import uvicorn

    port, delay_s = int(sys.argv[1]), float(sys.argv[2])
    uvicorn.run(
        app_answering_after(delay_s), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )


if __name__ == "__main__":
    main()
