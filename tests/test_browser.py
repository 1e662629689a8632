"""Browser test of the `medplib serve` page in headless Chromium (selenium + chromium-driver).

Starts `medplib serve` on a tiny checkpoint in a subprocess, uploads an image, drags a box on the
canvas, asks with the forced mask ticked, and checks that the answer and the mask overlay are
rendered. Chromium comes from Debian (`apt-get install chromium chromium-driver`, done here as
root when missing); the test skips, saying why, where no browser can be had.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from tiny_checkpoint import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")


def _browser_binaries():
  return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def chromium():
  selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install '.[test]')")
  del selenium
  browser, driver = _browser_binaries()
  if not (browser and driver):
    if os.geteuid() != 0 or not shutil.which("apt-get"):
      pytest.skip("chromium / chromedriver missing and cannot be installed here (need root and "
                  "apt-get: apt-get install -y chromium chromium-driver)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium", "chromium-driver"]):
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
      if proc.returncode:
        pytest.skip(f"could not install chromium with {' '.join(cmd)}: {proc.stderr[-500:]}")
    browser, driver = _browser_binaries()
    if not (browser and driver):
      pytest.skip("apt-get finished but chromium / chromedriver are still not on PATH")
  return browser, driver


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
  proc = subprocess.Popen(
      [sys.executable, "-m", "medplib_jax.cli", "serve", "--checkpoint", ckpt, "--port", "0",
       "--default-new-tokens", "4", "--max-batch", "1"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  url, seen = None, []
  for line in proc.stdout:  # model load + warm-up compile, then the listening line
    seen.append(line)
    match = re.search(r"listening on (http://\S+)", line)
    if match:
      url = match.group(1)
      break
  if url is None:
    proc.kill()
    pytest.fail("medplib serve exited before listening:\n" + "".join(seen[-30:]))
  # Keep draining the log so the server never blocks on a full pipe.
  drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
  yield url
  proc.terminate()
  proc.wait(timeout=30)
  drain.wait(timeout=30)


def test_page_answers_and_renders_mask_overlay(chromium, served, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  browser, driver_path = chromium
  image_path = str(tmp_path / "ct_0001.png")
  img = np.full((160, 240, 3), 30, np.uint8)
  img[40:120, 60:180] = 210
  Image.fromarray(img).save(image_path)

  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}")
  driver = webdriver.Chrome(service=Service(driver_path), options=options)
  try:
    driver.get(served)
    driver.find_element(By.ID, "image").send_keys(image_path)
    ask = driver.find_element(By.ID, "ask")
    WebDriverWait(driver, 30).until(lambda d: ask.is_enabled())
    view = driver.find_element(By.ID, "view")
    assert driver.execute_script("return [arguments[0].width, arguments[0].height]", view) == [240, 160]

    driver.find_element(By.CSS_SELECTOR, "input[name=tool][value=box]").click()
    # Drag from (-50, -30) to (+40, +25) px around the canvas centre.
    ActionChains(driver).move_to_element_with_offset(view, -50, -30).click_and_hold() \
        .move_by_offset(45, 30).move_by_offset(45, 25).release().perform()
    box = driver.execute_script("return regionPrompt && regionPrompt.box")
    assert box and box[2] > box[0] and box[3] > box[1]

    driver.find_element(By.ID, "question").send_keys("Please segment the bright region.")
    driver.find_element(By.ID, "force").click()
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("4")
    ask.click()

    answer = driver.find_element(By.ID, "answer")
    WebDriverWait(driver, 300).until(lambda d: answer.get_attribute("data-state") in ("done", "error"))
    status = driver.find_element(By.ID, "status").text
    assert answer.get_attribute("data-state") == "done", status
    assert answer.text.strip()
    overlay = driver.find_element(By.ID, "overlay")
    assert overlay.get_attribute("data-rendered") == "1", status
    drawn = driver.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [c.width, c.height, n];",
        overlay)
    assert drawn[:2] == [240, 160]
    assert drawn[2] == int(overlay.get_attribute("data-area"))  # the response's mask, pixel for pixel
    assert "mask" in status
  finally:
    driver.quit()
