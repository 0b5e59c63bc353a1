"""Evaluation prompt lists: DreamBooth's 25 object and 25 live-subject prompts, the toy world's, or a file.

The DreamBooth lists are those of Ruiz et al., CVPR 2023 (github.com/google/dreambooth, CC BY 4.0), exactly as
published, with ``{0}`` the unique token and ``{1}`` the class word.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import TuneQDMError
from ..files import read_prompt_file
from ..toy.subjects import eval_prompts

_PLACES = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
_RECOLOURS = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
DREAMBOOTH_OBJECT = _PLACES + [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug",
] + _RECOLOURS
DREAMBOOTH_LIVE = _PLACES + [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
] + _RECOLOURS
PROMPT_SETS = ("dreambooth-object", "dreambooth-live", "toy")


def evaluation_prompts(spec: str, token: str, class_word: str) -> list[str]:
    """The prompts of ``spec`` (a set name, or a text file of one prompt per line using ``{0}`` for the token and
    ``{1}`` for the class word) for one subject."""
    if spec == "dreambooth-object":
        templates = DREAMBOOTH_OBJECT
    elif spec == "dreambooth-live":
        templates = DREAMBOOTH_LIVE
    elif spec == "toy":
        return eval_prompts(token, class_word)
    else:
        path = Path(spec)
        if not path.is_file():
            raise TuneQDMError(f"--prompts {spec}: no such file; use a text file or one of {', '.join(PROMPT_SETS)}")
        templates = read_prompt_file(path, "--prompts")
    return [fill(t, token, class_word) for t in templates]


def fill(template: str, token: str, class_word: str) -> str:
    """``template`` with ``{0}`` -> token and ``{1}`` -> class word, and nothing else: a prompt file is text, not a
    ``str.format`` template (which would evaluate ``{0.__class__}`` and fail on a stray brace)."""
    words = (token, class_word)
    return re.sub(r"\{([01])\}", lambda m: words[int(m.group(1))], template)  # one pass: a token may hold "{1}"
