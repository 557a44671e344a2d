"""An OpenAI-compatible upstream that can be put to sleep and woken the way vLLM's sleep mode and
llama-server's router mode are (their documented HTTP APIs), for proxy/lifecycle's tests.

- dialect "vllm": `POST /sleep?level=1`, `POST /wake_up`, `GET /is_sleeping` -> {"is_sleeping"};
- dialect "llama-server": `POST /models/unload` and `POST /models/load` with {"model": name},
  `GET /models` -> {"data": [{"id": name, "status": {"value": "loaded" | "unloaded"}}]}.

Its completions stream (the gateway always asks for a stream). While asleep they answer 503 (what a sleeping server's generation does is not served);
`up = False` makes its health probe (`GET /v1/models`) answer 503 too: a replica that is down or
scaled to zero. Every call is appended to `calls` ("sleep", "wake", "completion") in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from testkit.upstream import sse


@dataclass
class Sleepy:
    dialect: str                      # "vllm" or "llama-server"
    model: str = "org/model"
    asleep: bool = False
    up: bool = True
    calls: list[str] = field(default_factory=list)

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def models(request):
            if not self.up:
                return JSONResponse({"error": "starting"}, status_code=503)
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        async def completion(request):
            body = await request.json()
            if self.asleep or not self.up:
                return JSONResponse({"error": {"message": "the engine is asleep"}}, status_code=503)
            self.calls.append("completion")
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
            return sse([{**chunk, "choices": [{"index": 0, "text": " awake", "finish_reason": None}]},
                        {**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]},
                        {**chunk, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1,
                                                           "total_tokens": 3}},
                        "data: [DONE]\n\n"])

        async def sleep(request):
            self.asleep = True
            self.calls.append("sleep")
            return JSONResponse({})

        async def wake(request):
            if self.dialect == "llama-server" and (await request.json()).get("model") != self.model:
                return JSONResponse({"error": "unknown model"}, status_code=400)
            self.asleep = False
            self.calls.append("wake")
            return JSONResponse({})

        async def is_sleeping(request):
            return JSONResponse({"is_sleeping": self.asleep})

        async def router_models(request):
            return JSONResponse({"data": [{"id": self.model, "status": {
                "value": "unloaded" if self.asleep else "loaded"}}]})

        routes = [Route("/v1/models", models), Route("/v1/completions", completion, methods=["POST"])]
        if self.dialect == "vllm":
            routes += [Route("/sleep", sleep, methods=["POST"]), Route("/wake_up", wake, methods=["POST"]),
                       Route("/is_sleeping", is_sleeping)]
        else:
            routes += [Route("/models/unload", sleep, methods=["POST"]), Route("/models/load", wake, methods=["POST"]),
                       Route("/models", router_models)]
        return Starlette(routes=routes)
