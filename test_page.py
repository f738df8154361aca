"""Tests of page.py: the labelling page, its server and its labels file; driven over HTTP and in a
real browser (headless Chromium through Selenium, skipped only where neither can be started)."""
import csv
import os
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from PIL import Image

import page

CLASSES = ["cat", "dog", "bird"]


def make_items(tmp_path, n=5):
    """n generated images, each with the model's suggestion, as a waiting run lists them."""
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for i in range(n):
        name = f"img {i}.png" if i != 3 else "=cmd.png"  # a name a spreadsheet would read as a formula
        Image.new("RGB", (40 + i, 30), (40 * i, 100, 200 - 30 * i)).save(folder / name)
        items.append(page.Item(name, str(folder / name), CLASSES[i % 3], 0.1 * i))
    return items


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def request(url, body=None):
    """(status, body) of a GET, or of a POST of the JSON `body`."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def base(server):
    return server.url.split("/?")[0]


def test_requests_without_the_token_a_path_or_an_unknown_class_are_refused(tmp_path):
    """Every route refuses a request without the page's token, or with another, and says nothing;
    images are reached by index only (a path, or an index outside the list, finds nothing); an
    answer must name a listed image and a class of the task; a refused request writes nothing."""
    items = make_items(tmp_path)
    labels = tmp_path / "labels.csv"
    session = page.Session(items, CLASSES, labels)
    with page.Server(session) as server:
        root, token = base(server), session.token
        assert server.url.startswith("http://127.0.0.1:")  # this machine only, unless asked
        for route in ("/", "/state", "/items", "/image?index=0", "/answer"):
            sep = "&" if "?" in route else "?"
            for q in ("", f"{sep}token=wrong", f"{sep}token={token[:-1]}"):
                body = {"index": 0, "class": "cat"} if route == "/answer" else None
                assert request(root + route + q, body) == (403, b""), route + q
        assert request(f"{root}/image?index=0&token={token}")[0] == 200
        for bad in ("5", "-1", "../../etc/passwd", str(tmp_path / "images" / "img 0.png")):
            assert request(f"{root}/image?{urlencode({'index': bad, 'token': token})}")[0] == 404, bad
        assert request(f"{root}/../../etc/passwd?token={token}")[0] == 404
        assert request(f"{root}/answer?token={token}", {"index": 0, "class": "horse"})[0] == 400
        assert request(f"{root}/answer?token={token}", {"index": 9, "class": "cat"})[0] == 404
        assert request(f"{root}/answer?token={token}", {"path": str(tmp_path / "x.png"), "class": "cat"})[0] == 404
        assert not labels.exists()
        status, body = request(f"{root}/answer?token={token}", {"index": 3, "class": "dog"})
        assert status == 200 and json.loads(body)["labelled"] == 1
    assert rows(labels) == [["path", "class"], ["'=cmd.png", "dog"]]  # the formula guard, read back as the name
    assert page.answers(labels, ["=cmd.png"]) == {"=cmd.png": "dog"}


def test_an_answer_changes_one_cell_and_keeps_every_other_row_and_column(tmp_path):
    """A labels file a person wrote (other images, a column of their own, the very list the run
    wrote, filled in half): an answer sets that image's class cell, or adds a row; taking it back
    empties the cell; nothing else changes."""
    items = make_items(tmp_path)
    labels = tmp_path / "mine.csv"
    labels.write_text("path,class,note\nother.png,cat,seen twice\nimg 1.png,,\nimg 2.png,bird,sure\n", encoding="utf-8")
    session = page.Session(items, CLASSES, labels)
    assert session.state()["labelled"] == 1  # img 2.png is labelled already
    session.give(1, "dog")
    session.give(0, "cat")
    assert rows(labels) == [["path", "class", "note"], ["other.png", "cat", "seen twice"], ["img 1.png", "dog", ""],
                            ["img 2.png", "bird", "sure"], ["img 0.png", "cat", ""]]
    session.give(1, "")  # undo
    assert rows(labels)[2] == ["img 1.png", "", ""] and session.state()["labelled"] == 2
    assert not session.done.is_set()
    for i in (1, 3, 4):
        session.give(i, "bird")
    assert session.done.is_set() and session.state() == {"title": "", "classes": CLASSES, "total": 5, "labelled": 5,
                                                         "views": {}, "accuracy": []}


def test_a_file_that_is_not_a_labels_file_is_refused_before_the_page_opens(tmp_path):
    bad = tmp_path / "notes.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(page.runs.RunError, match="no path and class columns"):
        page.Session(make_items(tmp_path), CLASSES, bad)
    assert bad.read_text() == "a,b\n1,2\n"


# --------------------------------------------------------------------------- in a browser


def wait_for(driver, condition):
    """Until the page shows what `condition(driver)` looks for (Selenium's wait; a page that never
    does fails the test when the wait gives up)."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, 20).until(condition)


