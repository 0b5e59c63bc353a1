"""``tuneqdm report``: one self-contained HTML page of an evaluation or a fidelity benchmark, optionally checked in
headless Chromium."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import TuneQDMError
from ..files import check_writable_file
from ..options import QUIET_HELP, option
from ..progress import quiet_while


@dataclass
class ReportConfig:
    """The ``tuneqdm report`` settings; each field is its flag (``results`` is positional)."""

    results: str = option(help="a tuneqdm evaluate --out folder or a tuneqdm benchmark fidelity --out folder",
                          flag="results")
    out: str | None = option(None, "the HTML file (default: RESULTS/report.html)")
    image_format: str = option("jpeg", "how images are embedded (default jpeg: about 4x smaller; scores come from the "
                                       "PNGs)", choices=("jpeg", "png"))
    screenshot: str | None = option(None, "also open the page in headless Chromium (needs playwright + chromium), "
                                          "fail on console errors or broken images, and save a screenshot of its top",
                                    metavar="PNG")
    quiet: bool = option(False, QUIET_HELP)


def run_report(config: ReportConfig) -> Path:
    """Write the page; returns its path."""
    from ..benchmarks.report import write_report

    out = Path(config.out) if config.out else Path(config.results) / "report.html"
    if config.screenshot and not config.screenshot.lower().endswith(".png"):
        raise TuneQDMError(f"--screenshot {config.screenshot}: give a .png file name")
    if config.screenshot:
        check_writable_file(config.screenshot, "--screenshot")
    with quiet_while(config.quiet):
        write_report(config.results, out, config.image_format)
    print(f"report: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    if config.screenshot:
        from ..eval.browser import open_in_chromium

        problems = open_in_chromium(out, Path(config.screenshot))
        if problems:
            raise TuneQDMError(f"{out} has {len(problems)} problem(s) in Chromium, the first: {problems[0]}")
        print(f"screenshot: {config.screenshot} (Chromium loaded the page with no console errors)")
    return out
