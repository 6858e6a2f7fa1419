"""Regenerates the HTML report screenshots in docs/img/ from the digits example's real report.

    .venv/bin/python docs/screenshot.py            # full-size example (about 30 s), then two PNGs
    .venv/bin/python docs/screenshot.py --n-train 400 --epochs 15   # quicker, for trying layout changes

It runs ``examples/digits_mislabeled.py`` into a temporary directory, opens its HTML report in headless Chromium
(Debian's ``chromium`` and ``chromium-driver`` packages, driven by selenium from the ``docs`` extra) and saves:

* ``docs/img/html-report.png``: the MLP's influence section, from its summary to the first detailed query;
* ``docs/img/html-suspects.png``: the top of the page, the AUC per method and the MLP's suspects.

Each image is cropped to the page's content column. Browser console errors fail the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BROWSER_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def browser(profile: Path) -> Any:
    """Headless Debian Chromium with a fresh profile and the console log enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in (*BROWSER_ARGS, f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def box(driver: Any, selector: str) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the element in page pixels."""
    rect = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY];",
        selector,
    )
    left, top, right, bottom = (round(v) for v in rect)
    return left, top, right, bottom


def main(argv: list[str] | None = None) -> None:
    """Runs the example, opens its report and writes the screenshots."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n-train", default="1200", help="training digits for the example (default 1200)")
    parser.add_argument("--epochs", default="30", help="training epochs for the example (default 30)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go")
    args = parser.parse_args(argv)
    from PIL import Image

    spec = importlib.util.spec_from_file_location("digits_mislabeled", ROOT / "examples" / "digits_mislabeled.py")
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "digits_report.html"
        example.main(["--n-train", args.n_train, "--epochs", args.epochs, "--html", str(report)])
        driver = browser(Path(tmp) / "profile")
        try:
            driver.get(report.as_uri())
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, height + 200)  # the whole page in one viewport
            errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
            if errors:
                sys.exit(f"the report logged browser errors: {errors}")
            page = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
            left, _, right, _ = box(driver, "main")
            crops = {
                "html-report.png": (box(driver, "#influence-mlp")[1] - 12, box(driver, "#influence-mlp .query")[3]),
                "html-suspects.png": (0, box(driver, "#suspects-mlp-table tbody tr:nth-child(6)")[3] + 1),
            }
            for name, (top, bottom) in crops.items():
                image = page.crop((left, top, right, bottom)).convert("RGB")
                image = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)  # a third of the bytes
                image.save(args.out / name, optimize=True)
                print(f"wrote {args.out / name} ({image.width}×{image.height})")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
