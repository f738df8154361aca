"""
A person in the loop, in a browser: the page a person labels images on, served by this machine.

    python page.py label runs/mine-vecaf                      # label what a waiting VeCAF run asks for
    python page.py review runs/mine --labels checked.csv      # review CoFT's pseudo-labels

The page (assets/page.html: one HTML, CSS and JS file, nothing fetched from elsewhere) shows the
images asked for one at a time, large, with the model's suggestion first (one click or one key
gives a class), or CoFT's labels as tiles, a view and a screen at a time (read from review.pt, the
index the run writes, so a pool of 1.28 M images opens as fast as one of 300). Each answer is
written at once, atomically, into the labels file (the one labels format, path,class), so a
closed tab or a crash loses nothing. The server is Python's standard library. What it guards:
  - it listens on 127.0.0.1 unless --host says otherwise;
  - every request carries the page's random token, and one without it gets nothing;
  - images are addressed by their index in the list asked for, never by a path from the request,
    and a review never shows a file changed since the run (its digest, kept in review.pt);
  - only the listed images and the known classes are accepted;
  - it writes only the labels file it was given, changing only the class cell of the image
    answered (every other row, column and cell stays as it was), under one lock, so two tabs
    answering at once cannot lose a write.
"""
import csv
import hashlib
import io
import itertools
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

import torch

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


def given(path):
    """[(key, class)] of every row of the labels file at `path` that gives a class."""
    _, rows, at_path, at_class = read_rows(path)
    pairs = ((data.csv_untext(row[at_path]), data.csv_untext(row[at_class]).strip())
             for row in rows if len(row) > max(at_path, at_class))
    return [(key, name) for key, name in pairs if name]


def answers(path, keys):
    """{key: class} of the images `keys` that the labels file at `path` gives a class."""
    wanted = set(keys)
    return {key: name for key, name in given(path) if key in wanted}


# -----------------------------------------------------------------------------
# What a page lists: a short list in memory (the images a VeCAF loop asks for), or a CoFT run's
# every pool image, read a screen at a time from the index the run wrote (review.pt)


class Listed:
    """Items in memory, in their order; no views."""

    views = {}

    def __init__(self, items):
        self.items = list(items)
        self.at = {it.key: i for i, it in enumerate(self.items)}

    def __len__(self):
        return len(self.items)

    def item(self, i, view=None):
        return self.items[i]

    def order(self, view, offset, limit):
        return list(range(offset, min(offset + limit, len(self.items))))

    def find_all(self, keys):
        return [self.at.get(key) for key in keys]

    def digest(self, i):
        return None


REVIEW = "review.pt"  # the index of a CoFT run's pseudo-labels the review page reads (write_review)
GROUPS = ("kept", "removed")


def key_hash(encoded):
    """A key's 64-bit hash (blake2b: the same in every process, unlike Python's hash of a str)."""
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little", signed=True)


def write_review(out, keys, classnames, labels, kept, margin, digests):
    """review.pt in the run folder `out`: CoFT's pseudo-labels as the review page reads them, a
    screen at a time, without reading every row (a pool of 1.28 M images opens as fast as one of
    300: bench.py --sections page). `keys` name the N pool images as a labels file does; labels
    [2, N] each branch's class index, kept [2, N] whether the peer's filter kept it, margin [2, N]
    the peer's margin s+ - s- at that label (Sec. 3.2), digests [N, 16] each file's content
    (imagefiles.contents), so that the page never shows a changed file under the run's label.
    Held as tensors only: the page opens it memory-mapped and reads what a screen needs."""
    encoded = [key.encode("utf-8", "surrogateescape") for key in keys]
    hashes = torch.tensor([key_hash(e) for e in encoded], dtype=torch.int64)
    hashes, by_hash = hashes.sort(stable=True)
    kept, C = kept.bool(), len(classnames)
    group = (~kept).long()  # 0: kept, 1: removed
    order = []
    for b in range(2):  # a view is one branch's (class, group), the most doubtful (smallest |margin|) first
        o = margin[b].abs().argsort(stable=True)
        o = o[group[b][o].argsort(stable=True)]
        order.append(o[labels[b][o].argsort(stable=True)])
    counts = torch.stack([torch.bincount(labels[b].long() * 2 + group[b], minlength=2 * C) for b in range(2)])
    blob = bytearray(b"".join(encoded)) or bytearray(1)  # every key's bytes (frombuffer refuses an empty buffer)
    runs.atomic_save({"classnames": list(classnames),
                      "keys": torch.frombuffer(blob, dtype=torch.uint8),
                      "ends": torch.tensor(list(itertools.accumulate(map(len, encoded))), dtype=torch.int64),
                      "hashes": hashes, "by_hash": by_hash.int(),
                      "labels": labels.int(), "kept": kept, "margin": margin.float(),
                      "order": torch.stack(order).int(), "counts": counts.view(2, C, 2),  # [2, C, 2]
                      "digests": digests}, Path(out) / REVIEW)


