"""The voting page in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
keys and a button answer the questions of a few items, Backspace re-asks one, a reload resumes, and
the JSONL holds exactly those votes. NCPPO_SBS_SCREENSHOT=PATH saves the page as it looks to annotators."""

from __future__ import annotations

import json
import os

import pytest

from ncppo.sbs.items import annotator_order, left_side
from ncppo.sbs.server import ServeConfig, create_app, open_session, running_server
from test_sbs_server import make_sample_folders

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1180,860"]


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs chromium and chromium-driver")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # selenium's driver manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _page(driver):
    return driver.execute_script(
        "const v = document.getElementById('vote');"
        "return [document.body.dataset.state, v.dataset.item || null, v.dataset.question || null,"
        " document.getElementById('progress').textContent];")


def _wait_ready(driver, before=None):
    """Wait until the page accepts a vote (or is done) and shows something other than `before`."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: (p := _page(d))[0] in ("ready", "done") and p[1:3] != before)
    return _page(driver)


def test_keys_vote_resume_and_jsonl(tmp_path, browser):
    from selenium.webdriver.common.by import By

    dir_a, dir_b = make_sample_folders(tmp_path)
    out = tmp_path / "votes.jsonl"
    session = open_session(ServeConfig(dir_a=str(dir_a), dir_b=str(dir_b), out=str(out), shuffle_seed=3))
    order = [it.key for it in annotator_order(session.items, "Ann-Lee", 3)]
    with running_server(create_app(session)) as url:
        browser.get(url + "/")
        _wait_until(browser, "login")
        name = browser.find_element(By.ID, "name")
        name.send_keys("Ann Lee\n")  # sanitised to Ann-Lee by the server
        state, key, question, progress = _wait_ready(browser)
        assert (key, question, progress) == (order[0], "general", "0 / 8 items")
        assert browser.find_element(By.ID, "prompt").text == session.by_key[key].prompt
        assert "annotator=Ann-Lee" in browser.current_url

        body = browser.find_element(By.TAG_NAME, "body")
        pressed = []  # (item, question, choice)
        plan = [("1", "left"), ("2", "right"), ("3", "tie"),  # item 1: one key per question
                ("2", "right"), ("1", "left"), ("BUTTON", "tie"),  # item 2: the tie by button
                ("Backspace", None), ("1", "left"),  # Backspace re-asks item 2's alignment: now left
                ("1", "left"), ("1", "left"), ("3", "tie")]  # item 3
        for key_name, choice in plan:
            before = _page(browser)[1:3]
            if key_name == "BUTTON":
                browser.find_element(By.CSS_SELECTOR, "button[data-choice='tie']").click()
            elif key_name == "Backspace":
                body.send_keys("\ue003")  # selenium's BACKSPACE
            else:
                body.send_keys(key_name)
            if choice:
                pressed.append((*before, choice))
            state, *_ = _wait_ready(browser, before)
            if key_name == "Backspace":
                assert _page(browser)[1:3] == [order[1], "alignment"]
                assert browser.find_element(By.ID, "question").text.startswith("Again:")
        state, key, question, progress = _page(browser)
        assert (key, question, progress) == (order[3], "general", "3 / 8 items")
        if os.environ.get("NCPPO_SBS_SCREENSHOT"):
            body.send_keys("2")  # one answer on the fourth item, so the question list shows a badge
            _wait_ready(browser, [key, question])
            browser.save_screenshot(os.environ["NCPPO_SBS_SCREENSHOT"])
            pressed.append((key, question, "right"))

        browser.refresh()  # resume: the URL names the annotator, the server knows the votes
        state, key, question, progress = _wait_ready(browser)
        assert key == order[3] and progress == "3 / 8 items"
        assert question == ("visual" if os.environ.get("NCPPO_SBS_SCREENSHOT") else "general")
    session.log.close()

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(pressed)
    for line, (key, question, choice) in zip(lines, pressed):
        left = left_side(key, "Ann-Lee", 3)
        winner = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
        item = session.by_key[key]
        assert (line["prompt_index"], line["seed"], line["prompt"]) == (item.prompt_index, item.seed, item.prompt)
        assert (line["question"], line["winner"], line["left"], line["annotator"]) == (question, winner, left, "Ann-Lee")


def _wait_until(driver, state):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: d.execute_script("return document.body.dataset.state") == state)



def test_private_link_votes_as_its_annotator(tmp_path, browser):
    """`serve --annotators`: the page opens only through the link, asks no name, votes as the link's
    annotator (keys and a button), resumes on reload, and a wrong link shows the refusal, not the page."""
    from selenium.webdriver.common.by import By

    from ncppo.sbs.access import load_tokens

    dir_a, dir_b = make_sample_folders(tmp_path)
    out = tmp_path / "votes.jsonl"
    session = open_session(ServeConfig(dir_a=str(dir_a), dir_b=str(dir_b), out=str(out), shuffle_seed=5))
    order = [it.key for it in annotator_order(session.items, "bob", 5)]
    tokens, links = load_tokens(["ann", "bob"], out, "http://127.0.0.1")  # the links' paths: /?t=TOKEN
    token = {name: link.split("?t=")[1] for name, link in links}
    with running_server(create_app(session, trusted_hosts=["127.0.0.1"], tokens=tokens)) as url:
        browser.get(url + "/")  # no link: refused, and the voting page is not sent
        assert "private link" in browser.find_element(By.TAG_NAME, "body").text
        assert browser.execute_script("return document.getElementById('vote')") is None
        browser.get(url + "/?t=" + token["bob"][:-2])
        assert "not valid" in browser.find_element(By.TAG_NAME, "body").text

        browser.get(f"{url}/?t={token['bob']}")
        state, key, question, progress = _wait_ready(browser)  # no name asked: the link names bob
        assert (key, question, progress) == (order[0], "general", "0 / 8 items")
        assert browser.find_element(By.ID, "who").text == "bob"
        assert browser.find_element(By.ID, "login").get_attribute("hidden") is not None
        body = browser.find_element(By.TAG_NAME, "body")
        pressed = []
        for key_name, choice in [("1", "left"), ("2", "right"), ("BUTTON", "tie"), ("3", "tie")]:
            before = _page(browser)[1:3]
            if key_name == "BUTTON":
                browser.find_element(By.CSS_SELECTOR, "button[data-choice='tie']").click()
            else:
                body.send_keys(key_name)
            pressed.append((*before, choice))
            _wait_ready(browser, before)
        browser.refresh()  # resume through the same link
        state, key, question, progress = _wait_ready(browser)
        assert (key, question, progress) == (order[1], "visual", "1 / 8 items")
    session.log.close()

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(pressed) == 4
    for line, (key, question, choice) in zip(lines, pressed):
        left = left_side(key, "bob", 5)
        winner = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
        assert (line["annotator"], line["question"], line["winner"], line["left"]) == ("bob", question, winner, left)
        assert session.by_key[key].seed == line["seed"]
