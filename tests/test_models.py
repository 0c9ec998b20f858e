"""Every registered NCL model, and `ncl` over several timm families, through the timm contract."""
import pytest
import timm
import torch

import ncl_hub
from ncl_hub.models import CosineClassifier, MocoConfig, NCLModel, PAPER_MODELS, WeightsUnavailableError
from ncl_hub.models.factory import CheckpointMismatchError

NAMED = sorted(m for m in timm.list_models("ncl_*"))
FAMILIES = {  # timm's own tiny test models, one per family
    "test_resnet": {},
    "test_convnext": {},
    "test_efficientnet": {},
    "test_vit": {"img_size": 64},
}


def _input(model, size=None):
    _, h, w = model.pretrained_cfg["input_size"]
    size = size or h
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _check_contract(model: NCLModel, x: torch.Tensor, num_classes: int, num_experts: int):
    model.eval()
    with torch.no_grad():
        out = model(x)
        experts = model.forward_experts(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    assert out.shape == (2, num_classes)
    assert experts.shape == (num_experts, 2, num_classes)
    assert feats.shape[:2] == (num_experts, 2)
    assert pooled.shape == (2, model.num_features)
    assert model.num_features == num_experts * model.expert_features
    assert torch.allclose(out, experts.mean(0), atol=1e-5)
    assert torch.allclose(logits, out, atol=1e-5)
    assert torch.isfinite(out).all()
    assert model.num_classes == num_classes and model.num_experts == num_experts
    assert len(model.get_classifier()) == num_experts
    cfg = model.pretrained_cfg
    for name in cfg["classifier"]:
        assert isinstance(model.get_submodule(name), (torch.nn.Linear, CosineClassifier))
    for name in cfg.get("first_conv") or ():
        assert isinstance(model.get_submodule(name), torch.nn.Conv2d)
    # state_dict round trip into a freshly built twin
    twin = timm.create_model("ncl", **model.model_args())
    twin.load_state_dict(model.state_dict())
    twin.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), out)
    # new heads, trunks kept
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert torch.equal(model.forward_features(x), feats)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", NAMED)
def test_registered_models_follow_timm_contract(name):
    model = timm.create_model(name)
    spec = PAPER_MODELS[name]
    assert isinstance(model, NCLModel)
    assert model.backbone == spec["backbone"] and model.classifier == spec["classifier"]
    if spec["classifier"] == "cosine":
        assert model.heads[0].scale == spec["cosine_scale"]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == spec["num_classes"]
    assert name == "ncl_tiny_test" or cfg["hf_hub_id"] == f"{ncl_hub.HUB_ORG}/{name}"
    # big ImageNet-size models are checked at 64 px to keep the suite fast
    size = None if cfg["input_size"][-1] <= 64 else 64
    _check_contract(model, _input(model, size), spec["num_classes"], 3)


@pytest.mark.parametrize("name", [n for n in NAMED if n != "ncl_tiny_test"])
def test_named_models_have_ensemble_and_expert_tags(name):
    tags = timm.list_pretrained(f"{name}.*")
    assert tags == [f"{name}.ensemble", f"{name}.expert"]  # ensemble first: the default
    expert_cfg = timm.models.get_pretrained_cfg(f"{name}.expert")
    assert expert_cfg.hf_hub_id == f"{ncl_hub.HUB_ORG}/{name}-expert"
    assert expert_cfg.classifier == ("heads.0",)


def test_expert_tag_builds_a_single_expert():
    model = timm.create_model("ncl_resnet32_cifar10lt.expert")
    assert model.num_experts == 1 and model.pretrained_cfg["tag"] == "expert"
    _check_contract(model, _input(model), 10, 1)


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_generic_ncl_over_timm_families(backbone):
    kwargs = FAMILIES[backbone]
    model = timm.create_model("ncl", backbone=backbone, num_classes=5, num_experts=2, **kwargs)
    assert model.expert_features == timm.create_model(backbone, num_classes=0, **kwargs).num_features
    trunk_cfg = timm.models.get_pretrained_cfg(backbone)
    assert model.pretrained_cfg["mean"] == trunk_cfg.mean and model.pretrained_cfg["num_classes"] == 5
    _check_contract(model, _input(model, 64), 5, 2)