class Review:
    """CoFT's pseudo-labels in the run folder `out` for a person to review, from review.pt. Item i
    is pool image i, its suggestion the label a branch gave it and its score that branch's peer
    margin. A view is "b<branch>:<class>:kept" or ":removed": the images branch b's model labelled
    so, kept in or removed from that branch's clean set by the peer, the most doubtful first (the
    peer's margin nearest to 0); in a view, an item's suggestion and score are that branch's."""

    def __init__(self, out):
        out = Path(out)
        how = runs.read_config(out)["how"]
        if not how.get("images"):
            raise runs.RunError(f"{out} was not run on your own images (--images): its images have no files to show")
        path = out / REVIEW
        if not path.is_file():
            made = (out / "pseudo_labels.csv").is_file()
            raise runs.RunError(f"{out} holds no {REVIEW}, the index of its pseudo-labels the page reads: "
                                + ("the run was made before the page existed; run its command again with --restart"
                                   if made else "run CoFT (--method coft) there first"))
        t = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        self.root, self.classnames = how["images"], t["classnames"]
        self.keys, self.ends, self.hashes, self.by_hash = t["keys"], t["ends"], t["hashes"], t["by_hash"]
        self.labels, self.margin, self.ranked, self.digests = t["labels"], t["margin"], t["order"], t["digests"]
        self.views, self.where = {}, {}  # {name: count}, {name: (branch, start in its order)}
        for b, per_class in enumerate(t["counts"].tolist()):
            start = 0
            for name, per_group in zip(self.classnames, per_class):
                for group, n in zip(GROUPS, per_group):
                    if n:
                        view = f"b{b + 1}:{name}:{group}"
                        self.views[view], self.where[view] = n, (b, start)
                    start += n

    def __len__(self):
        return len(self.ends)

    def key(self, i):
        start, end = (int(self.ends[i - 1]) if i else 0), int(self.ends[i])
        return bytes(self.keys[start:end].numpy()).decode("utf-8", "surrogateescape")

    def item(self, i, view=None):
        b = self.where[view][0] if view else 0
        key = self.key(i)
        return Item(key, os.path.join(self.root, key), self.classnames[int(self.labels[b, i])],
                    float(self.margin[b, i]))

    def order(self, view, offset, limit):
        if view is None:
            return list(range(offset, min(offset + limit, len(self))))
        b, start = self.where[view]
        end = start + self.views[view]
        return self.ranked[b, min(start + offset, end):min(start + offset + limit, end)].tolist()

    def find_all(self, keys):
        """Each key's item index, or None: its hash found by one sorted search, then the key itself
        compared (two keys may share a hash)."""
        encoded = [key.encode("utf-8", "surrogateescape") for key in keys]
        wanted = torch.tensor([key_hash(e) for e in encoded], dtype=torch.int64)
        found = []
        for e, h, j in zip(encoded, wanted.tolist(), torch.searchsorted(self.hashes, wanted).tolist()):
            while j < len(self) and int(self.hashes[j]) == h and self.key(int(self.by_hash[j])).encode(
                    "utf-8", "surrogateescape") != e:
                j += 1
            found.append(int(self.by_hash[j]) if j < len(self) and int(self.hashes[j]) == h else None)
        return found

    def digest(self, i):
        return bytes(self.digests[i].numpy())


# -----------------------------------------------------------------------------
# A labelling session: the images asked for, the classes, the labels file


class Session:
    """What the page shows and where its answers go: `items` (a list of Item, or a Review),
    `classnames`, the labels file. `done` is set when every item has a class (a run waiting on the
    page goes on then)."""

    def __init__(self, items, classnames, labels_path, title="", accuracy=()):
        self.items = items if isinstance(items, Review) else Listed(items)
        self.classnames, self.title = list(classnames), title
        self.accuracy = [list(a) for a in accuracy]  # [[loop, eval accuracy]] so far (VeCAF with a check set)
        self.labels_path = Path(labels_path)
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished = threading.Event()  # the person said they are done (the review's "done" button)
        # a file that is not a labels file is refused (read_rows) before the page opens
        pairs = given(self.labels_path)
        found = self.items.find_all([key for key, _ in pairs])
        self.labels = {key: name for (key, name), i in zip(pairs, found) if i is not None}  # the items' classes
        self._update_done()

    def _update_done(self):
        if len(self.labels) == len(self.items):
            self.done.set()

    def state(self):
        return {"title": self.title, "classes": self.classnames, **self.progress(), "views": self.items.views,
                "accuracy": self.accuracy}

    def page_of(self, offset, limit, view=None):
        """A screen of items (of one view, in its order): index, key, suggestion, score, the class
        given (None: none yet)."""
        shown = ((i, self.items.item(i, view)) for i in self.items.order(view, offset, limit))
        return [{"index": i, "key": it.key, "suggestion": it.suggestion, "score": it.score,
                 "label": self.labels.get(it.key)} for i, it in shown]

    def give(self, index, name):
        """The person's answer for item `index` ('' takes it back), written at once. Returns the
        progress (labelled, total): what the page's reply needs, not the whole state (a thousand
        classes are four thousand views)."""
        key = self.items.item(index).key
        with self.lock:
            answer(self.labels_path, key, name)
            if name:
                self.labels[key] = name
            else:
                self.labels.pop(key, None)
            self._update_done()
            return self.progress()

    def progress(self):
        return {"labelled": len(self.labels), "total": len(self.items)}


