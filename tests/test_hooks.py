"""tuneqdm.hooks: a denoiser's call arguments read by name however they were passed, and a callback per timestep."""

import torch
from torch import nn

from tuneqdm.hooks import given_timesteps, on_call, on_timestep


class Denoiser(nn.Module):
    def forward(self, sample, timestep=None, encoder_hidden_states=None):
        return sample * 2


class NoTimestep(nn.Module):
    def forward(self, x):
        return x


def test_arguments_are_found_by_position_and_by_keyword():
    seen = []
    model = Denoiser()
    handle = on_timestep(model, lambda t, call: seen.append((t, call.get("encoder_hidden_states"),
                                                             call.get("missing", "sample").shape)))
    x = torch.ones(3, 2)
    model(x, 7, "emb")
    model(x, timestep=8, encoder_hidden_states="kw")
    model(sample=x)
    assert seen == [(7, "emb", (3, 2)), (8, "kw", (3, 2)), (None, None, (3, 2))]
    handle.remove()
    model(x, 9)
    assert len(seen) == 3
    assert torch.equal(model(x), x * 2)  # the hook leaves the call and the output alone


def test_given_timesteps_skips_calls_without_one_and_no_timestep_means_no_hook():
    seen = []
    model = Denoiser()
    on_timestep(model, given_timesteps(seen.append))
    model(torch.ones(1), 5)
    model(torch.ones(1))
    assert seen == [5]
    assert on_timestep(NoTimestep(), given_timesteps(seen.append)) is None
    assert not NoTimestep()._forward_pre_hooks


def test_on_call_sees_every_call_of_a_module_without_timestep():
    seen = []
    model = NoTimestep()
    on_call(model, lambda call: seen.append(call.get("x")))
    model(1)
    model(x=2)
    assert seen == [1, 2]
