"""
A person in the loop, in a browser: the page a person labels images on, served by this machine.

    python page.py label runs/mine-vecaf                      # label what a waiting VeCAF run asks for
    python page.py review runs/mine --labels checked.csv      # review CoFT's pseudo-labels

The page (assets/page.html: one HTML, CSS and JS file, nothing fetched from elsewhere) shows the
images one at a time, large, with the model's suggestion first: one click or one key gives a
class, and each answer is written at once, atomically, into the labels file (the one labels
format, path,class), so a closed tab or a crash loses nothing. The server is Python's standard
library. What it guards:
  - it listens on 127.0.0.1 unless --host says otherwise;
  - every request carries the page's random token, and one without it gets nothing;
  - images are addressed by their index in the list asked for, never by a path from the request;
  - only the listed images and the known classes are accepted;
  - it writes only the labels file it was given, changing only the class cell of the image
    answered (every other row, column and cell stays as it was), under one lock, so two tabs
    answering at once cannot lose a write.
"""
import csv
import io
import json
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import data
import imagefiles
import runs

PAGE = Path(__file__).resolve().parent / "assets" / "page.html"
SIZES = (160, 640)  # the thumbnail a list shows, the image a person judges


@dataclass(frozen=True)
class Item:
    """One image on the page: its name as a labels file gives it, its file, and the model's view
    (its suggested class, and a score: VeCAF's margin of the model, CoFT's peer margin)."""
    key: str
    path: str
    suggestion: str | None = None
    score: float | None = None


# -----------------------------------------------------------------------------
# The labels file: one row per image, path,class; every answer changes one cell


def read_rows(path):
    """The labels file as (header, rows, the path column, the class column); a file that is not
    there yet: the labels format's header and no rows."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f))
    except FileNotFoundError:
        table = []
    if not table:
        return ["path", "class"], [], 0, 1
    header = [h.strip().lower() for h in table[0]]
    if "path" not in header or "class" not in header:
        raise runs.RunError(f"{path} has no path and class columns (its header: {','.join(table[0])}): give a labels "
                            f"file (a CSV path,class) or a new file's name")
    return table[0], table[1:], header.index("path"), header.index("class")


def answer(path, key, name):
    """Set the class of image `key` in the labels file at `path` to `name` ('' takes the answer
    back): that row's class cell changes, or a row path,class is added; every other row stays as
    it is. Written to a temporary file and renamed."""
    header, rows, at_path, at_class = read_rows(path)
    width = len(header)
    for row in rows:
        if len(row) > at_path and data.csv_untext(row[at_path]) == key:
            row.extend([""] * (width - len(row)))
            row[at_class] = data.csv_text(name)
            break
    else:
        row = [""] * width
        row[at_path], row[at_class] = data.csv_text(key), data.csv_text(name)
        rows.append(row)
    runs.write_csv(header, rows, path)


def answers(path, keys):
    """{key: class} of the images `keys` that the labels file at `path` gives a class."""
    _, rows, at_path, at_class = read_rows(path)
    wanted, found = set(keys), {}
    for row in rows:
        if len(row) > max(at_path, at_class):
            key, name = data.csv_untext(row[at_path]), data.csv_untext(row[at_class]).strip()
            if key in wanted and name:
                found[key] = name
    return found


# -----------------------------------------------------------------------------
# A labelling session: the images asked for, the classes, the labels file


class Session:
    """What the page shows and where its answers go. `done` is set when every image asked for
    has a class (a run waiting on the page goes on then)."""

    def __init__(self, items, classnames, labels_path, title="", views=None, accuracy=()):
        self.items, self.classnames, self.title = list(items), list(classnames), title
        self.accuracy = [list(a) for a in accuracy]  # [[loop, eval accuracy]] so far (VeCAF with a check set)
        self.views = views or {}  # review: {name: item indices, the most doubtful first}
        self.labels_path = Path(labels_path)
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.done = threading.Event()
        # a file that is not a labels file is refused (read_rows) before the page opens
        self.labels = answers(self.labels_path, [it.key for it in self.items])
        self._update_done()

    def _update_done(self):
        if all(it.key in self.labels for it in self.items):
            self.done.set()

    def state(self):
        return {"title": self.title, "classes": self.classnames, "total": len(self.items),
                "labelled": len(self.labels), "views": {name: len(idx) for name, idx in self.views.items()},
                "accuracy": self.accuracy}

    def page_of(self, offset, limit, view=None):
        """A screen of items (of one view, in its order): index, suggestion, score, the class given
        (None: none yet)."""
        order = self.views[view][offset:offset + limit] if view else range(offset, min(offset + limit, len(self.items)))
        return [{"index": i, "key": self.items[i].key, "suggestion": self.items[i].suggestion,
                 "score": self.items[i].score, "label": self.labels.get(self.items[i].key)} for i in order]

    def give(self, index, name):
        """The person's answer for item `index` ('' takes it back), written at once."""
        key = self.items[index].key
        with self.lock:
            answer(self.labels_path, key, name)
            if name:
                self.labels[key] = name
            else:
                self.labels.pop(key, None)
            self._update_done()
        return self.state()


