"""Writes seeds/: the bad-request table of tests/integration/test_router.py plus a few good requests.
Each seed is one byte (0: chat, 1: completions; request_fuzz.cc reads data[0] & 1) then the body.
Run with the project venv from the repository root: .venv/bin/python tests/fuzz/router/make_seeds.py"""
import ast
import json
from pathlib import Path

here = Path(__file__).resolve().parent
source = (here.parents[1] / "integration" / "test_router.py").read_text()
# The table is literals and arithmetic on them ("x " * 5000): evaluate that one expression alone rather
# than importing the test module (which wants the venv's grpc stubs).
table = next(node for node in ast.parse(source).body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "BAD_REQUESTS")
bad = eval(compile(ast.Expression(table.value), "BAD_REQUESTS", "eval"), {"__builtins__": {}})

tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
good = [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                                           {"role": "user", "content": "Hi"}], "max_tokens": 8}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "weather?"}], "tools": tools, "tool_choice": "auto",
                              "reasoning_effort": "max", "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                                           {"role": "assistant", "content": "", "reasoning_content": "r",
                                            "tool_calls": [{"id": "call_1", "type": "function",
                                                            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                                           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
                              "tools": tools, "chat_template_kwargs": {"thinking": True}, "logprobs": True, "top_logprobs": 2,
                              "stop": ["\n\n", "END"], "logit_bias": {"15": 2.5}, "seed": 3, "top_k": 5, "min_p": 0.1}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2, "stop_token_ids": [1], "ignore_eos": True}),
    ("/v1/completions", {"prompt": [0, 19923, 3787], "stream": True, "temperature": 0.7, "top_p": 0.9}),
]

out = here / "seeds"
out.mkdir(exist_ok=True)
for i, (path, body, *_rest) in enumerate([*bad, *good]):
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    endpoint = b"\x01" if path == "/v1/completions" else b"\x00"
    (out / f"{'bad' if i < len(bad) else 'good'}-{i:02d}").write_bytes(endpoint + data.encode())
print(f"{len(bad) + len(good)} seeds in {out}")
