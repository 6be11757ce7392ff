"""Sequences of continuous values: a forecaster's history (plain or lagged), an offline-RL trajectory,
a robot policy's state and action chunk, a codec decoder's latents."""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from permgraph.inputs.model import model_device, model_dtype


def _trajectory(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """An offline-RL trajectory (Decision Transformer): ``states`` ``(batch, seq, state_dim)``, ``actions``
    ``(batch, seq, act_dim)``, ``rewards`` and ``returns_to_go`` ``(batch, seq, 1)`` and ``timesteps`` below
    ``max_ep_len``, each where the forward takes it."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
    params = inspect.signature(model.forward).parameters
    widths = {"states": getattr(cfg, "state_dim", None), "actions": getattr(cfg, "act_dim", None),
              "rewards": 1, "returns_to_go": 1}
    out = {k: torch.randn(batch, seq, w, generator=gen).to(dev, dtype) for k, w in widths.items()
           if k in params and isinstance(w, int)}
    if "timesteps" in params:
        steps = getattr(cfg, "max_ep_len", None) or seq
        out["timesteps"] = torch.randint(0, steps, (batch, seq), generator=gen).to(dev)
    yield out


def _action_chunk(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A flow-matching robot policy (PI0): the robot's ``state`` ``(batch, max_state_dim)``, and, each where the
    forward takes it, the ``noise`` it denoises ``(batch, chunk_size, max_action_dim)`` and the flow's
    ``timestep`` ``(batch,)`` in (0, 1) (the forward samples both where they are not given: no fixed output to
    verify). No ``actions``: the training targets, which add only a loss."""
    cfg = model.config
    state, action, chunk = (getattr(cfg, k, None) for k in ("max_state_dim", "max_action_dim", "chunk_size"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (state, action, chunk)):
        return
    dev, dtype = model_device(model), model_dtype(model)
    params = inspect.signature(model.forward).parameters
    out = {"state": torch.randn(batch, state, generator=gen).to(dev, dtype)}
    if "noise" in params:
        out["noise"] = torch.randn(batch, chunk, action, generator=gen).to(dev, dtype)
    if "timestep" in params:
        out["timestep"] = (0.1 + 0.8 * torch.rand(batch, generator=gen)).to(dev, dtype)
    yield out


def _latents(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A decoder of continuous latents (Mimi's): ``(batch, width, frames)`` channels first (a codec's
    convolutions), then ``(batch, frames, width)``; the width the config's ``hidden_size`` (or ``d_model``)."""
    width = next((v for k in ("hidden_size", "d_model") if isinstance(v := getattr(model.config, k, None), int)), None)
    if width:
        for shape in ((batch, width, seq), (batch, seq, width)):
            yield {"latents": torch.randn(*shape, generator=gen).to(model_device(model), model_dtype(model))}


def _past_values(model: nn.Module, batch: int, seq: int, gen: torch.Generator) -> Iterator[dict[str, Any]]:
    """A time-series forecaster's history ``past_values``: ``(batch, context, channels)`` (PatchTST,
    PatchTSMixer), else ``(batch, context)`` with no padding (``past_values_padding`` zeros) and frequency
    class 0 ``(batch, 1)`` where the forward requires them (TimesFM); ``context`` the config's ``context_length``."""
    cfg = model.config
    dev, dtype = model_device(model), model_dtype(model)
    ctx = getattr(cfg, "context_length", None) or 4 * (getattr(cfg, "patch_length", None) or 8)
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {}
    if "past_values_padding" in params:
        extra["past_values_padding"] = torch.zeros(batch, ctx, dtype=torch.long, device=dev)
    if "freq" in params and params["freq"].default is params["freq"].empty:
        extra["freq"] = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    if "past_time_features" in params:  # lagged forecasters (Time Series Transformer, Informer, Autoformer)
        yield from _lagged_history(cfg, ctx, batch, gen, dev, dtype)
        return
    channels = getattr(cfg, "num_input_channels", None) or 1
    yield {"past_values": torch.randn(batch, ctx, channels, generator=gen).to(dev, dtype)}
    yield {"past_values": torch.randn(batch, ctx, generator=gen).to(dev, dtype), **extra}


def _lagged_history(cfg: Any, ctx: int, batch: int, gen: torch.Generator, dev: torch.device,
                    dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """A lagged forecaster's inputs: ``context + max(lags)`` steps of ``past_values`` (the lags look back
    that far), their time features ``(batch, steps, time + dynamic real features)`` and an all-ones
    ``past_observed_mask``, with the ``prediction_length`` future values and time features its decoder
    reads (then the past alone)."""
    lags = getattr(cfg, "lags_sequence", None) or [1]
    past, ahead = ctx + max(lags), getattr(cfg, "prediction_length", None) or 1
    feats = (getattr(cfg, "num_time_features", 0) or 0) + (getattr(cfg, "num_dynamic_real_features", 0) or 0)
    size = getattr(cfg, "input_size", 1) or 1
    per_step = () if size == 1 else (size,)

    def steps(n: int, *shape: int) -> torch.Tensor:
        return torch.randn(batch, n, *shape, generator=gen).to(dev, dtype)

    history = {"past_values": steps(past, *per_step), "past_time_features": steps(past, feats),
               "past_observed_mask": torch.ones(batch, past, *per_step, device=dev, dtype=dtype)}
    yield {**history, "future_values": steps(ahead, *per_step), "future_time_features": steps(ahead, feats)}
    yield history
