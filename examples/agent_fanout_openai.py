"""An agent step that fans out over the OpenAI API: N specialist prompts sent at once with the
official ``openai`` client, each answer printed with the device that served it.

It needs a running cluster with its HTTP API; start one in another terminal first:

    fanout up                                    # HTTP API on http://127.0.0.1:8470/v1
    python examples/agent_fanout_openai.py [--base-url http://127.0.0.1:8470/v1]

Any OpenAI-compatible agent framework can point its base URL at the same address.
"""
from __future__ import annotations

import argparse
import asyncio
import time

from openai import AsyncOpenAI

QUESTION = "How should a small bakery reduce its energy bill?"
ROLES = ["an accountant", "an electrician", "a chef", "a climate scientist", "a bank manager",
         "an architect"]


async def ask(client: AsyncOpenAI, model: str, role: str, max_tokens: int):
    """One specialist; the raw response carries the X-Fanout-* headers."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[{"role": "system", "content": f"You are {role}. Answer in two sentences."},
                  {"role": "user", "content": QUESTION}])
    return raw.headers, raw.parse()


async def main_async(args) -> int:
    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key)
    started = time.perf_counter()
    answers = await asyncio.gather(*(ask(client, args.model, role, args.max_tokens)
                                     for role in ROLES))
    elapsed = time.perf_counter() - started
    tokens = sum(answer.usage.completion_tokens for _, answer in answers)
    print(f"{len(ROLES)} specialists answered in {elapsed:.2f} s ({tokens / elapsed:.0f} "
          f"tokens/s)\n")
    for role, (headers, answer) in zip(ROLES, answers):
        # The extra "fanout" field lists every failed try; the headers name the device.
        tries = (answer.model_extra or {}).get("fanout", {}).get("attempts", [])
        moved = "".join(f" [failed over from {a['device']}: {a['kind']}]" for a in tries)
        print(f"{role} ({headers.get('x-fanout-device')}{moved}):\n"
              f"  {answer.choices[0].message.content.strip()}\n")
    await client.close()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8470/v1")
    ap.add_argument("--api-key", default="unused", help="http.api_key, if the server has one")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=48)
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
