"""
Text written by a language model through an OpenAI-compatible chat endpoint (POST
{api_base}/chat/completions), with the standard library only: retries on transient failures,
replies validated before anything is written, files written atomically, one clear line when the
endpoint cannot be reached.

CoFT+ uses it for its class prompts (paper Sec. 3.3: LLM-written descriptions replace the
hand-written template in the zero-shot pass):

    OPENAI_API_KEY=... python coft.py --dataset dtd --data-root DATA --write-llm-prompts dtd.json
    python coft.py --dataset dtd --data-root DATA --plus --llm-prompts dtd.json

The file is JSON {class name: [prompt, ...]}, so prompts from any other source work as well.
VeCAF asks an image-capable model for one caption per pool image (`caption_image`; vecaf.py
writes the file {image: caption}).
"""
import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torchvision.transforms.functional import to_pil_image

from data import DataError, DuplicateKey, json_object
from imagefiles import load_image


def chat(messages, api_base, model, api_key=None, retries=3, timeout=120, temperature=0.7):
    """The reply text of one chat completion. Server errors (5xx, 429) and network failures are
    retried with back-off; a client error, a last failure or a malformed reply raise DataError."""
    url = api_base.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "temperature": temperature, "messages": messages}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
                reply = json.loads(r.read().decode())
            break
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429 or attempt + 1 == retries:  # a client error will not improve
                raise DataError(f"{url} answered HTTP {e.code} ({e.reason}); check --api-base, the model name "
                                f"and the API key") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            if attempt + 1 == retries:
                raise DataError(f"cannot get a reply from {url} ({getattr(e, 'reason', e)}) after "
                                f"{retries} tries; is the endpoint up and --api-base right?") from None
        time.sleep(2 ** attempt)
    try:
        return reply["choices"][0]["message"]["content"].strip()
    except (KeyError, IndexError, TypeError, AttributeError):
        raise DataError(f"{url} sent a malformed reply (expected a chat completion): {str(reply)[:120]}") from None


def json_in(content, source):
    """The JSON object of a reply, tolerating a fenced code block around it (as LLMs write)."""
    if content.startswith("```"):
        content = content.strip("`").removeprefix("json").strip()
    try:
        return json.loads(content)
    except ValueError:
        raise DataError(f"{source} sent a malformed reply (expected a JSON object of prompt lists): "
                        f"{content[:120]}") from None


def validated_prompts(table, classnames, source):
    """Every class present with a non-empty list of non-empty strings, else one clear line."""
    if not isinstance(table, dict):
        raise DataError(f"{source}: expected a JSON object {{class name: [prompts]}}, got {type(table).__name__}")
    missing = [c for c in classnames if c not in table]
    if missing:  # a file written for other class names (e.g. CuPL's, for another spelling): both sides named
        unmatched = [k for k in table if k not in set(classnames)]
        extra = f"; keys that name no class: {', '.join(map(repr, unmatched[:3]))}" if unmatched else ""
        raise DataError(f"{source}: no prompts for {len(missing)} of the {len(classnames)} classes, first "
                        f"{', '.join(map(repr, missing[:3]))}{extra}; the keys must be the class names exactly as "
                        f"this dataset spells them")
    bad = [c for c in classnames if not isinstance(table[c], list) or not table[c]
           or not all(isinstance(p, str) and p.strip() for p in table[c])]
    if bad:
        raise DataError(f"{source}: {len(bad)} class{'' if len(bad) == 1 else 'es'} ({', '.join(map(repr, bad[:3]))}"
                        f"{', ...' if len(bad) > 3 else ''}) need a non-empty list of non-empty strings")
    return {c: [p.strip() for p in table[c]] for c in classnames}


def ask_class_prompts(classnames, api_base, model, api_key=None, n=10, chunk=25, **chat_options):
    """n short visual descriptions per class, `chunk` classes per request: {class name: [prompts]},
    validated."""
    table = {}
    for start in range(0, len(classnames), chunk):
        names = classnames[start:start + chunk]
        ask = (f"For each of these image classes, write {n} short, varied sentences describing what a photo of it "
               f"looks like, each naming the class. Answer with only a JSON object mapping each class name, "
               f"exactly as given, to a list of {n} strings. Classes: {json.dumps(names)}")
        source = f"the reply from {api_base.rstrip('/')}/chat/completions"
        reply = chat([{"role": "user", "content": ask}], api_base, model, api_key, **chat_options)
        table.update(validated_prompts(json_in(reply, source), names, source))
    return table


def write_class_prompts(path, classnames, api_base, model, api_key=None, n=10):
    """Generate, validate, then write atomically: a bad reply never leaves a partial file. An
    existing file is refused before the (paid) request: it may be prompts a run was made with,
    or a file of the person's own (their --classes)."""
    path = Path(path)
    if path.exists():
        raise DataError(f"--write-llm-prompts {path} exists: give a new file name (or move the old one away "
                        f"yourself), so that no prompts file is overwritten")
    table = ask_class_prompts(classnames, api_base, model, api_key, n)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1, ensure_ascii=False))
    os.replace(tmp, path)  # a kill mid-write leaves no partial file
    return path


def read_class_prompts(path, classnames):
    """A JSON file {class name: [prompt, ...]} -> per-class prompt lists in class order."""
    try:
        table = json.loads(Path(path).read_text(), object_pairs_hook=json_object)
    except DuplicateKey as e:
        raise DataError(f"the prompt file {path} names the class {e.args[0]!r} twice (JSON would keep only its last "
                        f"prompts): merge its prompts into one list") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the prompt file {path} ({e}); write it with --write-llm-prompts") from None
    return [validated_prompts(table, classnames, str(path))[c] for c in classnames]


def image_url(source, exif_orientation=True):
    """An image (path or uint8 tensor [3, H, W]) as a PNG data URL, the form chat endpoints take;
    a file as imagefiles.decode_image shows it (turned by its EXIF orientation where `exif_orientation`)."""
    image = load_image(source, exif_orientation=exif_orientation)
    if torch.is_tensor(image):
        image = to_pil_image(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def caption_image(source, api_base, model, api_key=None, hint=None, exif_orientation=True, **chat_options):
    """One short caption of an image from an image-capable chat model (the image sent inline);
    `hint` (e.g. the class name of a labelled pool image) is offered as context. The reply must
    be one non-empty line, else DataError."""
    ask = "Describe this image in one short sentence, as a caption." + \
        (f" It shows a {hint}; name it in the caption." if hint else "")
    url = image_url(source, exif_orientation)  # a file as training reads it (`exif_orientation`: the task's)
    content = [{"type": "text", "text": ask}, {"type": "image_url", "image_url": {"url": url}}]
    reply = chat([{"role": "user", "content": content}], api_base, model, api_key, **chat_options)
    caption = " ".join(reply.strip().strip('"').split())
    if not caption:
        what = source if isinstance(source, str) else "an in-memory image"
        raise DataError(f"{api_base.rstrip('/')}/chat/completions sent an empty caption for {what}")
    return caption
