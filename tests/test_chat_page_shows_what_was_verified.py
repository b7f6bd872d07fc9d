"""The proxy's chat page in a real headless Chromium (Debian's, driven by Selenium through Debian's
chromedriver): it shows the verification, streams an answer, and blocks sending once the
upstream fails its verification. Screenshots go to test-artifacts/ (TEEGPU_TEST_ARTIFACTS)."""
import os
import shutil
from pathlib import Path

import pytest

from api_process import ProxyProcess
from attested_api import MRENCLAVE, proxy_args, start
from teegpu.tee.attestation import model_sha256

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("TEEGPU_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and os.environ.get("TEEGPU_REQUIRE_BROWSER") != "1",
    reason="no chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=390,844"):
        options.add_argument(arg)  # a phone-sized window
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout_s: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: d.execute_script(script))


def text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def test_the_page_shows_the_checks_streams_and_blocks_when_unverified(browser, tmp_path, tiny_model_dir):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server, state = start(tmp_path, tiny_model_dir)
    proxy = ProxyProcess(server.url, *proxy_args(state, tiny_model_dir))
    try:
        browser.get(proxy.url)
        wait_for(browser, "return document.getElementById('status').classList.contains('ok')"
                          " && document.getElementById('model').options.length > 0")
        browser.save_screenshot(str(ARTIFACTS / "chat-page-verified.png"))
        facts = text(browser, "facts")
        assert MRENCLAVE in facts and model_sha256(Path(tiny_model_dir)) in facts and "UpToDate" in facts
        assert "plain" in facts and "sees this conversation's activations" in text(browser, "protection")
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        answer = chat(browser, "Tell me about rivers.")
        assert answer and not answer.startswith("Not answered")
        assert browser.execute_script("return window.updates") > 2  # it grew chunk by chunk
        browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))

        port = server.url.rsplit(":", 1)[1]
        server.stop()
        server, _ = start(tmp_path, tiny_model_dir, "--wrong-model-binding", state=state, api_args=("--port", port))
        assert chat(browser, "And about lakes?").startswith("Not answered")
        wait_for(browser, "return document.getElementById('send').disabled"
                          " && !document.getElementById('blocked').hidden")
        assert "model/mode binding" in text(browser, "blocked") and "NOT verified" in text(browser, "status")
        browser.execute_script("document.getElementById('blocked').scrollIntoView({block: 'end'})")
        browser.save_screenshot(str(ARTIFACTS / "chat-page-blocked.png"))
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        proxy.stop()
        server.stop()


def chat(driver, prompt: str) -> str:
    """Type and send a prompt; the answer's bubble text once the page is ready again."""
    before = driver.execute_script("return document.getElementById('messages').children.length")
    driver.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('messages'),
            {subtree: true, childList: true, characterData: true});""")
    driver.find_element("id", "prompt").send_keys(prompt)
    driver.find_element("id", "send").click()
    wait_for(driver, f"const m = document.getElementById('messages');"  # its prompt and its answer, done
                     f"return m.children.length >= {before + 2} && m.lastElementChild.textContent.length > 0"
                     f" && document.getElementById('chat').getAttribute('aria-busy') === 'false'")
    return driver.execute_script("return document.getElementById('messages').lastElementChild.textContent")