def test_create_model_function_and_cosine_head():
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=4, num_experts=2, classifier="cosine",
                                 cosine_scale=10.0)
    head = model.heads[1]
    assert isinstance(head, CosineClassifier) and torch.count_nonzero(head.bias) == 0
    x = torch.randn(3, model.expert_features)
    expected = 10.0 * torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(head.weight, dim=-1).T
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert head.bias.requires_grad


def test_expert_is_a_standalone_copy_with_plain_trunk_cost():
    model = timm.create_model("ncl_tiny_test", moco=dict(dim=8, queue_size=16)).eval()
    x = _input(model)
    single = model.expert(1).eval()
    assert single.num_experts == 1 and single.moco is None
    assert single.pretrained_cfg["classifier"] == ("heads.0",) and "hf_hub_id" not in single.pretrained_cfg
    assert single.pretrained_cfg["first_conv"] == ("trunks.0.conv1",)
    with torch.no_grad():
        assert torch.allclose(single(x), model.forward_experts(x)[1], atol=1e-6)
    # a deep copy: changing it leaves the ensemble alone
    with torch.no_grad():
        single.heads[0].weight.add_(1.0)
        assert not torch.allclose(single(x), model.forward_experts(x)[1])
    plain = timm.create_model("resnet8_cifar_tiny", num_classes=10)
    assert single.num_inference_params() == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in single.parameters()) == sum(p.numel() for p in plain.parameters())


def test_group_matcher_and_no_weight_decay_cover_all_experts():
    from timm.models import group_parameters

    model = timm.create_model("ncl", backbone="test_vit", num_classes=3, num_experts=2, img_size=32)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "trunks.1.pos_embed" in model.no_weight_decay()
    model.set_grad_checkpointing(True)
    assert all(t.grad_checkpointing for t in model.trunks)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_50'.*resnet50"):
        ncl_hub.create_model("resnet_50", num_classes=3)
    with pytest.raises(ValueError, match="num_experts"):
        ncl_hub.create_model("resnet8_cifar_tiny", num_classes=3, num_experts=0)
    with pytest.raises(ValueError, match="classifier"):
        ncl_hub.create_model("resnet8_cifar_tiny", num_classes=3, classifier="mlp")
    with pytest.raises(ValueError, match="unknown MoCo option"):
        ncl_hub.create_model("resnet8_cifar_tiny", num_classes=3, moco=dict(queue=5))
    with pytest.raises(ValueError, match="needs a backbone"):
        timm.create_model("ncl", num_classes=3)


def test_pretrained_without_weights_names_repo_and_local_alternatives():
    with pytest.raises(WeightsUnavailableError) as err:
        timm.create_model("ncl_resnet32_cifar10lt.expert", pretrained=True)
    msg = str(err.value)
    assert "ncl-hub/ncl_resnet32_cifar10lt-expert" in msg and "local-dir:" in msg and "file=" in msg


def test_pretrained_from_local_file_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("ncl_tiny_test").eval()
    save_file(src.inference_state_dict(), tmp_path / "w.safetensors")
    loaded = timm.create_model("ncl_tiny_test", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors"))).eval()
    x = _input(src)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))
    # another class count keeps the trunks, gives new heads
    five = timm.create_model("ncl_tiny_test", pretrained=True, num_classes=5,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    assert torch.equal(five.trunks[2].conv1.weight, src.trunks[2].conv1.weight)
    assert five.heads[0].weight.shape == (5, 32)
    # another backbone is refused with a clear error, even though timm loads non-strictly here
    with pytest.raises(CheckpointMismatchError, match="does not match this model"):
        timm.create_model("ncl", backbone="resnet20_cifar", num_classes=5, pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))


