"""`numallm run MODEL PROMPT`: one-shot generation; prints only the generated text (or JSON)."""
from __future__ import annotations

import json
import sys

from .common import add_model_args, add_sampling_args, load_model, sampling_kwargs


def register(sub) -> None:
    p = sub.add_parser("run", help="generate a continuation of PROMPT (scriptable)")
    add_model_args(p)
    p.add_argument("prompt", help='prompt text ("" = BOS only); "-" reads standard input')
    add_sampling_args(p, n_predict=-1)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message with the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, timings")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="after generating, print to stderr where the model ran: the PROCESSOR split "
                        "(bytes and measured time per device) and where each layer ran (as chat /stats)")
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_model(args)
    kw = sampling_kwargs(args, llm.n_ctx)
    toks = llm.chat_tokens([{"role": "user", "content": prompt}]) if args.chat else prompt
    if args.json:
        r = llm.generate(toks, **kw)
        print(json.dumps({"text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
                          "prompt_tokens": r.prompt_tokens, "prompt_tps": r.prompt_tps,
                          "generation_tokens": r.generation_tokens, "generation_tps": r.generation_tps},
                         ensure_ascii=False))
    else:
        out = sys.stdout
        for chunk in llm.stream(toks, **kw):
            out.write(chunk.text)
            out.flush()
        out.write("\n")
    if args.verbose:
        print("PROCESSOR  100% CPU" if llm.offload is None else llm.offload.summary(llm.model),
              file=sys.stderr)
    return 0
