"""Library use from a research script: load, stream, generate, chat, logits.

    python examples/generate.py [MODEL.gguf]

Defaults to ../shared/models/stories260K.gguf beside the checkout (a tiny story model).
"""
import sys
from pathlib import Path

import numpy as np

import numallm

default = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K.gguf"
path = sys.argv[1] if len(sys.argv) > 1 else str(default)

llm = numallm.load(path, n_ctx=512, n_threads=2)

# stream: one GenerationChunk per token (text, token, logprob, speeds, finish_reason)
for chunk in llm.stream("Once upon a time", max_tokens=40, temperature=0):
    print(chunk.text, end="", flush=True)
print(f"\n[{chunk.generation_tps:.0f} tok/s, finished: {chunk.finish_reason}]")

# generate: the same, collected; seeded sampling is reproducible
r = llm.generate("The little dog", max_tokens=30, temperature=0.8, top_p=0.9, seed=42)
print(repr(r.text), r.tokens[:5], f"mean logprob {np.mean(r.logprobs):.2f}")

# chat: the model's chat template (or a plain fallback for base models)
answer = llm.chat([{"role": "user", "content": "Tell me a story."}], max_tokens=30, temperature=0)
print(repr(answer.text))

# logits at every position, e.g. for perplexity
toks = llm.tokenize("Once upon a time there was a cat.")
logp = np.stack([numallm.sampling.log_softmax(row) for row in llm.logits(toks)[:-1]])
nll = -logp[np.arange(len(toks) - 1), toks[1:]].mean()
print(f"perplexity {np.exp(nll):.2f} over {len(toks)} tokens: {llm.detokenize(toks)!r}")
