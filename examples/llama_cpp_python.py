"""A llama-cpp-python script that runs on numallm by changing only its import.

    python examples/llama_cpp_python.py MODEL.gguf

With llama-cpp-python installed, `from llama_cpp import Llama` runs the same script on llama.cpp.
"""
import sys

from numallm import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, n_gpu_layers=0, seed=1, verbose=False)

# completion (greedy: the same text as `numallm run MODEL "Once upon a time" --temp 0 -n 32`)
out = llm("Once upon a time", max_tokens=32, temperature=0.0)
print("completion:", out["choices"][0]["text"])
print("finish:", out["choices"][0]["finish_reason"], "usage:", out["usage"])

# streaming completion, stopping at a string
for chunk in llm.create_completion("Once upon a time", max_tokens=32, temperature=0.0,
                                   stop=["."], stream=True):
    print(chunk["choices"][0]["text"], end="", flush=True)
print()

# chat, whole and streamed
messages = [{"role": "user", "content": "Tell me a story."}]
reply = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0)
print("chat:", reply["choices"][0]["message"]["content"])
for chunk in llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0,
                                        stream=True):
    print(chunk["choices"][0]["delta"].get("content", ""), end="", flush=True)
print()

tokens = llm.tokenize(b"Hello world")
print("tokens:", tokens, "->", llm.detokenize(tokens))
