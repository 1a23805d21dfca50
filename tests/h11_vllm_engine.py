"""A stand-in vLLM engine on uvicorn + h11, the HTTP stack real vLLM and SGLang servers run on, to
test the gateway's engine client against it: keep-alive with uvicorn's idle timeout, chunked SSE,
content-length JSON. It speaks the vLLM NixlConnector leg protocol strictly (role from
PDGATE_TEST_ROLE): a prefill leg must ask for one token, not streamed, with
`kv_transfer_params.do_remote_decode`; a decode leg must carry the params a prefill returned."""

import json
import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

ROLE = os.environ.get("PDGATE_TEST_ROLE", "prefill")
app = FastAPI()


@app.get("/health")
async def health():
    return {"ok": True}


def _error(msg: str):
    return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, status_code=400)


@app.post("/v1/completions")
@app.post("/v1/chat/completions")
async def complete(request: Request):
    body = await request.json()
    params = body.get("kv_transfer_params") or {}
    rid = request.headers.get("x-request-id", "")
    if ROLE == "prefill":
        if not params.get("do_remote_decode") or body.get("max_tokens") != 1 or body.get("stream"):
            return _error(f"not a prefill leg: {body}")
        return {"id": rid, "object": "text_completion", "choices": [{"index": 0, "text": "x"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                "kv_transfer_params": {"do_remote_prefill": True, "remote_block_ids": [7, 8],
                                       "remote_engine_id": "h11-prefill", "remote_request_id": rid}}
    if params.get("remote_block_ids") != [7, 8] or params.get("remote_request_id") != rid:
        return _error(f"decode leg without the prefill's params: {params}")
    words = ["alpha", " beta", " gamma", " delta"]
    chat = request.url.path.endswith("/chat/completions")
    if not body.get("stream"):
        text = "".join(words)
        choice = {"index": 0, "finish_reason": "length"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "choices": [choice], "filler": "z" * 40000,
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}

    async def events():
        for w in words:
            piece = {"delta": {"content": w}} if chat else {"text": w}
            yield f"data: {json.dumps({'id': rid, 'choices': [dict(index=0, **piece)]})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
