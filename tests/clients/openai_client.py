"""End-to-end check of `lmx serve` with the official `openai` Python client.

Run by lmx-cli's tests against a live server on loopback:
    python3 tests/clients/openai_client.py BASE_URL API_KEY
Exits non-zero with the failing check's message.
"""

import json
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Models.
models = client.models.list()
served = models.data[0].id

# A whole chat answer.
whole = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=24)
answer = whole.choices[0].message.content
assert "Paris" in answer, answer
assert whole.choices[0].finish_reason == "stop", whole
assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0, whole.usage
assert whole.usage.prompt_tokens_details.cached_tokens is not None, whole.usage

# The same answer streamed, with a usage chunk at the end.
stream = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=24, stream=True, stream_options={"include_usage": True})
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == answer, ("".join(parts), answer)
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
# The second time the prompt came from the prefix cache.
assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1, usage

# Sampling settings, stop strings, log-probabilities and n.
cut = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=24, stop=["Paris"])
assert cut.choices[0].message.content == answer[: answer.index("Paris")], cut
lp = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=4, logprobs=True, top_logprobs=2)
tokens = lp.choices[0].logprobs.content
assert len(tokens) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens), lp
many = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=6, n=2, temperature=0.9, top_p=0.95, seed=3, presence_penalty=0.5, frequency_penalty=0.2)
assert [c.index for c in many.choices] == [0, 1], many

# Text completions, whole and streamed.
done = client.completions.create(model=served, prompt="The capital of France is", max_tokens=5)
text = done.choices[0].text
streamed = "".join(c.choices[0].text for c in client.completions.create(model=served, prompt="The capital of France is", max_tokens=5, stream=True) if c.choices)
assert streamed == text, (streamed, text)

# The Responses API: text input, a conversation continued by previous_response_id (its
# prefix from the cache), streaming through the client's accumulator, retrieval.
first = client.responses.create(model=served, input="What is the capital of France?", max_output_tokens=24)
assert first.status == "completed" and "Paris" in first.output_text, first
again = client.responses.create(model=served, input="And of Germany?", previous_response_id=first.id, max_output_tokens=24)
assert again.output_text and again.usage.input_tokens > first.usage.input_tokens, again
assert again.usage.input_tokens_details.cached_tokens > first.usage.input_tokens // 2, again.usage
with client.responses.stream(model=served, input="What is the capital of France?", instructions="You are a helpful AI assistant named SmolLM, trained by Hugging Face", max_output_tokens=96) as s:
    deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
    final = s.get_final_response()
assert deltas and final.output_text == deltas, (deltas, final)
assert client.responses.retrieve(first.id).output_text == first.output_text
short = client.responses.create(model=served, input="Count to fifty.", max_output_tokens=3)
assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens", short

# Structured output through the client's pydantic helper: the answer validates.
import pydantic


class City(pydantic.BaseModel):
    name: str
    country: str
    is_capital: bool


parsed = client.chat.completions.parse(model=served, messages=[{"role": "user", "content": "Describe Paris."}], response_format=City, max_tokens=80)
assert isinstance(parsed.choices[0].message.parsed, City) and parsed.choices[0].message.parsed.name == "Paris", parsed

# Tool calls: required, streamed, and a loop that goes on after the result.
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat.completions.create(model=served, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=60)
call = called.choices[0].message.tool_calls[0]
assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", called
assert "city" in json.loads(call.function.arguments), call
deltas = [tc for c in client.chat.completions.create(model=served, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=60, stream=True) if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
assert len(deltas) == 1 and deltas[0].function.name == "get_weather" and deltas[0].index == 0, deltas
loop = ask + [called.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
after = client.chat.completions.create(model=served, messages=loop, tools=TOOLS, max_tokens=30)
assert after.choices[0].message.content is not None, after

# Errors arrive as the client's exception types, with the server's message.
try:
    client.chat.completions.create(model=served, messages=QUESTION, temperature=-1)
    raise AssertionError("a negative temperature was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "temperature" in str(e), e
try:
    client.chat.completions.create(model="no-such-model", messages=QUESTION)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "not served here" in str(e), e
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

print("openai client: all checks passed")