class Changed(Exception):
    """An image file whose content is not the one the run saw."""


@lru_cache(maxsize=4096)
def thumbnail(path, size, digest=None):
    """The image at `path` as a viewer shows it (imagefiles.decode_image: EXIF orientation, bit
    depth), fitted into size x size, as JPEG bytes; made on demand, the most recent kept in
    memory. With `digest` (imagefiles.contents' of the file the run saw), a file whose bytes no
    longer have it is Changed: the page never shows another image under the run's label."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        raw = None  # decode_image says why, in the words the project uses for each case
    if raw is not None and digest is not None and imagefiles.bytes_digest(raw) != digest:
        raise Changed(f"{path} changed since the run: it is not the image the run labelled")
    image = imagefiles.decode_image(io.BytesIO(raw), name=path) if raw is not None else imagefiles.decode_image(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# The server


class InFlight:
    """The requests being answered: the server, shutting down, waits until none is (the last
    answer's reply reaches its tab before the command serving the page goes on or ends)."""

    def __init__(self):
        self.count, self.changed = 0, threading.Condition()

    def __enter__(self):
        with self.changed:
            self.count += 1

    def __exit__(self, *exc):
        with self.changed:
            self.count -= 1
            self.changed.notify_all()

    def wait_idle(self):
        with self.changed:
            self.changed.wait_for(lambda: self.count == 0)


def handler_for(session, in_flight):
    """The request handler of one session: the token checked on every request before anything."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # the console is the run's
            pass

        def do_GET(self):
            with in_flight:
                self.get()

        def do_POST(self):
            with in_flight:
                self.post()

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

        def get(self):
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
                if view is not None and view not in session.items.views:
                    return self.refuse(HTTPStatus.NOT_FOUND, "no such view")
                return self.json({"items": session.page_of(max(offset, 0), max(limit, 0), view)})
            if route == "/image":
                i = self.index(query)
                size = int(query.get("size", SIZES[1])) if query.get("size", "").isdigit() else SIZES[1]
                if i is None:
                    return self.refuse(HTTPStatus.NOT_FOUND, "no such image")
                try:
                    body = thumbnail(session.items.item(i).path, min(size, 2048), session.items.digest(i))
                except Changed as e:
                    return self.refuse(HTTPStatus.CONFLICT, str(e))
                except imagefiles.DataError as e:
                    return self.refuse(HTTPStatus.UNPROCESSABLE_ENTITY, str(e))
                return self.reply(HTTPStatus.OK, body, "image/jpeg")
            return self.refuse(HTTPStatus.NOT_FOUND)

        def post(self):
            route, query = self.parsed()
            if route is None:
                return self.refuse(HTTPStatus.FORBIDDEN)
            if route == "/finish":
                session.finished.set()
                return self.json(session.progress())
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
        self.session, self.in_flight = session, InFlight()
        self.httpd = ThreadingHTTPServer((host, port), handler_for(session, self.in_flight))
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
        self.httpd.shutdown()  # no new connection is taken
        self.in_flight.wait_idle()
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
        review = Review(args.out)
        session = Session(review, review.classnames, args.labels, title=f"review CoFT's labels of {args.out}")
        with Server(session, args.host, args.port) as server:
            print(f"open {server.url} to review the labels of {runs.counted(len(review), 'image')}, class by class; "
                  f"your answers go to {args.labels} at once; the page's done button ends this (Ctrl-C too: nothing "
                  f"is lost)", flush=True)
            session.finished.wait()
        print(f"review done: {args.labels} gives {runs.counted(len(session.labels), 'image')} a class; give it to a "
              f"new run as --labels", flush=True)
    return runs.run_cli(body, "", errors=data.USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
