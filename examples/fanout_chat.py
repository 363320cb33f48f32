"""An agent step that fans out: several specialist prompts answered at once by SmolLM2.

The embedded cluster serves the LLM on the NPU's pipeline if this PC has one, else on the CPU
worker, which decodes all the specialists together. One answer is streamed token by token.

    python examples/fanout_chat.py [--config deploy/local.yaml]
"""
from __future__ import annotations

import argparse
import time

import runtime

QUESTION = "How should a small bakery reduce its energy bill?"
ROLES = ["an accountant", "an electrician", "a chef", "a climate scientist", "a bank manager",
         "an architect"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a cluster config (default: this PC's devices)")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    with runtime.start(args.config, progress=print) as cluster:
        client = cluster.client()
        chats = [[{"role": "system", "content": f"You are {role}. Answer in two sentences."},
                  {"role": "user", "content": QUESTION}] for role in ROLES]
        started = time.perf_counter()
        answers = client.generate_many("smollm2", chats, max_tokens=args.max_tokens)
        elapsed = time.perf_counter() - started
        tokens = sum(a.usage["completion_tokens"] for a in answers)
        print(f"\n{len(ROLES)} specialists answered in {elapsed:.2f} s ({tokens / elapsed:.0f} "
              f"tokens/s)\n")
        for role, answer in zip(ROLES, answers):
            tried = "".join(f" [failed over from {a.device}: {a.kind}]" for a in answer.attempts)
            print(f"{role} ({answer.device}{tried}):\n  {answer.text.strip()}\n")

        print("streamed summary: ", end="", flush=True)
        summary = [{"role": "user", "content": "Give one tip to save energy in a bakery."}]
        for chunk in client.stream("smollm2", summary, max_tokens=args.max_tokens):
            if chunk.previous_device:
                print(f" [moved from {chunk.previous_device} to {chunk.device}] ", end="")
            print(chunk.text, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
