import pytest
import torch
from safetensors.torch import save_file

from leuko.nets import ARCHITECTURES, build_model, get_arch, resolve_target_layer
from leuko.nets import backbones

SEED_ARCHITECTURES = {"melba_image", "mseenet", "oadls_acrnn", "seed003_resnet50", "seed003_efficientnet_b3",
                      "seed003_vgg16", "seed003_alexnet", "seed004_squeezenet", "seed004_inception_v3",
                      "seed004_resnet50", "efficientnet_lite0", "efficientnet_lite2"}


def test_registry_offers_every_seed_architecture():
    assert SEED_ARCHITECTURES <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES),
                         ids=sorted(ARCHITECTURES))
def test_builds_for_any_class_count_and_has_a_spatial_target_layer(name):
    spec = get_arch(name)
    for num_classes in ((2,) if spec.fusion else (2, 5)):
        model = build_model(name, num_classes).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 96, 96))
        assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    layer = resolve_target_layer(model, spec.target_layer)
    captured = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    handle.remove()
    assert captured and captured[0].ndim == 4, "Grad-CAM target must output a feature map"
    assert spec.input_size >= 96 and len(spec.mean) == 3 and spec.source


def test_seed_heads_match_the_papers():
    melba = build_model("melba_image", 2)
    assert melba.head.fc1.in_features == 1536 and melba.head.fc1.out_features == 512
    assert melba.head.dropout.p == 0.5 and melba.head.fc2.out_features == 256
    seed003 = build_model("seed003_alexnet", 3)
    assert seed003.head.norm.eps == 1e-3 and seed003.head.norm.momentum == pytest.approx(0.01)
    assert isinstance(seed003.head.pool, torch.nn.AdaptiveMaxPool2d) and seed003.head.dense.out_features == 256
    mseenet = build_model("mseenet", 4)
    assert mseenet.head.inception.out_channels == 256
    acrnn = build_model("oadls_acrnn", 2).head
    assert acrnn.gru.bidirectional and acrnn.gru.num_layers == 2
    assert get_arch("oadls_acrnn").preprocessing == {"wiener": True, "equalization": "dhe"}
    assert get_arch("seed003_resnet50").recipe.optimizer == "adamax"
    assert get_arch("melba_image").recipe.eps == 1e-7


def test_offline_weights_load_for_the_cpu_defaults():
    assert get_arch("efficientnet_lite0").offline_weights
    model = build_model("efficientnet_lite0", 2, pretrained="auto")
    assert model.pretrained_source.startswith("offline:")
    random_model = build_model("efficientnet_lite0", 2)
    first = "body.conv_stem.weight"
    assert not torch.equal(model.backbone.state_dict()[first], random_model.backbone.state_dict()[first])


def test_auto_falls_back_to_random_with_a_warning_when_no_source_exists(monkeypatch):
    monkeypatch.setattr(backbones, "hub_reachable", lambda library, timeout_s=1.5: False)
    with pytest.warns(UserWarning, match="random initialisation"):
        model = build_model("seed004_squeezenet", 2, pretrained="auto")
    assert model.pretrained_source.startswith("random")
    with pytest.raises(backbones.PretrainedWeightsError, match="not reachable"):
        build_model("seed004_squeezenet", 2, pretrained="hub")


def test_local_checkpoint_is_loaded_and_a_wrong_one_refused(tmp_path):
    source = build_model("seed004_squeezenet", 2)
    path = tmp_path / "squeezenet.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    model = build_model("seed004_squeezenet", 3, pretrained=path)
    assert model.pretrained_source.startswith("checkpoint:")
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 source.backbone.state_dict().values()))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"nothing": torch.zeros(3)}, str(wrong))
    with pytest.raises(backbones.PretrainedWeightsError, match="matches"):
        build_model("seed004_squeezenet", 2, pretrained=wrong)
    with pytest.raises(backbones.PretrainedWeightsError, match="does not exist"):
        build_model("seed004_squeezenet", 2, pretrained=tmp_path / "absent.safetensors")


def test_freezing_the_backbone_keeps_its_batchnorm_statistics():
    model = build_model("efficientnet_lite0", 2)
    model.freeze_backbone(True)
    model.train()
    before = model.backbone.body.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.backbone.body.bn1.running_mean)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        build_model("resnet9000", 2)
    with pytest.raises(ValueError):
        build_model("efficientnet_lite0", 1)


def test_freezing_early_stages_fixes_their_weights_and_statistics():
    model = build_model("efficientnet_lite0", 2)
    model.freeze_early_stages(2)
    model.train()
    stem, first = model.backbone.body.conv_stem, model.backbone.body.blocks[1]
    assert not stem.weight.requires_grad and not any(p.requires_grad for p in first.parameters())
    assert all(p.requires_grad for p in model.backbone.body.blocks[2].parameters())
    before = model.backbone.body.bn1.running_mean.clone()
    model(torch.randn(4, 3, 64, 64))
    assert torch.equal(before, model.backbone.body.bn1.running_mean)
    with pytest.raises(ValueError, match="not supported"):
        build_model("seed003_vgg16", 2).freeze_early_stages(1)


def test_fusion_network_runs_with_full_partial_and_no_clinical_values():
    from leuko.clinical import ClinicalValues, ENCODING_SIZE, encode

    model = build_model("fusion_lite0", 2).eval()
    images = torch.randn(3, 3, 96, 96)
    full = ClinicalValues(age=5, sex="male", wbc=45.0, rbc=3.1, hemoglobin=7.5, hematocrit=23, mcv=85, platelets=40,
                          lymphocytes_pct=30, lymphocytes_abs=13.5, neutrophils_abs=1.1, blasts_pct=45, ldh=900)
    partial = ClinicalValues(wbc=45.0, platelets=40)
    clinical = torch.tensor([encode(full), encode(partial), encode(None)])
    assert clinical.shape == (3, ENCODING_SIZE) and clinical[2, 1::2][:12].eq(1).all()
    with torch.no_grad():
        logits = model(images, clinical)
        image_only = model(images)
    assert logits.shape == (3, 2) and torch.all(logits[:, 1] == 0)
    assert torch.allclose(image_only[2], logits[2])
    assert not torch.allclose(logits[0], image_only[0])
    head = model.fusion.attention
    assert head.num_heads == 8 and head.embed_dim // head.num_heads == 40
    assert model.clinical.fc3.out_features == 128 and model.clinical.dropout.p == 0.3 and model.clinical.fc4.out_features == 64
    with pytest.raises(ValueError, match="binary"):
        build_model("fusion_lite0", 4)
