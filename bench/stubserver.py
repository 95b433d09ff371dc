"""``python -m bench.stubserver``: the OpenAI-format stub on a free port, in its own process.

Prints its URL on the first line, then answers every request with the same
small completion until it is killed (the gateway benchmark's zero-latency
provider).
"""

from __future__ import annotations

import sys
import time

from tests.llm_stub import openai_text, serve_stub


def main() -> None:
    with serve_stub() as stub:
        stub.default = openai_text("ok", prompt=100, completion=5)
        print(stub.url, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
