"""The supported-pipeline registry: every tiny pipeline resolves to its denoiser, anything else is one line."""

import pytest
from diffusers import DDPMPipeline, UNet2DModel
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

from tuneqdm.families import PIPELINES, denoiser, denoiser_component, family, native_size
from tuneqdm.errors import TuneQDMError
from tuneqdm.sampling import generate
from tuneqdm.loading import pipeline_from


@pytest.mark.parametrize("build, attribute, model", [
    (tiny_sd_pipeline, "unet", "UNet2DConditionModel"),
    (tiny_flux_pipeline, "transformer", "FluxTransformer2DModel"),
    (tiny_sd3_pipeline, "transformer", "SD3Transformer2DModel"),
    (tiny_pixart_pipeline, "transformer", "PixArtTransformer2DModel"),
])
def test_denoiser_of_each_supported_pipeline(tmp_path, build, attribute, model):
    pipe = pipeline_from(str(build(tmp_path / "p")))
    assert type(pipe).__name__ in PIPELINES
    assert denoiser_component(pipe) == attribute
    assert denoiser(pipe) is getattr(pipe, attribute)
    assert type(denoiser(pipe)).__name__ == model


def test_unsupported_pipeline_is_one_line_naming_the_supported():
    pipe = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                         down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                        scheduler=None)
    with pytest.raises(TuneQDMError) as e:
        family(pipe)
    assert str(e.value) == ("DDPMPipeline is not supported: tuneqdm personalizes " + ", ".join(PIPELINES)
                            + " (pass a folder or hub id of one of them)")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_pixart_pipeline])
def test_native_size_is_what_sampling_draws_by_default_and_fits_its_multiple(tmp_path, build):
    """Training's default --resolution and sampling's default size come from one rule."""
    pipe = pipeline_from(str(build(tmp_path / "p")))
    size, multiple = native_size(pipe)
    image = generate(pipe, "a box", num_inference_steps=1)[0]
    assert image.size == (size, size)
    assert size % multiple == 0
