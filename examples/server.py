"""Run the OpenAI-compatible server: ``python examples/server.py [serve flags]``.

The same as ``llm-batcher serve``; see ``llm-batcher serve --help`` for every flag and its
``LLM_BATCHER_*`` environment variable. Examples::

    python examples/server.py                      # the embedded SmolLM2 on 127.0.0.1:8000
    python examples/server.py --model fake         # the fake backend: no torch, realistic timing
    LLM_BATCHER_API_KEY=s3cret python examples/server.py --port 9000   # the key stays out of ps
    python examples/server.py --api-key-file keys.txt                 # several keys and tenants
"""

from __future__ import annotations

import sys

from batcher.adapters import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
