"""``tuneqdm demo``: quantize a tiny random UNet, train its scales, save, reload and sample (``tuneqdm.demo``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..files import check_output_folder, writes_to
from ..options import QUIET_HELP, option
from ..progress import quiet_while
from ..quant.bits import SUPPORTED_BITS, Bits


@dataclass
class DemoConfig:
    """The ``tuneqdm demo`` settings; each field is its flag."""

    out: str = option("demo-out", "output folder (default: demo-out)")
    steps: int = option(40)
    bits: int = option(4, choices=SUPPORTED_BITS)
    seed: int = option(0)
    force: bool = option(False, "write into a non-empty output folder")
    quiet: bool = option(False, QUIET_HELP)

    def __post_init__(self):
        self.bits = Bits(self.bits)


@writes_to(lambda config: config.out)
def run_demo(config: DemoConfig) -> dict:
    """Run the demo into ``config.out``; prints and returns its summary."""
    from ..demo import DEMO_FILES, run_demo as demo

    out = check_output_folder(config.out, config.force, DEMO_FILES, "a demo")
    with quiet_while(config.quiet):
        summary = demo(out, steps=config.steps, bits=config.bits, seed=config.seed)
    print(json.dumps(summary, indent=2))
    return summary