@lru_cache(maxsize=4096)
def thumbnail(path, size):
    """The image at `path` as a viewer shows it (imagefiles.load_image: EXIF orientation, bit depth),
    fitted into size x size, as JPEG bytes; made on demand, the most recent kept in memory."""
    image = imagefiles.load_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# The server


def handler_for(session):
    """The request handler of one session: the token checked on every request before anything."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the console is the run's
            pass

        def reply(self, status, body=b"", kind="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def json(self, obj):
            self.reply(HTTPStatus.OK, json.dumps(obj).encode())

        def refuse(self, status, why=""):
            self.reply(status, json.dumps({"error": why}).encode() if why else b"")

        def parsed(self):
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if not secrets.compare_digest(query.get("token", ""), session.token):
                return None, None
            return url.path, query

        def index(self, query, name="index"):
            try:
                i = int(query[name])
            except (KeyError, ValueError):
                return None
            return i if 0 <= i < len(session.items) else None

        def do_GET(self):
            route, query = self.parsed()
            if route is None:
                return self.refuse(HTTPStatus.FORBIDDEN)
            if route == "/":
                return self.reply(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            if route == "/state":
                return self.json(session.state())
            if route == "/items":
                try:
                    offset, limit = int(query.get("offset", 0)), min(int(query.get("limit", 50)), 500)
                except ValueError:
                    return self.refuse(HTTPStatus.BAD_REQUEST, "offset and limit are numbers")
                view = query.get("view") or None
                if view is not None and view not in session.views:
                    return self.refuse(HTTPStatus.NOT_FOUND, "no such view")
                return self.json({"items": session.page_of(max(offset, 0), max(limit, 0), view)})
            if route == "/image":
                i = self.index(query)
                size = int(query.get("size", SIZES[1])) if query.get("size", "").isdigit() else SIZES[1]
                if i is None:
                    return self.refuse(HTTPStatus.NOT_FOUND, "no such image")
                try:
                    body = thumbnail(session.items[i].path, min(size, 2048))
                except imagefiles.DataError as e:
                    return self.refuse(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))
                return self.reply(HTTPStatus.OK, body, "image/jpeg")
            return self.refuse(HTTPStatus.NOT_FOUND)

        def do_POST(self):
            route, query = self.parsed()
            if route is None:
                return self.refuse(HTTPStatus.FORBIDDEN)
            if route != "/answer":
                return self.refuse(HTTPStatus.NOT_FOUND)
            try:
                body = json.loads(self.rfile.read(min(int(self.headers.get("Content-Length", 0)), 65536)))
                i, name = self.index(body), body["class"]
            except (ValueError, KeyError, TypeError):
                return self.refuse(HTTPStatus.BAD_REQUEST, "send {index, class}")
            if i is None:
                return self.refuse(HTTPStatus.NOT_FOUND, "no such image")
            if name != "" and name not in session.classnames:
                return self.refuse(HTTPStatus.BAD_REQUEST, "not a class of this task")
            return self.json(session.give(i, name))

    return Handler


class Server:
    """The page of `session` served at http://host:port/?token=... in a thread of its own."""

    def __init__(self, session, host="127.0.0.1", port=0):
        self.session = session
        self.httpd = ThreadingHTTPServer((host, port), handler_for(session))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/?token={self.session.token}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# -----------------------------------------------------------------------------
# What a waiting run asks for


