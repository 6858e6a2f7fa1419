"""The HTML report opened in a real browser (headless Debian Chromium through selenium).

It checks what only a browser can tell: the page loads without console errors (a Content-Security-Policy violation,
i.e. an attempted network request or script, is one), every plot renders at a nonzero size, the tables have their
rows, the thumbnails decode, and nothing is fetched over the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import hookinf.report
from hookinf import Scores
from hookinf.report import save_html

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # Debian's packages
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
HOW = (
    "install Debian chromium + chromium-driver (apt-get install chromium chromium-driver) to run the HTML report's "
    "browser test"
)
N_QUERY, N_TRAIN, K, N_SUSPECTS = 12, 60, 3, 8
LAYERS = ("embed", "block.0.attn", "block.0.mlp", "head")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed (pip install 'hookinf[docs]'); also {HOW}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: {HOW}")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def page(driver, tmp_path_factory):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(0)
    per_layer = {
        name: (i + 1) * torch.randn(N_QUERY, N_TRAIN, generator=gen, dtype=torch.float64)
        for i, name in enumerate(LAYERS)
    }
    scores = Scores(per_layer=per_layer, method="ekfac", damping=dict.fromkeys(LAYERS, 0.01))
    grey = torch.rand(N_TRAIN, 8, 8, generator=gen)
    colour = (torch.rand(N_QUERY, 40, 30, 3, generator=gen) * 255).to(torch.uint8)
    flipped = torch.rand(N_TRAIN, generator=gen) < 0.2
    self_scores = torch.rand(N_TRAIN, generator=gen, dtype=torch.float64) + flipped
    sections = [
        hookinf.report.comparison_section([("exact", 0.97, 0.9), ("identity <fast>", 0.93, 0.8)]),
        hookinf.report.suspects_section(
            self_scores, flipped=flipped, describe=lambda i: f"label <{i % 10}>", images=lambda i: grey[i],
            k=N_SUSPECTS,
        ),
        hookinf.report.scores_section(
            scores, queries=[4, 0, 7], k=K, describe=lambda i: f"example {i} & <b>co</b>",
            images=lambda i: grey[i], describe_query=lambda q: f"question {q}", query_images=lambda q: colour[q],
        ),
    ]  # fmt: skip
    path = save_html(tmp_path_factory.mktemp("browser") / "report.html", sections, title="Browser <check>")
    driver.get(path.as_uri())
    return driver, scores, path


def test_page_loads_without_console_errors(page):
    driver, _, _ = page
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    assert driver.title == "Browser <check>"
    assert driver.find_element("css selector", "h1").text == "Browser <check>"


PLOTS = (
    "suspects-plot",
    "influence-heatmap",
    "influence-distribution",
    "influence-query-shares",
)


@pytest.mark.parametrize("plot", PLOTS)
def test_each_plot_renders_with_a_nonzero_size(page, plot):
    driver, _, _ = page
    svg = driver.find_element("css selector", f"#{plot} svg")
    size = svg.size
    assert size["width"] > 600, size  # the plots span the content column
    assert size["height"] > 100, size
    # and they draw something: text labels (svg.fonttype none keeps text as text) and paths
    assert driver.execute_script("return arguments[0].querySelectorAll('path').length", svg) > 5
    assert driver.execute_script("return arguments[0].querySelectorAll('text').length", svg) > 3


def test_tables_have_the_expected_rows(page):
    driver, scores, _ = page

    def rows(table_id: str) -> int:
        return len(driver.find_elements("css selector", f"#{table_id} tbody tr"))

    assert rows("comparison-table") == 2
    assert rows("suspects-table") == N_SUSPECTS
    assert rows("influence-layers") == len(LAYERS)
    for q in (4, 0, 7):
        assert rows(f"influence-q{q}-harmful") == K
        assert rows(f"influence-q{q}-helpful") == K
    top = scores.top_k(K)
    first = driver.find_element("css selector", "#influence-q4-harmful tbody tr")
    assert first.get_attribute("data-train") == str(int(top.harmful[4, 0]))
    # harmful and helpful lists sit side by side at this width
    harmful = driver.find_element("css selector", "#influence-q4-harmful").location
    helpful = driver.find_element("css selector", "#influence-q4-helpful").location
    assert helpful["x"] > harmful["x"] + 300
    assert abs(helpful["y"] - harmful["y"]) < 5
    # nothing sticks out sideways
    assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_thumbnails_load(page):
    driver, _, _ = page
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.width])"
    )
    assert len(images) == N_SUSPECTS + 3 + 3 * 2 * K  # suspects, query pictures, listed training examples
    for complete, natural_width, natural_height, shown_width in images:
        assert complete
        assert natural_width > 0
        assert natural_height > 0
        assert shown_width > 0
    assert {tuple(i[1:3]) for i in images} == {(8, 8), (30, 40)}


def test_nothing_is_fetched_from_the_network(page):
    driver, _, path = page
    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [name for name in resources if not name.startswith("data:")] == []
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('[src], [href]'))"
        ".map(e => e.getAttribute('src') || e.getAttribute('href'))"
    )
    assert links
    assert all(link.startswith(("data:", "#")) for link in links), links
    text = path.read_text(encoding="utf-8")
    assert 'src="http' not in text
    assert 'href="http' not in text
    assert "url(http" not in text
    assert "<script" not in text
