"""The families package: every pipeline-specific answer lives in one module of ``tuneqdm/families/``; nothing outside
it names a family, a pipeline class or a denoiser class."""

import ast
import re
from pathlib import Path

import pytest

from tuneqdm import families

PACKAGE = Path(__file__).resolve().parents[1] / "tuneqdm"
# the embedded toy model and the demo build a Stable Diffusion pipeline in code: a model, not a family's behaviour
BUILD_AN_SD_MODEL = ("toy/", "demo.py")


def _names() -> tuple[set[str], set[str]]:
    classes = set(families.PIPELINES) | {d for f in families.FAMILIES for d in f.denoisers}
    return classes, {f.name for f in families.FAMILIES}


def naming_sites(root: Path = PACKAGE) -> list[str]:
    """``file:line name`` for every identifier or string of a module outside ``families/`` that names a pipeline
    class or denoiser class (anywhere in a string), or is a quoted family name."""
    classes, names = _names()
    word = re.compile(r"\b(" + "|".join(sorted(classes)) + r")\b")
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("families/") or rel.startswith(BUILD_AN_SD_MODEL):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                hit = node.id if node.id in classes else None
            elif isinstance(node, ast.Attribute):
                hit = node.attr if node.attr in classes else None
            elif isinstance(node, ast.alias):
                hit = node.name if node.name in classes else None
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                m = word.search(node.value)
                hit = m.group(1) if m else (node.value if node.value in names else None)
            else:
                continue
            if hit:
                found.append((rel, getattr(node, "lineno", 0), hit))
    return [f"{rel}:{line} {hit}" for rel, line, hit in sorted(found)]


def test_no_module_outside_families_names_a_family():
    assert naming_sites() == []


def test_the_check_finds_a_planted_name(tmp_path):
    (tmp_path / "families").mkdir()
    (tmp_path / "families" / "x.py").write_text('P = "FluxPipeline"\n')  # inside: allowed
    (tmp_path / "a.py").write_text('import diffusers\nP = diffusers.FluxPipeline\nif name == "sd3":\n    pass\n'
                                   'M = "the PixArtTransformer2DModel of it"\n')
    assert naming_sites(tmp_path) == ["a.py:2 FluxPipeline", "a.py:3 sd3", "a.py:5 PixArtTransformer2DModel"]


def test_every_pipeline_class_has_one_family_and_every_family_its_module():
    assert len(families.PIPELINES) == sum(len(f.pipelines) for f in families.FAMILIES)
    assert len({f.name for f in families.FAMILIES}) == len(families.FAMILIES)
    for f in families.FAMILIES:
        assert type(f).__module__.rpartition(".")[2] in families.MODULES
        assert f.attribute in ("unet", "transformer") and f.denoisers


@pytest.mark.parametrize("config, flow", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}, True),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}, False),
    ({"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "prediction_type": "epsilon"}, False),
    ({"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "prediction_type": "flow_prediction",
      "use_flow_sigmas": True, "flow_shift": 3.0}, True),
])
def test_flow_matching_is_read_from_the_schedulers_configuration(config, flow):
    assert families.is_flow_matching(config) is flow


def test_the_readme_lists_every_supported_pipeline_class_with_one_example_command():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("### Supported pipelines"):]
    rows = re.findall(r"^\| `(\w+Pipeline)` \| ([^|]+) \|", table, flags=re.MULTILINE)
    assert [cls for cls, _ in rows] == list(families.PIPELINES)
    assert [label.strip() for _, label in rows] == [families.family_named(cls).label for cls, _ in rows]
    commands = table[table.index("```bash\n") + 8:].splitlines()  # the block after the table, first its lines
    assert commands[:len(families.PIPELINES)] == families.example_commands()  # one example per class, generated
    assert [c.rpartition("# ")[2] for c in families.example_commands()] == list(families.PIPELINES)
