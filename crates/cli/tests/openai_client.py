"""The `openai` Python client against a running `pagedkv serve` (started by tests/serve.rs with
--max-running 1 --max-queued-requests 1): chat and completions, streaming with include_usage,
and the SDK's exceptions for the server's errors. Prints one line per check; exits non-zero on
the first failure."""

import sys
import threading

import openai

BASE = sys.argv[1]
MODEL = "SmolLM2-135M-Instruct"
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300)
checks = 0


def check(name, condition, detail=""):
    global checks
    if not condition:
        sys.exit(f"FAILED {name}: {detail}")
    checks += 1
    print(f"ok {name}")


messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
text = chat.choices[0].message.content
check("chat answers", chat.object == "chat.completion" and len(text) > 0, chat)
check("chat usage", chat.usage.completion_tokens == 16 and chat.usage.prompt_tokens > 16, chat.usage)

again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
check("greedy repeats", again.choices[0].message.content == text)
cached = again.usage.prompt_tokens_details.cached_tokens
check("cached tokens reported", cached >= 16 and cached % 16 == 0, again.usage)

stream = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=16, temperature=0,
    stream=True, stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
        check("usage chunk has no choices", chunk.choices == [])
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
check("chat stream text", "".join(pieces) == text, "".join(pieces))
check("chat stream usage", usage is not None and usage.completion_tokens == 16, usage)
check("chat stream finish", finish == "length", finish)

completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
ctext = completion.choices[0].text
check("completion answers", completion.object == "text_completion" and len(ctext) > 0, completion)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    if c.choices
)
check("completion stream text", streamed == ctext, streamed)

try:
    client.chat.completions.create(model=MODEL, messages=messages, temperature=5)
    check("BadRequestError", False, "no error")
except openai.BadRequestError as e:
    check("BadRequestError", e.status_code == 400 and e.body["param"] == "temperature", e.body)

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    check("NotFoundError", False, "no error")
except openai.NotFoundError as e:
    check("NotFoundError", e.status_code == 404 and e.body["code"] == "model_not_found", e.body)

# one request runs, one waits: the third finds the queue full
results = []
def long_request():
    r = client.completions.create(model=MODEL, prompt="Count slowly:", max_tokens=300, temperature=0)
    results.append(r.usage.completion_tokens)

def metric(series):
    import urllib.request
    text = urllib.request.urlopen(BASE + "/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0

import time
first = threading.Thread(target=long_request)
first.start()
deadline = time.time() + 60
while metric('pagedkv_requests{state="running"}') < 1 and time.time() < deadline:
    time.sleep(0.01)
second = threading.Thread(target=long_request)
second.start()
while metric('pagedkv_requests{state="waiting"}') < 1 and time.time() < deadline:
    time.sleep(0.01)
try:
    client.completions.create(model=MODEL, prompt="Count slowly:", max_tokens=300)
    check("RateLimitError", False, "no error")
except openai.RateLimitError as e:
    check("RateLimitError", e.status_code == 429 and e.response.headers.get("retry-after") == "1", e.body)
first.join()
second.join()
check("queued requests complete", len(results) == 2, results)
print(f"openai client: {checks} checks passed")
