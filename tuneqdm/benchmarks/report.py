"""`tuneqdm report RESULTS`: one self-contained HTML page of an evaluation or a fidelity benchmark.

The page holds the metrics table, then per subject its reference photos and a grid with one row per prompt and one
column per method (that prompt's images side by side; hovering an image strip shows its per-prompt scores). Images
are embedded as data URIs, so the file can be mailed or attached to an issue; they are re-encoded (JPEG by default,
to keep a 10-subject benchmark near 10 MB) — the metrics were computed on the lossless PNGs kept in RESULTS.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import TuneQDMError
from ..files import check_fields, check_version, check_writable_file, read_json, write_file_atomically
from ..photos import IMAGE_SUFFIXES
from ..eval.evaluate import METRICS, PHOTOS
from .fidelity import FLOAT_ACTS, TABLE_VERSION, cell_dir, cell_name

FORMATS = {"jpeg": ("JPEG", "image/jpeg", {"quality": 90}), "png": ("PNG", "image/png", {"optimize": True})}
SCORES = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))


@dataclass
class Column:
    label: str
    folder: Path  # an evaluation folder: metrics.json, images/PPP_I.png
    metrics: dict


@dataclass
class Section:
    name: str
    photos: list[Path]
    columns: list[Column] = field(default_factory=list)


_FIX = "evaluate again"
_FIELDS = {"format_version": int, "per_prompt": list, "dino?": (float, type(None)), "clip_i?": (float, type(None)),
           "clip_t?": (float, type(None)), "adapter?": (str, type(None)), "quantized_base?": (str, type(None)),
           "base?": (str, type(None)), "instance_data_dir?": (str, type(None))}
_PROMPT_FIELDS = {"prompt": str, "seeds": list, "dino?": float, "clip_i?": float, "clip_t?": float}
SETTINGS = ("images_per_prompt", "num_inference_steps", "guidance_scale", "seed", "subject_encoder", "clip_encoder",
            "clip_t_keeps_token")  # the page's settings line: any value is shown, escaped
MAX_IMAGES = 64  # per prompt and column: more is no page, and a crafted count must not read a whole disk


def _metrics(folder: Path) -> dict:
    """The checked metrics.json of an evaluation: every field the page reads, of the type it reads."""
    path = folder / METRICS
    if not path.is_file():
        raise TuneQDMError(f"{folder} holds no {METRICS}: run tuneqdm evaluate (or the benchmark) first")
    m = read_json(path, "evaluation")
    check_version(m, path, f"{path} was written by another tuneqdm version: evaluate again")
    if m.get("metric") == "fid":
        raise TuneQDMError(f"{path} is a --metric fid evaluation, which has no per-prompt images to show: report a "
                           "DreamBooth evaluation (tuneqdm evaluate --instance_data_dir ...)")
    check_fields(m, _FIELDS, path, _FIX)
    for i, p in enumerate(m["per_prompt"]):
        check_fields(p, _PROMPT_FIELDS, f"{path} (per_prompt[{i}])", _FIX)
        if not 1 <= len(p["seeds"]) <= MAX_IMAGES or not all(type(s) is int for s in p["seeds"]):
            raise TuneQDMError(f"{path}: per_prompt[{i}] 'seeds' must be 1 to {MAX_IMAGES} integers: {_FIX}")
    if not m["per_prompt"]:
        raise TuneQDMError(f"{path}: 'per_prompt' is empty: {_FIX}")
    return m


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``root``: the page embeds nothing from elsewhere."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def _photos(folder: Path, root: Path) -> list[Path]:
    """The images of ``folder``, only where it and each image lie inside the results folder ``root``: a results
    folder from someone else must not make the page copy the user's own pictures (an absolute
    ``instance_data_dir``, a symlink) into a page meant for sharing."""
    if not folder.is_dir() or not _inside(folder, root):
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and _inside(p, root))


def collect(results) -> tuple[list[dict], list[Section]]:
    """(metric table rows, sections) of an evaluation folder or a ``tuneqdm benchmark fidelity`` folder."""
    results = Path(results)
    if not results.is_dir():
        raise TuneQDMError(f"{results} is not a folder: pass an evaluation or benchmark output folder")
    if (results / "fidelity.json").is_file():
        table = read_json(results / "fidelity.json", "fidelity table")
        if table.get("table_version") != TABLE_VERSION:
            raise TuneQDMError(f"{results} was made by an older tuneqdm: run the benchmark again into a new --out")
        sections = []
        subjects = results / "subjects"
        for subject in sorted(subjects.iterdir() if subjects.is_dir() else [], key=lambda p: _natural(p.name)):
            section = Section(subject.name, _photos(subject, results))
            for row in table["rows"]:
                acts = tuple(row.get("activation_bits", FLOAT_ACTS))
                cell = cell_dir(results, row["method"], row["bits"], subject.name, acts) / "eval"
                if (cell / METRICS).is_file():
                    section.columns.append(Column(cell_name(row["method"], row["bits"], acts), cell, _metrics(cell)))
            if section.columns:
                sections.append(section)
        return table["rows"], sections
    m = _metrics(results)
    label = m.get("adapter") or m.get("quantized_base") or m.get("base") or "model"
    rows = [{"method": str(label), "bits": None, "subjects": 1, **{k: m.get(k) for k, _ in SCORES}}]
    return rows, [Section(Path(m.get("instance_data_dir") or "subject").name, _photos(results / PHOTOS, results),
                          [Column(str(label), results, m)])]


def _natural(name: str):
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else -1, name)


def _data_uri(images: list[Image.Image], fmt: str, max_side: int = 128) -> str:
    """The images side by side as one embedded strip, each at most ``max_side`` pixels (real photos are large)."""
    side = min(images[0].height, max_side)
    strip = Image.new("RGB", (side * len(images), side), "white")
    for i, im in enumerate(images):
        strip.paste(im.convert("RGB").resize((side, side)), (i * side, 0))
    kind, mime, options = FORMATS[fmt]
    buf = io.BytesIO()
    strip.save(buf, kind, **options)
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (FileNotFoundError, OSError):
        raise TuneQDMError(f"{path} is missing or unreadable: evaluate that cell again") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value, spec: str = "") -> str:
    """A value as escaped page text: numbers by ``spec``, None as "-", anything else (a results file may be crafted
    or damaged) as its escaped ``str``: nothing read from RESULTS reaches the page as markup."""
    if value is None:
        return "-"
    return html.escape(format(value, spec) if spec and _is_number(value) else str(value))


def _score(row: dict, key: str) -> str:
    return _text(row.get(key), ".3f") + (f" ± {_text(row[key + '_std'], '.3f')}" if key + "_std" in row else "")


def _size_cells(r: dict) -> list[str]:
    if "trainable_params" not in r:
        return ["-"] * 4
    fraction = r.get("trainable_fraction")
    percent = _text(100 * fraction, ".2f") if _is_number(fraction) else _text(fraction)
    return [f"{_text(r['trainable_params'], ',')} ({percent} %)", _text(r.get("adapter_bytes"), ","),
            _text(r.get("train_s"), ".0f"), _text(r.get("train_peak_mib"), ".0f")]


def _metric_table(rows: list[dict]) -> str:
    best = {k: max((r[k] for r in rows if _is_number(r.get(k))), default=None) for k, _ in SCORES}
    head = ["method", "bits", "lr", "subjects", *(n for _, n in SCORES), "trainable", "adapter bytes", "train s",
            "peak MiB"]
    out = ["<table class='metrics'><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [_text(r.get("method")), _text(r.get("bits")), _text(r.get("learning_rate"), "g"),
                 _text(r.get("subjects", 1))]
        for k, _ in SCORES:
            text = _score(r, k)
            cells.append(f"<b>{text}</b>" if r.get(k) == best[k] and best[k] is not None and len(rows) > 1 else text)
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells + _size_cells(r)) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def _scores(metrics: dict) -> str:
    return " · ".join(f"{n} {_text(metrics.get(k), '.3f')}" for k, n in SCORES)


def _section(s: Section, fmt: str) -> str:
    prompts = [p["prompt"] for p in s.columns[0].metrics["per_prompt"]]
    for c in s.columns:
        if [p["prompt"] for p in c.metrics["per_prompt"]] != prompts:
            raise TuneQDMError(f"{c.folder} was evaluated on other prompts than {s.columns[0].folder}: report "
                               "evaluations of the same --prompts")
    out = [f"<section id='{html.escape(s.name)}'><h2>{html.escape(s.name)}</h2>"]
    if s.photos:
        out.append(f"<p class='photos'>reference photos<br><img alt='reference photos of {html.escape(s.name)}' "
                   f"src='{_data_uri([_open(p) for p in s.photos], fmt)}'></p>")
    else:
        out.append("<p class='photos'>reference photos not found (only photos inside the results folder are "
                   "shown)</p>")
    head = "".join(f"<th>{html.escape(c.label)}<br><small>{_scores(c.metrics)}</small></th>" for c in s.columns)
    out.append(f"<table class='grid'><thead><tr><th>prompt</th>{head}</tr></thead><tbody>")
    for p, prompt in enumerate(prompts):
        row = [f"<td class='prompt'>{_text(prompt)}</td>"]
        for c in s.columns:
            scores = c.metrics["per_prompt"][p]
            n = len(scores["seeds"])
            images = [_open(c.folder / "images" / f"{p:03d}_{i}.png") for i in range(n)]
            row.append(f"<td><img alt='{html.escape(c.label)}: {_text(prompt)}' title='{_scores(scores)}' "
                       f"src='{_data_uri(images, fmt)}'></td>")
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</tbody></table></section>")
    return "\n".join(out)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
table.metrics td { text-align: right; } table.metrics td:first-child { text-align: left; }
img { display: block; image-rendering: pixelated; }
p.photos img { height: 96px; }
td.prompt { max-width: 16em; }
nav a { margin-right: 8px; }
"""


