"""`numallm pull [MODEL]`: download a Hugging Face GGUF into the cache and print its local path."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "pull", help="download a model from Hugging Face (owner/repo[:file.gguf|:QUANT]) and print its path",
        description="Download a GGUF from the Hugging Face hub into its cache (HF_HOME), with a progress "
                    "bar, and print the local path. A newer version on the hub replaces the cached one. "
                    "Without MODEL: the default chat model.")
    p.add_argument("model", nargs="?", default=None,
                   help="owner/repo (its Q4_K_M or only GGUF), owner/repo:QUANT or owner/repo:FILE.gguf")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..hub import pull

    print(pull(args.model))
    return 0
