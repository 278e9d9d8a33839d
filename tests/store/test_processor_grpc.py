"""The ext_proc servicer over real gRPC with a real Redis behind it, driven with the messages Envoy
sends: the answers a client sees when the configuration is not loaded yet, and when a handler has
a bug. Served by the worker's own wiring on each transport (Tollgate's HTTP/2 server and
grpc.aio), with grpc.aio's client in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from extproc.core.exchange import Exchange, Options
from extproc.core.keys import generate_key, hash_key
from extproc.core.resources import validate_document
from extproc.launch import free_port
from extproc.server.processor import Processor
from extproc.server.settlement import Settler
from extproc.server.state import ConfigWatcher, KeyDirectory
from extproc.server.worker import serve_grpc
from extproc.settings import Settings
from extproc.store.quota_store import QuotaStore
from extproc.store.redis_store import Store

pytestmark = pytest.mark.redis


@dataclass
class Servicer:
    stub: ep_grpc.ExternalProcessorStub
    watcher: ConfigWatcher
    key: str


@pytest.fixture(params=["native", "grpcio"])
async def servicer(redis_url: str, tag: str, tmp_path: Path,
                   request: pytest.FixtureRequest) -> AsyncIterator[Servicer]:
    store = Store.from_url(redis_url, tag=tag, timeout_s=2)
    key = generate_key()
    await store.apply([validate_document({
        "apiVersion": "tollgate.io/v1alpha1", "kind": "VirtualKey",
        "metadata": {"name": "grpc-test"}, "spec": {"keySha256": hash_key(key)},
    })])
    (tmp_path / "OPENAI_API_KEY").write_text("sk-upstream-grpc")
    watcher = ConfigWatcher(store, str(tmp_path), poll_s=1.0)  # not started: tests load it
    quota = QuotaStore(store.redis, store.keys, stream_maxlen=1000)
    settler = Settler(quota, str(tmp_path / "journal"))
    processor = Processor(watcher, KeyDirectory(store), quota, settler, Options())
    port = free_port()
    server = await serve_grpc(Settings(grpc_port=port, grpc_transport=request.param), processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Servicer(ep_grpc.ExternalProcessorStub(channel), watcher, key)
    finally:
        await channel.close()
        await server.stop(0)
        await store.close()


def _headers(*pairs: tuple[str, str]) -> ep.HttpHeaders:
    """Headers as Envoy sends them: lower-case names, values in `raw_value`."""
    headers = ep.HttpHeaders(end_of_stream=False)
    for name, value in pairs:
        headers.headers.headers.append(base_pb2.HeaderValue(key=name, raw_value=value.encode()))
    return headers


def request_headers(key: str) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_headers=_headers(
        (":path", "/v1/chat/completions"), (":method", "POST"),
        ("authorization", f"Bearer {key}"), ("content-type", "application/json")))


def request_body(model: str = "gpt-4o") -> ep.ProcessingRequest:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))


def response_headers() -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_headers=_headers(
        (":status", "200"), ("content-type", "application/json")))


def error_of(response: ep.ProcessingResponse) -> tuple[int, dict[str, Any]]:
    assert response.WhichOneof("response") == "immediate_response"
    immediate = response.immediate_response
    return immediate.status.code, orjson.loads(immediate.body)["error"]


async def exchange(stub: ep_grpc.ExternalProcessorStub,
                   messages: list[ep.ProcessingRequest]) -> list[ep.ProcessingResponse]:
    """One stream, as Envoy drives it: a message, its answer, the next message ..."""
    call = stub.Process()
    answers = []
    for message in messages:
        await call.write(message)
        answer = await call.read()
        assert answer is not grpc.aio.EOF
        answers.append(answer)
        if answer.WhichOneof("response") == "immediate_response":
            break  # Envoy sends nothing more on a stream it was told to answer
    await call.done_writing()
    return answers


async def test_requests_get_503_config_unavailable_before_the_first_snapshot(
    servicer: Servicer,
) -> None:
    assert servicer.watcher.snapshot is None  # Redis unreachable at start, say
    (answer,) = await exchange(servicer.stub, [request_headers(servicer.key)])
    status, error = error_of(answer)
    assert status == 503 and error["code"] == "config_unavailable"
    assert "retry" in error["message"]
    # Once the configuration loads, the same request goes through.
    await servicer.watcher.reload()
    answers = await exchange(servicer.stub, [request_headers(servicer.key), request_body()])
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]


def _failing(original: Callable[..., Any], trigger: Callable[..., bool]) -> Callable[..., Any]:
    def wrapper(self: Exchange, *args: Any, **kwargs: Any) -> Any:
        if trigger(*args):
            raise RuntimeError("injected bug")
        return original(self, *args, **kwargs)

    return wrapper


async def test_a_bug_in_a_request_phase_is_a_json_500_and_the_server_carries_on(
    servicer: Servicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await servicer.watcher.reload()
    # A bug that strikes only requests for one model.
    monkeypatch.setattr(Exchange, "on_request_body", _failing(
        Exchange.on_request_body, lambda body, *_: b"buggy-model" in body))
    answers = await exchange(servicer.stub, [request_headers(servicer.key),
                                             request_body("buggy-model")])
    status, error = error_of(answers[-1])
    assert status == 500 and error["code"] == "internal_error"
    assert "Traceback" not in error["message"] and "injected" not in error["message"]
    request_id = dict((h.header.key, h.header.raw_value.decode()) for h in
                      answers[-1].immediate_response.headers.set_headers)
    assert request_id["x-tollgate-request-id"] in error["message"]  # for the bug report
    # The next request on the same server is served as usual.
    answers = await exchange(servicer.stub, [request_headers(servicer.key), request_body()])
    assert answers[-1].WhichOneof("response") == "request_body"
    assert any(h.header.key == "authorization" for h in
               answers[-1].request_body.response.header_mutation.set_headers)


async def test_a_bug_in_a_response_phase_lets_the_response_through(
    servicer: Servicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await servicer.watcher.reload()
    monkeypatch.setattr(Exchange, "on_response_headers", _failing(
        Exchange.on_response_headers, lambda *_: True))
    body = ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b'{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":2}}',
        end_of_stream=True))
    answers = await exchange(servicer.stub, [request_headers(servicer.key), request_body(),
                                             response_headers(), body])
    # The upstream call happened: the client gets its response, not an error, and the stream
    # goes on to its body.
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers", "request_body", "response_headers", "response_body"]
    assert not answers[2].response_headers.response.HasField("body_mutation")