def render(results, fmt: str = "jpeg") -> str:
    if fmt not in FORMATS:
        raise TuneQDMError(f"image format {fmt!r}: choose one of {', '.join(FORMATS)}")
    rows, sections = collect(results)
    if not sections:
        raise TuneQDMError(f"{results} has no finished evaluations yet: report it when the benchmark has finished "
                           "a cell")
    first = {k: "?" for k in SETTINGS} | sections[0].columns[0].metrics  # a settings key missing: a "?" on the page
    title = f"tuneqdm report: {Path(results).resolve().name}"
    keeps = first["clip_t_keeps_token"]
    kept = "kept" if keeps is True else "dropped" if keeps is False else "?"
    settings = (f"{len(sections)} subject(s); {first['images_per_prompt']} images per prompt, "
                f"{first['num_inference_steps']} steps, guidance {first['guidance_scale']}, seed {first['seed']}; "
                f"evaluators {first['subject_encoder']} (DINO) and {first['clip_encoder']} (CLIP-I, CLIP-T; rare "
                f"token {kept}). Images shown as {fmt.upper()}; "
                f"scores were computed on the PNGs.")
    nav = " ".join(f"<a href='#{html.escape(s.name)}'>{html.escape(s.name)}</a>" for s in sections)
    body = "\n".join(_section(s, fmt) for s in sections)
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<link rel='icon' href='data:,'><style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(settings)}</p>\n{_metric_table(rows)}\n<nav>{nav}</nav>\n{body}\n</body></html>\n")


def write_report(results, out=None, fmt: str = "jpeg") -> Path:
    """Write the page to ``out`` (default ``RESULTS/report.html``) atomically."""
    out = Path(out) if out is not None else Path(results) / "report.html"
    check_writable_file(out)  # before the images are re-encoded
    page = render(results, fmt)
    return write_file_atomically(out, page)
