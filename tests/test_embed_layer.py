"""load_encoder: every spec kind, local checkpoints and HF dirs, normalisation, clear refusals."""

from __future__ import annotations

import pytest
import torch

from mmcurate.embed import load_encoder, parse_spec
from mmcurate.errors import UsageError


def _pixels(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_tiny_open_clip_is_normalised_and_has_logit_scale():
    enc = load_encoder("open_clip:mmc-tiny", "cpu")
    img = enc.encode_images(_pixels())
    txt = enc.encode_texts(["a red circle", "a blue square", "x"])
    assert img.shape == (3, enc.dim) and txt.shape == (3, enc.dim) and enc.dim == 32
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_open_clip_local_checkpoint_is_loaded(tmp_path):
    import open_clip

    base = load_encoder("open_clip:mmc-tiny", "cpu")
    model = open_clip.create_model("mmc-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(3.0)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    enc = load_encoder(f"open_clip:mmc-tiny@{ckpt}", "cpu")
    pixels = _pixels()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1)
    torch.testing.assert_close(enc.encode_images(pixels), expected)
    assert enc.logit_scale == pytest.approx(float(torch.exp(torch.tensor(3.0))))
    assert not torch.allclose(base.encode_images(pixels), expected)


def test_timm_local_weights_and_pooled_features(tmp_path):
    import timm

    model = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    ckpt = tmp_path / "w.pth"
    torch.save(model.state_dict(), ckpt)
    enc = load_encoder(f"timm:test_nfnet@{ckpt}", "cpu")
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval()(pixels), dim=-1)
    torch.testing.assert_close(enc.encode_images(pixels), expected)
    assert not enc.has_text and enc.dim == model.num_features


def test_timm_checkpoint_of_another_architecture_is_refused(tmp_path):
    ckpt = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, ckpt)
    with pytest.raises(UsageError, match="does not fit"):
        load_encoder(f"timm:test_nfnet@{ckpt}", "cpu")


def test_tiny_bert_is_deterministic_and_cls_based():
    enc = load_encoder("hf-text:mmc-tiny-bert", "cpu")
    raw = enc.encode_texts(["a small red circle on the left"], normalize=False)
    assert raw.shape == (1, 64) and abs(float(raw.norm()) - 1.0) > 1e-3
    from mmcurate.embed.encoders import _tiny_bert

    model, tok = _tiny_bert()
    with torch.no_grad():
        cls = model.eval()(**tok(["a small red circle on the left"], return_tensors="pt"))
        cls = cls.last_hidden_state
    torch.testing.assert_close(raw, cls[:, 0, :])


def _tiny_tokenizer_dir(path):
    from mmcurate.embed.encoders import _tiny_bert

    _, tok = _tiny_bert()
    tok.save_pretrained(path)
    return tok


def test_hf_clip_from_a_local_directory(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    tok = _tiny_tokenizer_dir(tmp_path)
    config = CLIPConfig(
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path)
    enc = load_encoder(f"hf-clip:{tmp_path}", "cpu")
    model = CLIPModel.from_pretrained(tmp_path).eval()
    pixels = _pixels()
    with torch.no_grad():
        out = model(
            pixel_values=pixels, **tok(["a", "b c", "d"], return_tensors="pt", padding=True)
        )
    torch.testing.assert_close(enc.encode_images(pixels), out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        enc.encode_texts(["a", "b c", "d"]), out.text_embeds, atol=1e-5, rtol=1e-5
    )
    assert enc.dim == 16 and enc.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_hf_text_from_a_local_directory(tmp_path):
    from transformers import BertConfig, BertModel

    tok = _tiny_tokenizer_dir(tmp_path)
    torch.manual_seed(1)
    model = BertModel(
        BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    model.save_pretrained(tmp_path)
    enc = load_encoder(f"hf-text:{tmp_path}", "cpu")
    with torch.no_grad():
        cls = model.eval()(**tok(["red square"], return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(enc.encode_texts(["red square"], normalize=False), cls)
    assert enc.dim == 32 and not enc.has_image


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("vit-b-32", "expected KIND:NAME"),
        ("clip:ViT-B-32", "unknown kind 'clip'"),
        ("open_clip:", "missing model name"),
        ("open_clip:NoSuchNet", "open_clip has no model 'NoSuchNet'"),
        ("timm:no_such_net", "timm has no model"),
        ("open_clip:mmc-tiny@/nonexistent/ckpt.pt", "not found"),
        ("open_clip:RN50/openai@/x.pt", "not both"),
        ("hf-text:/nonexistent/dir", "local form hf-text:"),
    ],
)
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(UsageError, match=message) as info:
        load_encoder(spec, "cpu")
    assert "\n" not in str(info.value) and spec.split("@")[0].split(":")[0] in str(info.value)


def test_pretrained_tag_offline_points_to_the_local_form():
    with pytest.raises(UsageError, match=r"open_clip:RN50@/path/to/checkpoint.pt"):
        load_encoder("open_clip:RN50/openai", "cpu")


def test_parse_spec_forms():
    assert parse_spec("open_clip:ViT-B-32/laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    assert parse_spec("open_clip:ViT-L-14@/p/ckpt.pt").checkpoint == "/p/ckpt.pt"
    assert parse_spec("timm:nfnet_l0@/w.pth").name == "nfnet_l0"
    assert (
        parse_spec("hf-clip:openai/clip-vit-large-patch14").name == "openai/clip-vit-large-patch14"
    )


def test_cuda_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="no CUDA device"):
        load_encoder("open_clip:mmc-tiny", "cuda")
