"""End-to-end check of `lmx serve`'s Messages API with the official `anthropic` client.

Run by lmx-cli's tests against a live server on loopback:
    python3 tests/clients/anthropic_client.py BASE_URL API_KEY
Exits non-zero with the failing check's message.
"""

import sys

import anthropic

base_url, api_key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "default_model"

# A whole message.
msg = client.messages.create(model=MODEL, max_tokens=24, messages=QUESTION)
assert msg.type == "message" and msg.role == "assistant", msg
answer = msg.content[0].text
assert "Paris" in answer, answer
assert msg.stop_reason == "end_turn", msg
assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, msg.usage

# The same message streamed, through the client's event accumulator.
with client.messages.stream(model=MODEL, max_tokens=24, messages=QUESTION) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed == answer, (streamed, answer)
assert final.content[0].text == answer and final.stop_reason == "end_turn", final
# The prompt came from the prefix cache the second time.
assert final.usage.cache_read_input_tokens > 0, final.usage

# A system prompt, stop sequences, max_tokens.
cut = client.messages.create(model=MODEL, max_tokens=24, messages=QUESTION, stop_sequences=["Paris"])
assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == "Paris", cut
assert cut.content[0].text == answer[: answer.index("Paris")], cut
short = client.messages.create(model=MODEL, max_tokens=2, system="You are terse.", messages=QUESTION)
assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2, short

# Token counting.
count = client.messages.count_tokens(model=MODEL, messages=QUESTION)
assert count.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens, (count, msg.usage)

# A multi-turn conversation with a tool result renders and answers.
turns = QUESTION + [
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "capital of France"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Paris"}]},
]
tools = [{"name": "lookup", "description": "Look a fact up.", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}]
after = client.messages.create(model=MODEL, max_tokens=16, messages=turns, tools=tools)
assert after.stop_reason in ("end_turn", "max_tokens", "tool_use"), after

# A forced tool call, whole and streamed.
forced = client.messages.create(model=MODEL, max_tokens=60, messages=QUESTION, tools=tools, tool_choice={"type": "any"})
use = [b for b in forced.content if b.type == "tool_use"]
assert forced.stop_reason == "tool_use" and use and use[0].name == "lookup" and isinstance(use[0].input.get("q"), str), forced
with client.messages.stream(model=MODEL, max_tokens=60, messages=QUESTION, tools=tools, tool_choice={"type": "tool", "name": "lookup"}) as stream:
    final = stream.get_final_message()
use = [b for b in final.content if b.type == "tool_use"]
assert final.stop_reason == "tool_use" and use and isinstance(use[0].input.get("q"), str), final

# Errors arrive in Anthropic's shape, as the client's exception types.
try:
    client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "system", "content": "x"}])
    raise AssertionError("a system turn in messages was accepted")
except anthropic.BadRequestError as e:
    assert e.status_code == 400 and e.body["type"] == "error", e.body
try:
    client.messages.create(model="claude-nonexistent", max_tokens=8, messages=QUESTION)
    raise AssertionError("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
try:
    anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(model=MODEL, max_tokens=8, messages=QUESTION)
    raise AssertionError("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body

print("anthropic client: all checks passed")
