"""Model families a user brings, a fast subset of benchmarks/coverage.py: every transformer family prunes its heads and
feed-forward width through one attention layout, reloads from its spec and exports verified; a family compress does
not know is refused in one line."""
from __future__ import annotations

import json
import time

import pytest
import torch

from compress import sources
from compress.errors import CompressError
from compress.pipeline import run

transformers = pytest.importorskip("transformers")

TEXT = ["input_ids=1x16:int64", "attention_mask=1x16:int64"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(vocab_size=100, max_position_embeddings=64, **TINY), TEXT),
    "roberta": (lambda: transformers.RobertaConfig(vocab_size=100, max_position_embeddings=64, **TINY), TEXT),
    "electra": (lambda: transformers.ElectraConfig(vocab_size=100, embedding_size=32, max_position_embeddings=64, **TINY), TEXT),
    "deberta-v2": (lambda: transformers.DebertaV2Config(vocab_size=100, max_position_embeddings=64, relative_attention=True,
                                                        pos_att_type=["p2c", "c2p"], share_att_key=False, **TINY), TEXT),
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                         max_position_embeddings=64), TEXT),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64), TEXT),
    "vit": (lambda: transformers.ViTConfig(image_size=32, patch_size=8, **TINY), ["pixel_values=1x3x32x32"]),
}


def _folder(tmp_path, family: str):
    make, shapes = FAMILIES[family]
    torch.manual_seed(0)
    folder = tmp_path / family
    transformers.AutoModel.from_config(make()).eval().save_pretrained(folder)
    return folder, shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_and_mlp_pruning_cover_every_transformer_family(tmp_path, family):
    folder, shapes = _folder(tmp_path, family)
    res = run({"model": {"source": str(folder), "input_shape": shapes},
               "stages": [{"prune": {"method": "heads", "amount": 0.5, "mlp_amount": 0.5}}, {"export": {"target": "onnx"}}]},
              tmp_path / "o")
    pruned, onnx = res.artifacts[1][1], res.final
    m = pruned.stages[-1]["metrics"]
    assert m["heads_per_layer"] == [2, 2] and m["mlp_width_per_layer"] == [32, 32] and m["params_ratio"] < 0.9, m
    assert family.split("-")[0] in m["layout"] or family in ("roberta", "electra")
    assert onnx.format == "onnx" and onnx.stages[-1]["metrics"]["max_abs_diff"] < 1e-3        # verified in onnxruntime
    reloaded = sources.load(tmp_path / "o" / "stages" / "01-prune-heads").model          # spec + recorded shapes, no pickle
    x = tuple(s.example(3) for s in pruned.input_spec)
    with torch.no_grad():
        assert torch.allclose(reloaded(*x), pruned.model(*x), atol=1e-5)


def test_a_family_head_pruning_does_not_know_is_refused_in_one_line(tmp_path):
    cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=16, max_position_embeddings=64, **TINY)
    transformers.AlbertModel(cfg).save_pretrained(tmp_path / "albert")     # shared layers in groups: no layout for them
    with pytest.raises(CompressError, match="head pruning does not know the attention layout of AlbertModel") as info:
        run({"model": {"source": str(tmp_path / "albert"), "input_shape": TEXT}, "stages": [{"prune": {"method": "heads"}}]}, tmp_path / "o")
    assert "\n" not in str(info.value) and not (tmp_path / "o").exists()


def test_measuring_importance_leaves_the_forward_pass_untouched(tmp_path):
    """The scoring hooks only read: the last block's feed-forward scores equal ones computed from a plain forward pass
    (a pre-hook that returned its running sum once replaced the layer's input from the second block on)."""
    from compress.methods import attention as att
    from compress.methods.heads import activation_scores

    folder, shapes = _folder(tmp_path, "bert")
    model = sources.load(folder, input_shape=shapes).model
    blocks = att.blocks(model)
    x = (torch.randint(0, 100, (4, 16)), torch.ones(4, 16, dtype=torch.long))
    _, mlp = activation_scores(model, blocks, [x])
    seen = {}
    down = att.mlp_pair(blocks[-1])[1]
    handle = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(*x)
    handle.remove()
    expected = seen["x"].abs().mean(dim=(0, 1)) * att.out_weight(down).norm(dim=0)
    assert torch.allclose(mlp[-1], expected, atol=1e-5)


# ---------------------------------------------------------------- vision transformers, and what structured pruning refuses
VISION = {   # name -> (--arch, --arch-args, input shape, heads prunable)
    "timm-vit": ("timm:test_vit", {}, "1x3x160x160", True),
    "timm-swin": ("timm:swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "img_size": 56,
                                                         "window_size": 7, "num_classes": 10}, "1x3x56x56", True),
    "torchvision-vit": ("tests.models:tiny_vit", {}, "1x3x32x32", False),
    "torchvision-swin": ("tests.models:tiny_swin", {}, "1x3x32x32", False),
}


def _vision_source(tmp_path, name):
    from compress.arch import build

    arch, args, shape, heads = VISION[name]
    torch.manual_seed(0)
    torch.save(build(arch, args).state_dict(), tmp_path / f"{name}.pt")
    return ["--arch", arch, "--arch-args", json.dumps(args), "--input-shape", shape], heads