def screenshot(driver, name):
    """With PAGE_SCREENSHOTS=DIR, the page as the test browser shows it, saved as DIR/name (how the
    screenshots in docs/ are taken: PAGE_SCREENSHOTS=docs python -m pytest test_page.py)."""
    folder = os.environ.get("PAGE_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / name))


def progress_is(text):
    from selenium.webdriver.common.by import By
    return lambda d: d.find_element(By.ID, "progress").text == text and d


def test_a_person_labels_by_clicks_and_keys_with_a_reload_and_an_undo(tmp_path, browser):
    """In the browser: the suggestion is the first button; a click, the Enter key, a digit key
    each give a class; a reload in the middle keeps every answer (each was written at once) and
    goes on at the next image without one; undo takes the last answer back; when every image is
    labelled the page says so, and the session's `done` is set. The labels file holds exactly
    the answers given."""
    from selenium.webdriver.common.by import By
    items = make_items(tmp_path)
    labels = tmp_path / "labels.csv"
    session = page.Session(items, CLASSES, labels, title="loop 1: label 5 images")
    with page.Server(session) as server:
        browser.get(server.url)
        wait_for(browser, progress_is("0 / 5"))
        buttons = browser.find_elements(By.CSS_SELECTOR, "#classes button")
        assert [b.get_attribute("data-class") for b in buttons] == ["cat", "dog", "bird"]  # item 0 suggests cat
        assert "suggested" in buttons[0].get_attribute("class")
        buttons[1].click()  # image 0: dog, by a click
        wait_for(browser, progress_is("1 / 5"))
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("\n")  # image 1: its suggestion (dog), by Enter
        wait_for(browser, progress_is("2 / 5"))
        browser.refresh()  # a reload: nothing is lost, and the page goes on at image 2
        wait_for(browser, progress_is("2 / 5"))
        assert "img 2.png" in browser.find_element(By.ID, "caption").text
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("3")  # image 2 suggests bird: [bird, cat, dog], key 3 = dog
        wait_for(browser, progress_is("3 / 5"))
        body.send_keys("u")  # undo: image 2 has no answer again, and is shown
        wait_for(browser, progress_is("2 / 5"))
        assert "img 2.png" in browser.find_element(By.ID, "caption").text
        body.send_keys("1")  # image 2: bird
        wait_for(browser, progress_is("3 / 5"))
        body.send_keys("2")  # image 3 (=cmd.png) suggests cat: [cat, dog, bird], key 2 = dog
        wait_for(browser, progress_is("4 / 5"))
        body.send_keys("\n")  # image 4 suggests dog
        wait_for(browser, progress_is("5 / 5"))
        assert browser.find_element(By.ID, "done").is_displayed()
        assert session.done.is_set()
        loaded = browser.execute_script("return document.getElementById('image').naturalWidth")
        assert loaded > 0  # the image itself came through
    given = {"img 0.png": "dog", "img 1.png": "dog", "img 2.png": "bird", "=cmd.png": "dog", "img 4.png": "dog"}
    assert page.answers(labels, [it.key for it in items]) == given
    assert len(rows(labels)) == 6  # a header and one row per image: the undo emptied a cell, added none


def test_vecafs_loop_in_one_command_through_the_page_trains_what_labels_given_up_front_train(tmp_path, browser):
    """python vecaf.py ... --labels FILE --browser: at each loop the run serves the page and waits;
    a person labels there (by clicks and by keys, with a reload in the middle), and the run goes on
    by itself. It makes the picks and weights of the same run with every label given up front,
    and the labels file holds exactly the answers given. From loop 2 on the page shows the
    check-set accuracy after each loop so far."""
    import re
    import subprocess
    import sys

    import torch
    from selenium.webdriver.common.by import By

    import data
    import vecaf
    from conftest import vecaf_stage
    example = data.write_example(tmp_path / "example", size=60)
    truth = dict(list(csv.reader(open(example / "answers.csv", newline="")))[1:])
    common = ["--images", str(example / "images"), "--classes", str(example / "classes.txt"), "--check",
              str(example / "check"), "--template", "a photo of the number {}.", "--no-flip", "--clip", "demo",
              "--seed", "0", "--log-every", "0", "--budget", "4", "--loops", "2", "--epochs", "2", "--batch", "4",
              "--iters", "20", "--ensemble", "2", "--warmup-epochs", "1", "--lr", "0.01"]
    up_front = vecaf.main(common + ["--labels", str(example / "answers.csv"), "--out", str(tmp_path / "up-front")])
    labels = tmp_path / "labels.csv"
    run = subprocess.Popen([sys.executable, vecaf.__file__, *common, "--labels", str(labels), "--browser", "--out",
                            str(tmp_path / "page")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for loop in (1, 2):
            for line in run.stdout:  # the run says where its page is, then waits
                if "open http" in line:
                    break
            else:
                pytest.fail(f"the run ended without a page (exit {run.wait()})")
            browser.get(re.search(r"http://\S+", line).group())
            wait_for(browser, progress_is("0 / 4"))
            shown = browser.find_element(By.ID, "accuracy").text  # with a check set: the accuracy so far
            after = up_front["loops"][0]["acc"]
            assert shown == ("" if loop == 1 else f"check-set accuracy after loop 1: {after:.1f} %")
            for n in range(4):
                if loop == 1 and n == 2:
                    browser.refresh()
                    wait_for(browser, progress_is("2 / 4"))
                    wait_for(browser, lambda d: d.execute_script("return document.getElementById('image').complete"))
                    screenshot(browser, "page-label.png")
                key = browser.find_element(By.ID, "caption").get_attribute("data-key")
                buttons = browser.find_elements(By.CSS_SELECTOR, "#classes button")
                names = [b.get_attribute("data-class") for b in buttons]
                if n % 2:  # by its key
                    browser.find_element(By.TAG_NAME, "body").send_keys(str(names.index(truth[key]) + 1))
                else:  # by a click
                    browser.find_element(By.CSS_SELECTOR, f'#classes button[data-class="{truth[key]}"]').click()
                wait_for(browser, progress_is(f"{n + 1} / 4"))
        rest = run.stdout.read()
        assert run.wait() == 0, rest
    finally:
        run.kill()
    for tag in ("select1", "select2", "loop1", "loop2"):
        a, b = vecaf_stage(tmp_path / "up-front", tag), vecaf_stage(tmp_path / "page", tag)
        for k in ("new", "selected", "model"):
            if k in a:
                same = a[k].keys() == b[k].keys() and all(torch.equal(a[k][p], b[k][p]) for p in a[k]) \
                    if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                assert same, (tag, k)
    picked = vecaf_stage(tmp_path / "page", "loop2")["selected"].tolist()
    names = sorted(os.listdir(example / "images"))
    assert page.answers(labels, truth) == {names[i]: truth[names[i]] for i in picked}


def test_a_person_reviews_cofts_labels_class_by_class_and_the_next_run_reads_them(tmp_path, browser):
    """python page.py review OUT --labels FILE: the views are each branch's classes, kept or
    removed by the peer, the most doubtful first (the smallest |peer margin|); confirming a tile
    writes the run's label, correcting it writes the person's, undo takes the last back; the file
    is a labels file a new CoFT run takes as --labels."""
    import coft
    import data
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    example = data.write_example(tmp_path / "example", size=40)
    common = ["--images", str(example / "images"), "--classes", str(example / "classes.txt"), "--template",
              "a photo of the number {}.", "--no-flip", "--clip", "demo", "--seed", "0", "--log-every", "0", "--M", "4",
              "--K", "4", "--p1-epochs", "1", "--fft-epochs", "1", "--batch", "32"]
    coft.main(common + ["--out", str(tmp_path / "run")])
    items = page.Review(tmp_path / "run")
    classnames, views = items.classnames, items.views
    table = list(csv.DictReader(open(tmp_path / "run" / "pseudo_labels.csv", newline="")))
    assert [items.key(i) for i in range(len(items))] == [r["path"] for r in table]
    assert items.find_all([r["path"] for r in table] + ["not-in-the-pool.png"]) == list(range(len(table))) + [None]
    session = page.Session(items, classnames, tmp_path / "nothing-yet.csv")
    for name in views:  # each view: its branch's label and margin, its group, the most doubtful first
        b, label, group = name.split(":")
        shown = session.page_of(0, len(table), name)
        rows_ = [table[it["index"]] for it in shown]
        assert all(r[f"branch{b[1]}_class"] == label == it["suggestion"] and (r[f"branch{b[1]}_kept"] == "1") ==
                   (group == "kept") and float(r[f"branch{b[1]}_peer_margin"]) == pytest.approx(it["score"], rel=1e-5)
                   for r, it in zip(rows_, shown))
        margins = [abs(it["score"]) for it in shown]
        assert margins == sorted(margins) and len(shown) == views[name]
    assert sum(views.values()) == 2 * len(items)
    assert any(r["branch1_peer_margin"] != r["branch2_peer_margin"] for r in table)  # a branch-2 view: branch 2's
    labels = tmp_path / "checked.csv"
    session = page.Session(items, classnames, labels, title="review")
    with page.Server(session) as server:
        browser.get(server.url)
        wait_for(browser, progress_is(f"0 / {len(items)}"))
        first = Select(browser.find_element(By.ID, "views")).options[0].get_attribute("value")
        assert first == sorted(views)[0]
        tiles = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")
        shown = [items.item(i, first) for i in items.order(first, 0, views[first])]
        assert [t.get_attribute("data-key") for t in tiles] == [it.key for it in shown][:50]
        tiles[0].find_element(By.CSS_SELECTOR, "button.confirm").click()  # the run's label is right
        wait_for(browser, progress_is(f"1 / {len(items)}"))
        other = next(c for c in classnames if c != shown[-1].suggestion)
        tile = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")[len(shown) - 1]
        Select(tile.find_element(By.CSS_SELECTOR, "select.correct")).select_by_visible_text(other)  # corrected
        wait_for(browser, progress_is(f"2 / {len(items)}"))
        browser.find_element(By.ID, "review-undo").click()  # the correction taken back
        wait_for(browser, progress_is(f"1 / {len(items)}"))
        tile = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")[len(shown) - 1]
        Select(tile.find_element(By.CSS_SELECTOR, "select.correct")).select_by_visible_text(other)
        wait_for(browser, progress_is(f"2 / {len(items)}"))
        wait_for(browser, lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
        screenshot(browser, "page-review.png")
    given = page.answers(labels, [items.key(i) for i in range(len(items))])
    assert given == {shown[0].key: shown[0].suggestion, shown[-1].key: other}
    again = coft.main(common + ["--labels", str(labels), "--out", str(tmp_path / "checked")])
    assert again["labels"]["size"] == 2


def hand_made_review(tmp_path):
    """A run folder holding review.pt of five generated images whose two branches disagree: (the
    folder, its images' folder, keys, labels [2, N], kept [2, N], margins [2, N])."""
    import torch
    import imagefiles
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    keys = ["a.png", "sub/ü.png", "=b.png", "sub/c d.png", "e.png"]
    for i, key in enumerate(keys):
        Image.new("RGB", (30, 20 + i), (50 * i, 80, 90)).save(folder / key)
    labels = torch.tensor([[0, 1, 0, 0, 2], [1, 1, 2, 0, 0]])  # branch 1's and branch 2's class of each image
    kept = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    margin = torch.tensor([[0.5, 0.2, -0.1, -0.3, 0.4], [-0.2, 0.6, 0.1, 0.05, -0.7]])
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": {}, "how": {"images": str(folder)}}))
    digests, _ = imagefiles.contents([str(folder / key) for key in keys])
    page.write_review(out, keys, CLASSES, labels, kept, margin, digests)
    return out, folder, keys, labels, kept, margin


def test_the_review_index_gives_each_view_its_branchs_labels_the_most_doubtful_first(tmp_path, monkeypatch):
    """review.pt read a screen at a time, against hand-made labels whose branches disagree: a view
    b<branch>:<class>:<kept|removed> lists exactly the images that branch labelled so, by |margin|,
    each with that branch's label and margin (confirming in a branch-2 view gives branch 2's
    label); every key is found, by its hash and then itself, even where every hash collides."""
    out, folder, keys, labels, kept, margin = hand_made_review(tmp_path)
    review = page.Review(out)
    assert len(review) == 5 and [review.key(i) for i in range(5)] == keys and review.classnames == CLASSES
    expected = {}
    for b in range(2):
        for i in sorted(range(5), key=lambda i: abs(float(margin[b, i]))):
            group = "kept" if kept[b, i] else "removed"
            expected.setdefault(f"b{b + 1}:{CLASSES[labels[b, i]]}:{group}", []).append(i)
    assert review.views == {name: len(idx) for name, idx in expected.items()}
    session = page.Session(review, CLASSES, tmp_path / "checked.csv")
    for name, idx in expected.items():
        b = int(name[1]) - 1
        shown = session.page_of(0, 50, name)
        assert [it["index"] for it in shown] == idx
        assert [(it["suggestion"], it["score"]) for it in shown] == \
            [(CLASSES[labels[b, i]], pytest.approx(float(margin[b, i]))) for i in idx]
    assert [it["index"] for it in session.page_of(1, 1, "b1:cat:kept")] == [0]  # a screen: offset, limit
    assert review.find_all(keys[::-1] + ["f.png", "A.png"]) == [4, 3, 2, 1, 0, None, None]
    monkeypatch.setattr(page, "key_hash", lambda encoded: 7)  # every key the same hash: the keys decide
    page.write_review(out, keys, CLASSES, labels, kept, margin, page.Review(out).digests)
    assert page.Review(out).find_all(keys[::-1] + ["f.png"]) == [4, 3, 2, 1, 0, None]


def test_opening_the_review_reads_a_screen_not_the_pool(tmp_path, monkeypatch):
    """page.py review on a pool of 20,000 images decodes the names of the first screen and of the
    labels file's rows, never every pool image's (what made a pool of 1.28 M slow to open: bench.py
    --sections page measures it)."""
    import torch
    N, C = 20000, 100
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"config": {}, "how": {"images": str(tmp_path)}}))
    keys = [f"c{i % C}/{i}.jpg" for i in range(N)]
    g = torch.Generator().manual_seed(0)
    page.write_review(out, keys, [f"class {c}" for c in range(C)], torch.randint(0, C, (2, N), generator=g),
                      torch.rand(2, N, generator=g) < 0.5, torch.randn(2, N, generator=g),
                      torch.zeros(N, 16, dtype=torch.uint8))
    labels = tmp_path / "checked.csv"
    labels.write_text("path,class\nc3/103.jpg,class 3\nnot/in-the-pool.jpg,class 1\n")
    decoded, key = [], page.Review.key
    monkeypatch.setattr(page.Review, "key", lambda self, i: decoded.append(i) or key(self, i))
    review = page.Review(out)
    session = page.Session(review, review.classnames, labels)
    state = session.state()
    screen = session.page_of(0, 50, min(state["views"]))
    assert state["total"] == N and state["labelled"] == 1 and sum(state["views"].values()) == 2 * N
    assert len(screen) == min(50, state["views"][min(state["views"])])
    assert len(decoded) <= len(screen) + 2, len(decoded)


def test_the_review_never_shows_a_changed_image_under_the_runs_label(tmp_path, browser):
    """The review page serves an image only while its bytes are those the run saw (review.pt keeps
    each file's digest): a file changed since gets a 409 that says so, not the new picture, and its
    tile says so, with nothing to confirm or correct."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    out, folder, keys, *_ = hand_made_review(tmp_path)
    session = page.Session(page.Review(out), CLASSES, tmp_path / "checked.csv")
    Image.new("RGB", (30, 21), (0, 0, 0)).save(folder / keys[1])  # another picture under the same name
    with page.Server(session) as server:
        url = f"{base(server)}/image?token={session.token}&size=160&index="
        status, body = request(url + "0")
        assert status == 200 and body[:2] == b"\xff\xd8"  # a JPEG
        status, body = request(url + "1")
        assert status == 409 and b"changed since the run" in body
        browser.get(server.url)
        wait_for(browser, progress_is("0 / 5"))
        Select(browser.find_element(By.ID, "views")).select_by_value("b1:dog:kept")  # image 1, changed
        tile = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'.tile[data-key="{keys[1]}"].unseen'))
        assert "changed since the run" in tile.text
        assert not tile.find_element(By.CSS_SELECTOR, "button.confirm").is_enabled()
        assert not tile.find_element(By.CSS_SELECTOR, "select.correct").is_enabled()
        Select(browser.find_element(By.ID, "views")).select_by_value("b1:cat:kept")  # images 3 and 0, as they were
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .tile")) == 2 and d.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert not browser.find_elements(By.CSS_SELECTOR, ".tile.unseen")
        assert all(b.is_enabled() for b in browser.find_elements(By.CSS_SELECTOR, "button.confirm"))


def test_two_tabs_answering_at_once_lose_no_write(tmp_path, monkeypatch):
    """Every answer reads, changes and writes the labels file while holding the session's one lock,
    so answers from two tabs never interleave (a read of one between the read and the write of the
    other would lose a write); two threads answering every image, one forwards and one backwards,
    leave every image's last answer in the file."""
    import threading
    items = make_items(tmp_path)
    labels = tmp_path / "labels.csv"
    session = page.Session(items, CLASSES, labels)
    held = []
    real_read, real_write = page.read_rows, page.runs.write_csv

    def read(path):
        held.append(session.lock.locked())
        return real_read(path)

    def write(*a):
        held.append(session.lock.locked())
        return real_write(*a)
    monkeypatch.setattr(page, "read_rows", read)
    monkeypatch.setattr(page.runs, "write_csv", write)
    tabs = [threading.Thread(target=lambda order=order, name=name: [session.give(i, name) for i in order])
            for order, name in ((range(5), "cat"), (range(4, -1, -1), "dog"))]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    assert len(held) == 20 and all(held)  # 10 answers, each a read and a write under the lock
    given = page.answers(labels, [it.key for it in items])
    assert set(given) == {it.key for it in items} and set(given.values()) <= {"cat", "dog"}
    assert len(rows(labels)) == 6  # one row per image: no answer added a second row for an image


def test_the_server_ends_only_after_the_reply_in_flight_is_sent(tmp_path, monkeypatch):
    """The last answer (or the review's done) ends the command serving the page: its server waits
    for the requests being answered, so the tab gets its reply rather than a closed connection.
    A reply held back while the server is told to end: the end waits for it."""
    import threading
    session = page.Session(make_items(tmp_path), CLASSES, tmp_path / "labels.csv")
    release, progress, seen, holding = threading.Event(), threading.Event(), [], []
    progress_of = page.Session.progress

    def held(self):  # the reply of /finish, held until released
        if self.finished.is_set() and threading.current_thread() is not threading.main_thread():
            holding.append(1)
            release.wait()
        return progress_of(self)
    monkeypatch.setattr(page.Session, "progress", held)
    wait_idle = page.InFlight.wait_idle
    monkeypatch.setattr(page.InFlight, "wait_idle", lambda self: (seen.append("waits"), progress.set(),
                                                                  wait_idle(self)))
    server = page.Server(session).__enter__()
    replies = []
    tab = threading.Thread(target=lambda: replies.append(request(f"{base(server)}/finish?token={session.token}", {})),
                           daemon=True)
    tab.start()
    session.finished.wait()
    ending = threading.Thread(target=lambda: (server.__exit__(None, None, None), seen.append("ended"), progress.set()),
                              daemon=True)
    ending.start()
    progress.wait()
    try:
        assert seen == ["waits"], "the server ended while a reply was still being answered"
    finally:
        release.set()
    ending.join()
    tab.join()
    assert seen == ["waits", "ended"] and replies[0][0] == 200 and json.loads(replies[0][1])["total"] == 5
    assert holding == [1]  # the reply was held back: what this test stands on


def test_a_page_with_nothing_to_ask_ends_the_one_command_loop_in_one_line(monkeypatch):
    """Where the run waits for labels but the page finds every image asked for labelled (the two
    reading the file differently), --browser stops with one line rather than loop for ever."""
    import vecaf
    calls = []

    def waits(args):
        calls.append(1)
        assert len(calls) == 1, "the run was started again with nothing labelled: a loop without end"
        raise page.runs.Waiting("loop 1 selected 4 images")
    monkeypatch.setattr(vecaf, "end_to_end", waits)
    monkeypatch.setattr(vecaf, "resolve_defaults", lambda args: args)
    monkeypatch.setattr(page, "label_until_done", lambda out, host: False)
    args = vecaf.parser().parse_args(["--labels", "labels.csv", "--browser", "--out", "x"])
    with pytest.raises(page.runs.RunError, match="gives every image it asks for"):
        vecaf.with_the_page(args)
    assert calls == [1]