def asked(out):
    """The images a waiting VeCAF run in `out` asks a person to label: (items, class names, the
    labels file its command reads, the loop, the accuracy after each loop so far), from its
    config.json, its person record and its list to_label_loop<N>.csv."""
    out = Path(out)
    how = runs.read_config(out)["how"]
    record = runs.person_record(out)
    loop = record["waiting"]
    if not loop:
        raise runs.RunError(f"{out} does not wait for labels (it holds no VeCAF run stopped for a person)")
    if not how.get("images") or not how.get("labels"):
        raise runs.RunError(f"{out} was not run on your own images with --labels: there is nothing to label here")
    listed = out / f"to_label_loop{loop}.csv"
    with open(listed, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    root = how["images"]
    items = []
    for row in rows:
        key = data.csv_untext(row["path"])
        score = row.get("score")
        items.append(Item(key, os.path.join(root, key), data.csv_untext(row.get("suggestion") or "") or None,
                          float(score) if score else None))
    classnames, _ = data.read_classes(how["classes"])
    return items, classnames, how["labels"], loop, record["accuracy"]


def reviewed(out):
    """CoFT's pseudo-labels in the run folder `out` for a person to review: (items, class names,
    views). Every pool image is an item, its suggestion the label the run gave it; a view is
    "b<branch>:<class>:kept" or ":removed", the images branch b's model labelled so, kept in or
    removed from that branch's clean set by the peer, the most doubtful first (the peer's margin
    s+ - s- nearest to 0)."""
    out = Path(out)
    how = runs.read_config(out)["how"]
    if not how.get("images"):
        raise runs.RunError(f"{out} was not run on your own images (--images): its images have no files to show")
    path = out / "pseudo_labels.csv"
    if not path.is_file():
        raise runs.RunError(f"{out} holds no pseudo_labels.csv: run CoFT (--method coft) there first")
    classnames, _ = data.read_classes(how["classes"])
    known = set(classnames)
    items, views = [], {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.DictReader(f)):
            key = data.csv_untext(row["path"])
            items.append(Item(key, os.path.join(how["images"], key), data.csv_untext(row["branch1_class"]),
                              float(row["branch1_peer_margin"])))
            for b in (1, 2):
                name = data.csv_untext(row[f"branch{b}_class"])
                if name in known:
                    group = "kept" if row[f"branch{b}_kept"] == "1" else "removed"
                    views.setdefault(f"b{b}:{name}:{group}", []).append((abs(float(row[f"branch{b}_peer_margin"])), i))
    return items, classnames, {name: [i for _, i in sorted(pairs)] for name, pairs in views.items()}


def label_until_done(out, host="127.0.0.1", port=0):
    """Serve the page for what the waiting run in `out` asks for, and return once every image asked
    for is labelled in its labels file: True, or False where the file labels them all already
    (nothing to ask)."""
    items, classnames, labels, loop, accuracy = asked(out)
    session = Session(items, classnames, labels, title=f"loop {loop}: label {runs.counted(len(items), 'image')}",
                      accuracy=accuracy)
    if session.done.is_set():
        return False
    with Server(session, host, port) as server:
        print(f"open {server.url} to label loop {loop}'s {runs.counted(len(items), 'image')} (each answer goes "
              f"to {labels} at once); this waits until every one is labelled (Ctrl-C stops it, and nothing is "
              f"lost)", flush=True)
        session.done.wait()
    print(f"every image of loop {loop} is labelled in {labels}", flush=True)
    return True


def main(argv=None):
    p = runs.Parser(description="label in a browser what a waiting VeCAF run asks for, or review CoFT's "
                                "pseudo-labels")
    p.add_argument("what", choices=["label", "review"])
    p.add_argument("out", help="the run folder (--out): a VeCAF run waiting for labels, or a CoFT run")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="review: the labels file your answers go to (a new file, or one of yours: only the class "
                        "cells of the images you answer change); give it to a new run as --labels")
    p.add_argument("--host", default="127.0.0.1", help="where the page listens (another host: the page is reachable "
                                                       "from other machines, with its token)")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    args = p.parse_args(argv)

    def body():
        if args.what == "label":
            label_until_done(args.out, args.host, args.port)
            print("run the same command again to go on", flush=True)
            return
        if not args.labels:
            raise runs.RunError("review needs the labels file your answers go to: --labels FILE")
        items, classnames, views = reviewed(args.out)
        session = Session(items, classnames, args.labels, title=f"review CoFT's labels of {args.out}", views=views)
        with Server(session, args.host, args.port) as server:
            print(f"open {server.url} to review the labels of {runs.counted(len(items), 'image')}, class by class; "
                  f"your answers go to {args.labels}; Ctrl-C ends it (nothing is lost)", flush=True)
            threading.Event().wait()
    return runs.run_cli(body, "", errors=data.USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
