"""torch.compile of the UNet and the VAE decoder (PNP_COMPILE): whole graphs, a bounded number of them,
the eager images, and an eager fallback. The tests trace with the "eager" backend: tracing finds graph breaks and counts
graphs as inductor would, without minutes of code generation on a CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pnp import ModelError, PnPConfig, PnPEngine, tokenflow
from pnp.compilation import Compilable
from pnp.models import select_compile
from tests.helpers import HORSE, config
from tests.test_video import assert_same_up_to_ties, horse_frames, video_config, write_video

REQUESTS = [
    {"translation_prompts": "a robot horse"},
    {"translation_prompts": "a zebra; a cat; a dog; a lego horse"},
    {"translation_prompts": "a robot horse", "negative_prompt": "a horse", "negative_prompt_alpha": 0.5},
    # A generated source: its features captured by compiled calls, then laid out one row per latent.
    {"generation_prompt": "a horse", "seed": 3, "translation_prompts": "a zebra; a cat; a dog"},
]


def test_pnp_compile_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("PNP_COMPILE", raising=False)
    assert select_compile() is False
    monkeypatch.setenv("PNP_COMPILE", "1")
    assert select_compile() is True and select_compile(False) is False
    monkeypatch.setenv("PNP_COMPILE", "yes")
    with pytest.raises(ModelError, match="PNP_COMPILE"):
        select_compile()


def test_compiled_unet_has_no_graph_break_few_graphs_and_the_eager_images(tiny_model_dir, caplog):
    eager = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", compile=False)
    compiled = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", compile=False)
    graphs, runs, eager_images = [], [], []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)

        def run(*args):
            runs.append(graph)
            return graph.forward(*args)

        return run

    compiled.model.compile(backend=counting_backend)
    with caplog.at_level(logging.WARNING, logger="pnp.compilation"):
        for values in REQUESTS:
            request = config(**values)
            expected, result = eager(request, HORSE), compiled(request, HORSE)
            eager_images.append(expected.images)
            for a, b in zip(expected.images, result.images, strict=True):
                assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
            assert result.stats.unet_evals == expected.stats.unet_evals
        first_pass = len(graphs)
        compiled(config(**REQUESTS[1]), HORSE)  # every shape seen: nothing new
        compiled_runs = len(runs)
        with compiled.model.in_float32():  # the retry runs both eagerly
            compiled(config(**REQUESTS[0]), HORSE)
        assert len(runs) == compiled_runs
        after_retry = compiled(config(**REQUESTS[2]), HORSE)  # and the graphs serve again after it
        assert len(runs) > compiled_runs
        for a, b in zip(eager_images[2], after_retry.images, strict=True):
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
        # Once compiling stops (a service after its warm-up), the shapes seen still run their graphs: every
        # call of a new image's request, 10 inversion, 1 extraction and 10 translation calls and 1 decoding.
        compiled.model.stop_compiling()
        before = len(runs)
        compiled(config(**REQUESTS[0], inversion_prompt="a new cache entry"), HORSE)
        assert len(runs) - before == 10 + 1 + 10 + 1
    # fullgraph=True: a graph break would have raised and fallen back to eager, with a warning.
    assert compiled.model.injection_unet.unet_forward.compiled and compiled.model.vae_decode.compiled
    assert not [r for r in caplog.records if r.name == "pnp.compilation"]
    assert len(graphs) == first_pass
    # UNet: batch sizes x injection patterns: inversion (1), extraction (8), translation (2, 8, then 2 and
    # 3 with the negative branch, then 6 with a generated source's rows), each with ResNet and attention,
    # ResNet only, or nothing injected, and the generation's 2 with and without capture. VAE decoder: 1 and
    # 4 images.
    assert 7 <= first_pass <= 20, first_pass
    decoder_graphs = [g for g in graphs if "post_quant_conv" in g.code]  # the VAE decoder's first layer
    assert len(decoder_graphs) == 2 and first_pass - 2 >= 5


def test_a_failing_compilation_falls_back_to_eager_with_a_warning(tiny_model_dir, caplog):
    engine = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", compile=False)
    request = config(translation_prompts="a cat")
    expected = engine(request, HORSE).images[0]

    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    engine.model.compile(backend=failing_backend)
    engine.cache.clear()
    with caplog.at_level(logging.WARNING, logger="pnp.compilation"):
        result = engine(request, HORSE)
    assert not engine.model.compiled
    failures = [r.getMessage() for r in caplog.records if "torch.compile of the" in r.getMessage()]
    assert len(failures) == 2 and "UNet" in failures[0] and "VAE decoder" in failures[1]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    assert result.stats.unet_evals == 38
    torch._dynamo.reset()


def test_setup_with_pnp_compile_warms_up_before_the_first_prediction(service, monkeypatch, pnp_logs):
    # The warm-up itself is a default request at 512x512 (minutes on this CPU): recorded, not run.
    warmed = []
    monkeypatch.setattr(PnPEngine, "warm_up", lambda engine: warmed.append(engine))
    for flag, compiled in (("0", False), ("1", True)):
        monkeypatch.setenv("PNP_COMPILE", flag)
        predictor = service.predict.Predictor()
        predictor.setup()
        assert predictor.engine.model.compiled is compiled
        assert warmed == ([predictor.engine] if compiled else [])
    assert "compiled the UNet and VAE decoder for the default request" in pnp_logs.text


def compiled_layer() -> tuple[torch.nn.Linear, Compilable, list[int]]:
    """A small layer, its Compilable (compiled) and the rows of every call that ran a compiled graph."""
    layer = torch.nn.Linear(4, 3)
    compilable, compiled_rows = Compilable(layer, "layer"), []

    def counting_backend(graph, example_inputs):
        def run(*args):
            compiled_rows.append(next(a.shape[0] for a in args if a.dim() == 3))  # the input, not the weights
            return graph.forward(*args)

        return run

    compilable.compile(backend=counting_backend)
    return layer, compilable, compiled_rows


def run_rows(layer: torch.nn.Linear, compilable: Compilable, rows: int) -> None:
    inputs = torch.randn(rows, 1, 4)
    with torch.no_grad():
        assert torch.allclose(compilable(inputs), layer(inputs))


def test_past_the_graph_limit_new_shapes_run_eagerly_and_compiled_ones_stay(caplog):
    layer, compilable, compiled_rows = compiled_layer()
    # torch's own patch: pytest's monkeypatch deletes a torch config entry when it restores it.
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level(logging.WARNING, logger="pnp.compilation"):
        for rows in (1, 2, 3, 1, 3):
            run_rows(layer, compilable, rows)
    assert compiled_rows == [1, 2, 1]  # 3 rows, past the limit, ran eagerly both times
    assert compilable.compiled
    warnings = [r.getMessage() for r in caplog.records if r.name == "pnp.compilation"]
    assert warnings == [
        "the layer reached torch.compile's limit of 2 graphs; new shapes run eagerly, compiled ones stay"
    ]
    torch._dynamo.reset()


def test_after_stop_compiling_new_shapes_run_eagerly_and_compiled_ones_stay():
    layer, compilable, compiled_rows = compiled_layer()
    run_rows(layer, compilable, 1)
    compilable.stop_compiling()
    for rows in (2, 1, 3):
        run_rows(layer, compilable, rows)
    assert compiled_rows == [1, 1] and compilable.compiled
    torch._dynamo.reset()


def test_warm_up_runs_a_default_request_then_compiles_no_more_and_keeps_the_cache(tiny_model_dir, monkeypatch):
    engine = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu")
    reference = engine(config(), HORSE)
    cached = engine.cache.items()
    graphs, warm_up_requests = [], []
    engine.model.compile(backend=lambda graph, example_inputs: graphs.append(graph) or graph.forward)

    def default_request(self, request, image):  # a real one takes minutes at 512x512 on this CPU
        warm_up_requests.append((request, image.size))
        self.cache.clear()

    with monkeypatch.context() as patched:
        patched.setattr(PnPEngine, "__call__", default_request)
        engine.warm_up()
    assert warm_up_requests == [(PnPConfig(), (512, 512))]
    assert engine.cache.items() == cached
    # Nothing was compiled in the warm-up (it was not run), and nothing is compiled after it.
    result = engine(config(), HORSE)
    assert graphs == [] and engine.model.compiled
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(reference.images[0]))
    torch._dynamo.reset()


def test_a_compiled_video_has_the_same_graphs_for_every_group(tiny_model_dir, tmp_path, monkeypatch):
    """Seven frames in groups of 2, 2, 2 and 1: the third group's passes compile no graph of their own (the
    group's keyframes are handed to the UNet as tensors, not picked by a group index inside it), so a video's
    graphs do not grow with its length; the frames are the eager engine's, up to ties."""
    eager = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", compile=False)
    compiled = PnPEngine.from_pretrained(str(tiny_model_dir), device="cpu", compile=False)
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compiled.model.compile(backend=counting_backend)
    new_graphs: dict[int, int] = {}
    group_pass = tokenflow.VideoDenoiser._group_pass

    def counted(denoiser, frames, x, step, g, source):
        before = len(graphs)
        output = group_pass(denoiser, frames, x, step, g, source)
        new_graphs[g] = new_graphs.get(g, 0) + len(graphs) - before
        return output

    monkeypatch.setattr(tokenflow.VideoDenoiser, "_group_pass", counted)
    # Every step injects both kinds of feature: one injection pattern, fewer graphs to trace.
    request = video_config(feature_injection_threshold=1.0, attention_injection_threshold=1.0)
    clip = write_video(tmp_path, horse_frames(7))
    result = compiled(request, video=clip)
    assert new_graphs[1] > 0 and new_graphs[2] == 0 and new_graphs[3] > 0  # the last group is shorter
    assert_same_up_to_ties(result.videos[0], eager(request, video=clip).videos[0])