@pytest.mark.parametrize("name", VISION)
def test_vision_transformers_prune_heads_and_mlp_width_reload_and_export(cli, tmp_path, name):
    src, heads = _vision_source(tmp_path, name)
    amount = "0.5" if heads else "0"
    r = cli("--quiet", "prune", tmp_path / f"{name}.pt", *src, "--method", "heads", "-s", f"amount={amount}", "-s", "mlp_amount=0.5",
            "-o", tmp_path / "p")
    assert r.rc == 0, r.err
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())["stages"][-1]["metrics"]
    assert m["params_ratio"] < 0.95 and (bool(m.get("heads_per_layer")) == heads), m
    assert cli("--quiet", "export", tmp_path / "p", "--target", "onnx", "-o", tmp_path / "o").rc == 0    # verified in onnxruntime
    if not heads:    # their attention fixes the head size to the model's width: removing heads is refused, in one line
        r = cli("prune", tmp_path / f"{name}.pt", *src, "--method", "heads", "-s", "amount=0.5", "-o", tmp_path / "h")
        assert r.rc == 1 and len(r.err_lines) == 1 and "cannot be removed alone" in r.err and "mlp_amount" in r.err


@pytest.mark.parametrize("name", ["torchvision-vit", "shufflenet"])
def test_structured_pruning_refuses_what_it_cannot_follow_at_once(cli, tmp_path, name):
    if name == "shufflenet":
        import torchvision

        torch.save(torchvision.models.shufflenet_v2_x0_5(weights=None).state_dict(), tmp_path / "s.pt")
        src, path, why = ["--arch", "torchvision:shufflenet_v2_x0_5"], tmp_path / "s.pt", "channel shuffle"
    else:
        src, _ = _vision_source(tmp_path, name)
        path, why = tmp_path / f"{name}.pt", "Use --method heads"
    started = time.monotonic()
    r = cli("prune", path, *src, "--method", "structured", "--amount", "0.5", "-o", tmp_path / "o")
    assert r.rc == 1 and len(r.err_lines) == 1 and why in r.err and not (tmp_path / "o").exists(), r.err
    assert time.monotonic() - started < 30


def test_dynamic_int8_keeps_layers_whose_weights_the_parent_reads_in_float(cli, tmp_path):
    """torchvision's Swin calls F.linear(x, self.qkv.weight): those layers stay float, the rest is int8, and it reloads."""
    src, _ = _vision_source(tmp_path, "torchvision-swin")
    r = cli("--quiet", "quantize", tmp_path / "torchvision-swin.pt", *src, "--method", "dynamic", "-o", tmp_path / "q")
    assert r.rc == 0, r.err
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())["stages"][-1]["metrics"]
    direct = m["kept_float_read_directly"]
    assert direct and all(n.endswith(("attn.qkv", "attn.proj")) for n in direct) and m["quantized_layers"] > 0
    assert m["cosine"] > 0.99
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(sources.load(tmp_path / "q").model(x), sources.load(tmp_path / "q" / "stages" / "01-quantize-dynamic").model(x))


def test_a_run_past_its_memory_limit_stops_with_one_line_and_writes_nothing(cli, tmp_path, tiny_state):
    tiny = ["--arch", "tests.models:TinyCNN", "--arch-args", '{"num_classes": 5}', "--input-shape", "1x3x32x32"]
    r = cli("--max-memory", "50M", "prune", tiny_state[0], *tiny, "--method", "magnitude", "-o", tmp_path / "o")
    assert r.rc == 1 and len(r.err_lines) == 1 and "more than the limit of 0.0 GiB" in r.err and "--max-memory" in r.err, r.err
    assert not (tmp_path / "o").exists()
    r = cli("--max-memory", "lots", "prune", tiny_state[0], *tiny, "--method", "magnitude", "-o", tmp_path / "o")
    assert r.rc == 1 and "max_memory: max_memory 'lots' is not a size" in r.err


def test_gpt2_conv1d_projections_take_torch_dynamic_int8_and_reload(tmp_path):
    """GPT-2's projections are transformers' Conv1D (weight stored [in, out]), which torch's dynamic int8 does not map:
    they are turned into the Linear they compute first, so every projection becomes int8, and the model reloads."""
    folder, shapes = _folder(tmp_path, "gpt2")
    res = run({"model": {"source": str(folder), "input_shape": shapes}, "stages": [{"quantize": {"method": "dynamic"}}]}, tmp_path / "o")
    m = res.final.stages[-1]["metrics"]
    assert m["quantized_layers"] == 2 * 4 and m["cosine"] > 0.99, m          # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    x = (torch.randint(0, 100, (3, 16)), torch.ones(3, 16, dtype=torch.long))
    reloaded = sources.load(tmp_path / "o").model                                      # rebuilt from the spec and the step
    with torch.no_grad():
        a, b = reloaded(*x), res.final.model(*x)
    a, b = (t[0] if isinstance(t, (tuple, list)) else getattr(t, "last_hidden_state", t) for t in (a, b))
    assert torch.allclose(a, b, atol=1e-5)
