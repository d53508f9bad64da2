"""An external agent (agent.command): the row as JSON on stdin, the gateway in OPENAI_BASE_URL /
OPENAI_API_KEY / OPENAI_MODEL, its reward on the last line of stdout. argv[1] picks what it does:

calls   two model calls through the openai SDK, a calculator result appended between them; prints the
        share of ASCII letters in the final reply (tests/support/agents.py two_calls' reward)
echo    no call: prints what it was given, then 0.25
silent  no call, no number printed
fail    writes to stderr and exits 1
hang    sleeps past any test's timeout
"""

from __future__ import annotations

import json
import os
import sys
import time

mode = sys.argv[1]
row = json.loads(sys.stdin.read())
if mode == "calls":
    import openai

    client = openai.OpenAI(max_retries=0)  # base URL and key from the environment
    model = os.environ["OPENAI_MODEL"]
    messages = [{"role": "user", "content": row["prompt"]}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "tool", "tool_call_id": "call_0", "content": "89"}]
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    text = second.choices[0].message.content or ""
    print(sum(ch.isascii() and ch.isalpha() for ch in text) / len(text) if text else 0.0)
elif mode == "echo":
    print(f"key of {len(os.environ['OPENAI_API_KEY'])} characters at {os.environ['OPENAI_BASE_URL']}; "
          f"answer {row['answer']}")
    print("0.25")
elif mode == "silent":
    print("done")
elif mode == "fail":
    print("the application broke", file=sys.stderr)
    sys.exit(1)
elif mode == "hang":
    time.sleep(3600)
