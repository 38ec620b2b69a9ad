"""DSML tool calls and reasoning through the whole real path: the engines run the tiny model with
--test-forced-output-ids (every request's output is a fixed token sequence: the tiny model's
tokenization of a reasoning + DSML tool-call answer), and the real tandem-router parses it for the
official `openai` client and for a grpcio client of router.proto, in mixed mode and in PD."""
import json
import time

import grpc
import pytest
from tokenizers import Tokenizer

import test_pd as pd
from engine_harness import MODELS, Server, free_port
from test_router import MIXED_FLAGS, Router, router_stubs

REASONING = "Let me look it up."
CONTENT = "Sure."
CALL = ("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
# The prompt ends with <think> (thinking on): the answer closes it, then speaks, then calls.
ANSWER = REASONING + "</think>" + CONTENT + CALL
ARGUMENTS = {"city": "Paris", "days": 3}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def tokenizer():
    return Tokenizer.from_file(str(MODELS / "tiny" / "tokenizer.json"))


def eos_id():
    return json.loads((MODELS / "tiny" / "config.json").read_text())["eos_token_id"]


@pytest.fixture(scope="module")
def forced_ids():
    ids = tokenizer().encode(ANSWER, add_special_tokens=False).ids
    assert tokenizer().decode(ids, skip_special_tokens=False) == ANSWER
    return ids + [eos_id()]  # the end of the answer: finish rules end the request on it


def forced_flag(ids):
    return ["--test-forced-output-ids", ",".join(map(str, ids))]


@pytest.fixture(scope="module")
def mixed_router(forced_ids):
    server = Server(args=MIXED_FLAGS + forced_flag(forced_ids), log_name="mixed-forced")
    router = Router(["--mixed", f"127.0.0.1:{server.grpc_port}"], name="router-forced-mixed")
    yield router, server
    assert router.stop() == 0
    assert server.stop() == 0


@pytest.fixture(scope="module")
def pd_router(forced_ids):
    # Prefill samples the first token, decode the rest: both legs get the flag.
    env = {"UCX_TLS": "tcp"}
    bootstrap = free_port()
    prefill = Server(binary="tandem-prefill", log_name="prefill-forced", env=env,
                     args=["--bootstrap-port", str(bootstrap), *pd.PD_FLAGS, *forced_flag(forced_ids)])
    decode = Server(binary="tandem-decode", log_name="decode-forced", env=env,
                    args=["--mode", "decode", *pd.PD_FLAGS, *forced_flag(forced_ids)])
    router = Router(["--prefill", f"127.0.0.1:{prefill.grpc_port},{bootstrap}", "--decode", f"127.0.0.1:{decode.grpc_port}"],
                    name="router-forced-pd")
    yield router, decode
    assert router.stop() == 0
    assert [prefill.stop(), decode.stop()] == [0, 0]


@pytest.fixture(params=["mixed", "pd"])
def router(request):
    return request.getfixturevalue(f"{request.param}_router")[0]


def ask(router, **kwargs):
    return router.client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS,
        max_tokens=200, extra_body={"chat_template_kwargs": {"thinking": True}}, **kwargs)


def test_the_flag_is_loudly_test_only(mixed_router, forced_ids):
    _, server = mixed_router
    log = server.log_text()
    assert "--test-forced-output-ids is set" in log and f"{len(forced_ids)} forced tokens" in log


def test_the_engine_outputs_the_forced_tokens_and_finish_rules_still_apply(router, forced_ids):
    whole = router.client.completions.create(model="tiny", prompt="Hi", max_tokens=200,
                                             extra_body={"skip_special_tokens": False})
    assert whole.choices[0].text == ANSWER and whole.choices[0].finish_reason == "stop"  # ended by the eos id
    cut = router.client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body={"skip_special_tokens": False})
    assert cut.choices[0].text == tokenizer().decode(forced_ids[:5], skip_special_tokens=False)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    # A stop id inside the forced sequence ends it there, as it would a sampled one.
    stopped = router.client.completions.create(model="tiny", prompt="Hi", max_tokens=200,
                                               extra_body={"skip_special_tokens": False, "stop_token_ids": [forced_ids[3]]})
    assert stopped.choices[0].text == tokenizer().decode(forced_ids[:3], skip_special_tokens=False)
    assert stopped.choices[0].finish_reason == "stop"


