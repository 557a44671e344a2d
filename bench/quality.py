"""What `convert = "q8_0" | "q4_0"` costs in quality: KL divergence and top-1 agreement of the
converted model's next-token distributions against the published file's, over a fixed text.

    .venv/bin/python bench/quality.py [--kinds q8_0,q4_0] [--tokens 256]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from modelyard.local.convert import converted
from modelyard.local.ffi import ContextShape, LlamaContext, LlamaModel
from modelyard.store import ModelStore

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
        "Within fifty years printers worked in more than two hundred European cities, and the price "
        "of books fell so far that reading spread from monasteries and courts to merchants and "
        "craftsmen. def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n\nQuestion: What is the capital of Italy? Answer: The capital of Italy is Rome. ") * 3


def distributions(path: Path, tokens: list[int] | None, limit: int) -> tuple[list[int], np.ndarray]:
    model = LlamaModel(path)
    ids = (tokens or model.tokenize(TEXT))[:limit]
    ctx = LlamaContext(model, ContextShape(n_seq=1, n_ctx_seq=limit + 8, n_batch=limit, n_threads=2))
    ctx.decode(ids, range(len(ids)), [0] * len(ids), [True] * len(ids))
    rows = np.stack([ctx.logits_row(i).astype(np.float64) for i in range(len(ids))])
    ctx.close()
    model.close()
    rows -= rows.max(axis=1, keepdims=True)
    return ids, rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))   # log-probabilities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="q8_0,q4_0", help="conversions to compare, comma-separated (default q8_0,q4_0)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of the fixed text to score (default 256)")
    args = ap.parse_args()
    src = ModelStore(Path.home() / ".cache" / "modelyard", progress=False).resolve("smollm2-135m")
    ids, ref = distributions(src, None, args.tokens)
    print(f"reference: {src.name} over {len(ids)} tokens of fixed text")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            _, lp = distributions(converted(src, kind, Path(tmp), 2), ids, args.tokens)
            kl = (np.exp(ref) * (ref - lp)).sum(axis=1)
            agree = (ref.argmax(axis=1) == lp.argmax(axis=1)).mean()
            print(f"{kind}: KL(published || {kind}) mean {kl.mean():.4f} nats, p95 {np.quantile(kl, 0.95):.4f}; "
                  f"top-1 agreement {agree:.1%}")


if __name__ == "__main__":
    main()