def test_cifar_resnets_are_plain_timm_models():
    for depth, blocks in [(20, 3), (32, 5), (44, 7), (56, 9), (110, 18)]:
        m = timm.create_model(f"resnet{depth}_cifar", num_classes=100)
        assert m.num_features == 64 and len(m.stages) == 3 and all(len(s) == blocks for s in m.stages)
        convs = sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        assert convs + 1 == depth  # convs + the classifier: no projection shortcuts (option A)
    m = timm.create_model("resnet32_cifar", num_classes=100)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert m.pretrained_cfg["input_size"] == (3, 32, 32)
    feats = timm.create_model("resnet32_cifar", features_only=True)(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == [16, 16, 32, 64]


# ---------------------------------------------------------------------------------------------- MoCo
def _moco_model():
    torch.manual_seed(0)
    return timm.create_model("ncl_tiny_test", moco=MocoConfig(dim=8, hidden_dim=16, queue_size=5, momentum=0.9))


def test_key_encoder_starts_equal_to_query():
    model = _moco_model()
    for q, k in zip(model.trunks.state_dict().values(), model.moco.key_trunks.state_dict().values()):
        assert torch.equal(q, k)
    for q, k in zip(model.moco.query_proj.parameters(), model.moco.key_proj.parameters()):
        assert torch.equal(q, k) and not k.requires_grad
    assert all(not p.requires_grad for p in model.moco.key_trunks.parameters())


def test_momentum_update_moves_key_by_one_minus_m():
    model = _moco_model()
    with torch.no_grad():
        for p in list(model.trunks.parameters()) + list(model.moco.query_proj.parameters()):
            p.add_(torch.randn_like(p))
    query_params = list(model.trunks.parameters()) + list(model.moco.query_proj.parameters())
    key_params = list(model.moco.key_trunks.parameters()) + list(model.moco.key_proj.parameters())
    query = [p.detach().clone() for p in query_params]
    key = [p.detach().clone() for p in key_params]
    model.momentum_update()
    after = key_params
    for q, k, new in zip(query, key, after):
        assert torch.allclose(new - k, (1 - 0.9) * (q - k), atol=1e-6)


def test_queue_enqueues_and_wraps():
    model = _moco_model()
    first = torch.nn.functional.normalize(torch.randn(3, 3, 8), dim=-1)
    second = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    model.moco.enqueue(first)
    assert int(model.moco.queue_ptr) == 3 and torch.equal(model.moco.queue[:, :3], first)
    model.moco.enqueue(second)  # 3 + 4 = 7 -> wraps to 2
    assert int(model.moco.queue_ptr) == 2
    assert torch.equal(model.moco.queue[:, 3:5], second[:, :2])
    assert torch.equal(model.moco.queue[:, 0:2], second[:, 2:])
    assert torch.equal(model.moco.queue[:, 2], first[:, 2])


def test_moco_does_not_change_inference():
    model = _moco_model().eval()
    plain = timm.create_model("ncl_tiny_test").eval()
    plain.load_state_dict(model.inference_state_dict())
    x = _input(model)
    queue = model.moco.queue.clone()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert torch.equal(model.moco.queue, queue)
    assert model.num_inference_params() == sum(p.numel() for p in plain.parameters())
    assert any(k.startswith("moco.") for k in model.state_dict())  # training checkpoints keep it
    assert not any(k.startswith("moco.") for k in model.inference_state_dict())


def test_forward_train_outputs():
    model = _moco_model().train()
    x, x_key = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model.forward_train(x, x_key)
    assert out["logits"].shape == (3, 4, 10)
    assert out["query"].shape == out["key"].shape == (3, 4, 8) and out["queue"].shape == (3, 5, 8)
    assert out["query"].requires_grad and not out["key"].requires_grad
    assert torch.allclose(out["query"].norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert set(model.forward_train(x)) == {"logits"}