def test_openai_client_gets_tool_calls_and_reasoning(router):
    answer = ask(router)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.model_extra["reasoning_content"] == REASONING
    assert choice.message.content == CONTENT
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGUMENTS
    assert answer.usage.completion_tokens > 0


def test_openai_client_streams_reasoning_content_then_the_call(router):
    chunks = list(ask(router, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning, content, calls, order = "", "", {}, []
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        if (delta.model_extra or {}).get("reasoning_content"):
            reasoning += delta.model_extra["reasoning_content"]
            order.append("reasoning")
        if delta.content:
            content += delta.content
            order.append("content")
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                entry["id"] = call.id
            if call.function and call.function.name:
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
            order.append("tool")
    assert reasoning == REASONING and content == CONTENT
    # §4.3 order: reasoning, then content, then the call.
    assert order == sorted(order, key=["reasoning", "content", "tool"].index), order
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == ARGUMENTS
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_grpc_client_gets_the_same_call(router):
    rpb, rrpc = router_stubs()
    tool = TOOLS[0]["function"]
    request = rpb.ChatCompletionRequest(
        model="tiny", messages=[rpb.ChatMessage(role="user", content="What is the weather in Paris?")],
        tools=[rpb.Tool(name=tool["name"], description=tool["description"], parameters_json=json.dumps(tool["parameters"]))],
        thinking=True, sampling=rpb.Sampling(max_tokens=200))
    with grpc.insecure_channel(f"127.0.0.1:{router.grpc_port}") as channel:
        chunks = list(rrpc.RouterStub(channel).ChatCompletion(request, timeout=120))
    assert chunks[0].role == "assistant"
    assert "".join(c.reasoning_content for c in chunks) == REASONING
    assert "".join(c.content for c in chunks) == CONTENT
    deltas = [d for c in chunks for d in c.tool_calls]
    assert deltas and {d.index for d in deltas} == {0}
    assert deltas[0].name == "get_weather" and deltas[0].id.startswith("call_")
    assert json.loads("".join(d.arguments for d in deltas)) == ARGUMENTS
    assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage.completion_tokens > 0


def test_tool_choice_none_leaves_the_dsml_as_content(mixed_router):
    router, _ = mixed_router
    answer = ask(router, tool_choice="none")
    message = answer.choices[0].message
    assert not message.tool_calls and answer.choices[0].finish_reason == "stop"
    assert message.model_extra["reasoning_content"] == REASONING


def test_non_streaming_client_that_leaves_frees_the_engine(mixed_router):
    import http.client

    router, server = mixed_router
    context = router.client.models.list().data[0].model_extra["max_model_len"]
    connection = http.client.HTTPConnection("127.0.0.1", router.http_port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "Hi", "max_tokens": min(context - 16, 20000), "ignore_eos": True}), headers={"Content-Type": "application/json"})
    deadline = time.time() + 30
    while server.loads().running_requests == 0:  # each GetLoads is a round trip: no sleep needed
        assert time.time() < deadline, "the request never started"
    connection.sock.close()
    connection.close()
    # Far sooner than the tens of thousands of tokens it asked for would take.
    server.wait_idle(timeout=15)


def test_http_listen_backlog_is_raised(mixed_router):
    import subprocess

    router, _ = mixed_router
    # httplib listens with a backlog of 5: a burst of new connections past it waits a 1 s SYN retransmission.
    lines = subprocess.run(["ss", "-ltnH", f"sport = :{router.http_port}"], capture_output=True, text=True,
                           check=True).stdout.split("\n")
    backlogs = [int(line.split()[2]) for line in lines if line.strip()]
    assert backlogs and min(backlogs) > 5, lines
