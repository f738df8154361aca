"""Tests of llm.py against a local OpenAI-compatible endpoint (no network)."""
import base64
import http.server
import io
import json
import threading

import pytest
import torch
from PIL import Image

import data
import llm



class ChatHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible endpoint: answers POST /v1/chat/completions with `reply`."""
    reply, seen = None, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.seen.append((self.path, body, self.headers.get("Authorization")))
        content = ChatHandler.reply(body) if callable(ChatHandler.reply) else ChatHandler.reply
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ChatHandler.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_llm_prompt_file_good_reply(chat_server, tmp_path):
    def good(body):  # every class asked for gets two prompts (inside a code fence, as LLMs do)
        names = json.loads(body["messages"][0]["content"].split("Classes: ")[1])
        return "```json\n" + json.dumps({n: [f"a photo of a {n}.", f"a {n} in the wild."] for n in names}) + "\n```"
    ChatHandler.reply = good
    path = llm.write_class_prompts(tmp_path / "p.json", ["cat", "dog", "sea lion"], chat_server, "m", "KEY", n=2)
    table = json.loads(path.read_text())
    assert table["sea lion"] == ["a photo of a sea lion.", "a sea lion in the wild."]
    assert ChatHandler.seen[0][0] == "/v1/chat/completions" and ChatHandler.seen[0][2] == "Bearer KEY"
    assert llm.read_class_prompts(path, ["dog", "cat"])[0] == ["a photo of a dog.", "a dog in the wild."]


@pytest.mark.parametrize("reply, message", [
    ("Sure! Here are some prompts: cat, dog", "malformed reply"),
    (json.dumps({"cat": ["a cat."]}), "no prompts for 1 of the 2 classes"),
    (json.dumps({"cat": ["a cat."], "dog": []}), "non-empty list"),
])
def test_llm_prompt_file_bad_replies_write_nothing(chat_server, tmp_path, reply, message):
    ChatHandler.reply = reply
    with pytest.raises(data.DataError, match=message) as e:
        llm.write_class_prompts(tmp_path / "p.json", ["cat", "dog"], chat_server, "m")
    assert "\n" not in str(e.value) and not (tmp_path / "p.json").exists()


def test_a_prompt_file_for_other_class_names_is_one_line_naming_both_sides(tmp_path):
    """A CuPL-style file {class: [prompts]} whose keys are spelt otherwise (an underscore kept)
    names the first classes without prompts and the first keys that name no class."""
    path = tmp_path / "cupl.json"
    path.write_text(json.dumps({"dog": ["a dog."], "tabby_cat": ["a tabby cat."], "sports car": ["a car."]}))
    with pytest.raises(llm.DataError) as e:
        llm.read_class_prompts(path, ["dog", "tabby cat", "sports car"])
    msg = str(e.value)
    assert "no prompts for 1 of the 3 classes, first 'tabby cat'" in msg and "keys that name no class: 'tabby_cat'" in msg
    assert "\n" not in msg
    assert llm.read_class_prompts(path, ["dog", "sports car"]) == [["a dog."], ["a car."]]  # extra keys are fine


def test_llm_prompt_file_refused_connection(tmp_path, monkeypatch):
    monkeypatch.setattr(llm.time, "sleep", lambda s: None)  # no back-off waits in the test
    with pytest.raises(data.DataError, match="cannot get a reply .* after 3 tries"):
        llm.write_class_prompts(tmp_path / "p.json", ["cat"], "http://127.0.0.1:1/v1", "m")
    assert not (tmp_path / "p.json").exists()


def test_caption_image_sends_the_image_inline_and_cleans_the_reply(chat_server):
    ChatHandler.reply = '  "A white   seven on black."\n'
    image = torch.zeros(3, 4, 5, dtype=torch.uint8)
    image[0, 1, 2] = 255
    caption = llm.caption_image(image, chat_server, "vision-model", hint="seven")
    assert caption == "A white seven on black."
    content = ChatHandler.seen[0][1]["messages"][0]["content"]
    assert "It shows a seven" in content[0]["text"]
    url = content[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (5, 4) and sent.getpixel((2, 1)) == (255, 0, 0)  # the same pixels, losslessly
    ChatHandler.reply = "  "
    with pytest.raises(data.DataError, match="empty caption"):
        llm.caption_image(image, chat_server, "vision-model")


def test_a_prompt_file_naming_a_class_twice_or_an_existing_output_is_one_line(chat_server, tmp_path):
    """--llm-prompts: a class given twice in the JSON (json.loads would keep its last prompts without a
    word) is one line naming it. --write-llm-prompts onto an existing file (prompts a run was made
    with, or the person's own) is refused before any request, and the file stays as it was."""
    path = tmp_path / "p.json"
    path.write_text('{"cat": ["a cat."], "dog": ["a dog."], "cat": ["a kitten."]}')
    with pytest.raises(llm.DataError) as e:
        llm.read_class_prompts(path, ["cat", "dog"])
    assert "names the class 'cat' twice (JSON would keep only its last prompts)" in str(e.value)
    ChatHandler.seen = []
    ChatHandler.reply = json.dumps({"cat": ["x."], "dog": ["y."]})
    with pytest.raises(llm.DataError) as e:
        llm.write_class_prompts(path, ["cat", "dog"], chat_server, "m")
    assert f"--write-llm-prompts {path} exists" in str(e.value) and "\n" not in str(e.value)
    assert ChatHandler.seen == [] and "a kitten." in path.read_text()
