"""The model matrix of the engine tests: every quant type the store serves, each endpoint
twice (a 128-token step budget and a 48-token one), in one server (see conftest.py here)."""

from __future__ import annotations

KEY = "inv-key"
MODELS = {"smol-q4_1": ("smollm2-135m", None), "gemma-q4_k": ("gemma3-270m", None),
          "smol-q4_0": ("smollm2-135m", "q4_0"), "smol-q8_0": ("smollm2-135m", "q8_0")}
CHUNKED = "-b48"   # the same model with another step budget
NAMES = tuple(n + s for n in MODELS for s in ("", CHUNKED))


def config() -> str:
    # one tenant: the tests read the prefix-cache counters (hidden from keys unless opted in)
    out = [f'[server]\napi_keys = ["{KEY}"]\npublic_cache_counters = true\n']
    for name, (model, convert) in MODELS.items():
        for suffix, batch in (("", 128), (CHUNKED, 48)):
            out.append(f'[[endpoints]]\nname = "{name}{suffix}"\nmodel = "{model}"\ncontext = 512\n'
                       f'parallel = 4\nbatch = {batch}\nthreads = 1\n'
                       + (f'convert = "{convert}"\n' if convert else ""))
    return "\n".join(out)
