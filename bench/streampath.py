"""Tollgate's own work per chunk of a streamed (SSE) answer, in process (no Envoy, no gRPC).

`bench/hotpath.py`'s request path (the same servicer, Redis, key and limits), with the answer
streamed: the response headers say `text/event-stream` and the body comes as `--chunks` messages
of one OpenAI chat.completions chunk event each, then the usage chunk and `data: [DONE]`. What a
chunk costs is the difference between two chunk counts; under valgrind (deterministic):

    for n in 10 60; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
      .venv/bin/python bench/streampath.py --chunks $n --requests 100 --rounds 1 \\
      --concurrency 1 --redis-timeout 60; done
    # per chunk = (Ir(60) - Ir(10)) / (50 * 300)   (200 warm-up + 100 measured requests)

Without valgrind it prints CPU time per request like hotpath.py (noisy on a shared machine).
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hotpath
from hotpath import ep, header_map

CHUNKS = 20


def chunk_event(i: int) -> bytes:
    doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
           "model": "gpt-4o-mini",
           "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def messages(key: str) -> list[ep.ProcessingRequest]:
    sent = hotpath.messages_buffered(key)
    body = orjson.loads(hotpath.BODY)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    raw = orjson.dumps(body)
    headers = sent[0].request_headers
    for h in headers.headers.headers:
        if h.key == "content-length":
            h.raw_value = str(len(raw)).encode()
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
             "model": "gpt-4o-mini", "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": CHUNKS,
                       "total_tokens": 9 + CHUNKS}}
    tail = b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n"
    return [
        sent[0],
        ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=header_map({
            ":status": "200", "content-type": "text/event-stream"})),
        *(ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk_event(i)))
          for i in range(CHUNKS)),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=tail, end_of_stream=True)),
    ]


async def one_request(processor: hotpath.Processor,
                      sequence: list[ep.ProcessingRequest]) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        for message in sequence:
            yield message

    replies = [reply async for reply in processor.Process(requests(), None)]
    if len(replies) != len(sequence) or b"xproxy_result" not in (
            replies[-1].response_body.response.body_mutation.body):
        raise RuntimeError(f"not the streamed path: {replies[-1]}")


def main() -> int:
    global CHUNKS
    argv = sys.argv[1:]
    if "--chunks" in argv:
        at = argv.index("--chunks")
        CHUNKS = int(argv[at + 1])
        del argv[at:at + 2]
    hotpath.messages_buffered = hotpath.messages  # type: ignore[attr-defined]
    hotpath.messages = messages
    hotpath.one_request = one_request
    return hotpath.main(argv)


if __name__ == "__main__":
    sys.exit(main())
